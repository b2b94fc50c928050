//! The scalar matmul of 1.625-bit ternary weights (`Tq1Block`): the
//! definition every SIMD path must match exactly.

use crate::kernels::packing::{
    tq1_digit, Tq1Block, BLOCK, TQ1_HEAD, TQ1_HEAD_WEIGHTS, TQ1_MID, TQ1_TAIL, TQ1_TAIL_START,
};

/// Σ_k xq[k] · W[k] for one row of `Tq1Block`s; `xq` is at least the row's
/// padded length.
pub fn dot_row(row: &[Tq1Block], xq: &[i8]) -> i32 {
    let mut sum = 0i32;
    let term = |code: u8, x: i8| (i32::from(code) - 1) * i32::from(x);
    for (block, x) in row.iter().zip(xq.chunks_exact(BLOCK)) {
        let (head, rest) = block.0.split_at(TQ1_HEAD);
        let (mid, tail) = rest.split_at(TQ1_MID);
        for (j, &byte) in head.iter().enumerate() {
            for i in 0..5 {
                sum += term(tq1_digit(byte, i), x[j + TQ1_HEAD * i as usize]);
            }
        }
        for (j, &byte) in mid.iter().enumerate() {
            for i in 0..5 {
                sum += term(
                    tq1_digit(byte, i),
                    x[TQ1_HEAD_WEIGHTS + j + TQ1_MID * i as usize],
                );
            }
        }
        for (j, &byte) in tail.iter().enumerate() {
            for i in 0..4 {
                sum += term((byte >> (2 * i)) & 3, x[TQ1_TAIL_START + j + TQ1_TAIL * i]);
            }
        }
    }
    sum
}
