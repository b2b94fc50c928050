//! Neon output-head dots: int8 rows times quantized activations, exact (as
//! `scalar::head::int8_dots`), the rows read as three streams
//! (`driver::three_streams`) as on x86-64. bf16 rows use the scalar dots.

use std::arch::aarch64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::scalar;

/// `dots[r] = Σ_i rows[r·n + i] · x[i]` for the `dots.len()` consecutive rows
/// of n = x.len() values in `rows`. Products by `smull`/`smlal2`: both sides
/// are symmetric int8 (|a|, |x| <= 127), so a lane holding two products is at
/// most 2 · 127 · 127 = 32258 and fits an i16; `sadalp` widens it at once.
///
/// # Safety
/// The CPU must support Neon.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn int8_dots(rows: &[i8], x: &[i8], dots: &mut [i32]) {
    counts::enter(Isa::Neon);
    assert!(rows.len() >= dots.len() * x.len());
    // SAFETY: this function runs with Neon; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&Int8Rows { rows, x }, dots) }
}

struct Int8Rows<'a> {
    rows: &'a [i8], // [>= dots, n]
    x: &'a [i8],    // [n]
}

impl RowDots for Int8Rows<'_> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let n = self.x.len();
        let mut row_slices: [&[i8]; R] = [&[]; R];
        for (s, &r) in row_slices.iter_mut().zip(&rows) {
            *s = &self.rows[r * n..(r + 1) * n];
        }
        let mut dots = [0i32; R];
        // SAFETY: the caller runs the Neon path.
        unsafe { int8_dots_of(&row_slices, self.x, &mut dots) };
        dots
    }
}

/// The dots of R rows of `x.len()` values with `x`, sharing its loads: 32
/// bytes a step, in two independent chains per row.
///
/// # Safety
/// The CPU must support Neon.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn int8_dots_of<const R: usize>(rows: &[&[i8]; R], x: &[i8], dots: &mut [i32; R]) {
    let n = x.len();
    assert!(rows.iter().all(|row| row.len() == n));
    let mut acc = [[vdupq_n_s32(0); 2]; R];
    let mut j = 0;
    while j + 32 <= n {
        for h in 0..2 {
            // SAFETY: j + 16·h + 16 <= n values of x.
            let xv = unsafe { vld1q_s8(x.as_ptr().add(j + 16 * h)) };
            for (acc, row) in acc.iter_mut().zip(rows) {
                // SAFETY: as above, each row holding n values (asserted).
                let av = unsafe { vld1q_s8(row.as_ptr().add(j + 16 * h)) };
                let pairs = vmlal_high_s8(vmull_s8(vget_low_s8(av), vget_low_s8(xv)), av, xv);
                acc[h] = vpadalq_s16(acc[h], pairs);
            }
        }
        j += 32;
    }
    for ((dot, acc), row) in dots.iter_mut().zip(acc).zip(rows) {
        *dot = vaddvq_s32(vaddq_s32(acc[0], acc[1])) + scalar::head::int8_dot(&row[j..], &x[j..]);
    }
}
