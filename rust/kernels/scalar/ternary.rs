//! The scalar ternary matmul: the definition every SIMD path must match exactly.

use std::ops::Range;

use crate::kernels::packing::{PackedBlock, Packing, TernaryMatrix, BLOCK, BLOCK_BYTES};
use crate::kernels::scalar::{tl, tq1};
use crate::kernels::QuantizedActivations;

/// Σ_k xq[k] · W[k] for one packed row; `xq` is at least the row's padded length.
pub fn dot_row(row: &[PackedBlock], xq: &[i8]) -> i32 {
    let mut sum = 0i32;
    for (block, x) in row.iter().zip(xq.chunks_exact(BLOCK)) {
        for (j, &byte) in block.0.iter().enumerate() {
            for plane in 0..4 {
                let w = i32::from((byte >> (2 * plane)) & 3) - 1;
                sum += w * i32::from(x[plane * BLOCK_BYTES + j]);
            }
        }
    }
    sum
}

/// Σ_k xq[k] · W[n, k] for row `n` of `w`, in any packing.
fn dot_matrix_row(w: &TernaryMatrix, n: usize, xq: &[i8]) -> i32 {
    match w.packing() {
        Packing::I2 => dot_row(w.row(n), xq),
        Packing::Tq1 => tq1::dot_row(w.tq1_row(n), xq),
        Packing::Tl => tl::dot_row(w, n, xq),
    }
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]`. `_xsum` is unused: the scalar
/// path decodes the weights themselves rather than correcting code sums.
pub fn gemv(w: &TernaryMatrix, xq: &[i8], _xsum: i32, rows: Range<usize>, dots: &mut [i32]) {
    for (dot, n) in dots.iter_mut().zip(rows) {
        *dot = dot_matrix_row(w, n, xq);
    }
}

/// `dots[i, t] = Σ_k x[t, k] · W[rows.start + i, k]`, dots is [rows.len(), m].
pub fn gemm(w: &TernaryMatrix, x: &QuantizedActivations, rows: Range<usize>, dots: &mut [i32]) {
    let m = x.m();
    for (row_dots, n) in dots.chunks_exact_mut(m).zip(rows) {
        for (t, dot) in row_dots.iter_mut().enumerate() {
            *dot = dot_matrix_row(w, n, x.token(t));
        }
    }
}
