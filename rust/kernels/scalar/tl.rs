//! The scalar matmul of `Packing::Tl` matrices: the definition (each byte's
//! five weights times their activations) and the table lookups the SIMD
//! kernel makes, written plainly (the paths without AVX-512 VBMI run it).

use std::ops::Range;

use crate::kernels::packing::TernaryMatrix;
use crate::kernels::tl::{tl_groups, tl_weights, TlTable, TL_GROUP, TL_NEGATED, TL_ROWS};

/// Σ_k xq[k] · W[n, k] for row `n` of a `Packing::Tl` matrix; `xq` holds at
/// least the row's weights (zero past `n_in`).
pub fn dot_row(w: &TernaryMatrix, n: usize, xq: &[i8]) -> i32 {
    let (lines, _) = w.tl_parts();
    let groups = tl_groups(w.n_in());
    let row_lines = &lines[(n / TL_ROWS) * groups..][..groups];
    let mut sum = 0i32;
    for (g, line) in row_lines.iter().enumerate() {
        for (i, &weight) in tl_weights(line.0[n % TL_ROWS]).iter().enumerate() {
            let x = xq.get(g * TL_GROUP + i).copied().unwrap_or(0);
            sum += i32::from(weight) * i32::from(x);
        }
    }
    sum
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]` by looking up `tables` (the
/// token's, one per group): entry `byte & 0x7f`, negated for a byte with its
/// top bit set.
pub fn gemv_tables(w: &TernaryMatrix, tables: &[TlTable], rows: Range<usize>, dots: &mut [i32]) {
    let (lines, _) = w.tl_parts();
    let groups = tl_groups(w.n_in());
    assert!(tables.len() == groups && dots.len() == rows.len() && rows.end <= w.n_out());
    for (dot, n) in dots.iter_mut().zip(rows) {
        let row_lines = &lines[(n / TL_ROWS) * groups..][..groups];
        let mut sum = 0i32;
        for (line, table) in row_lines.iter().zip(tables) {
            let byte = line.0[n % TL_ROWS];
            let m = usize::from(byte & !TL_NEGATED);
            let entry = i32::from(i16::from_le_bytes([table.lo[m], table.hi[m]]));
            sum += if byte & TL_NEGATED != 0 {
                -entry
            } else {
                entry
            };
        }
        *dot = sum;
    }
}
