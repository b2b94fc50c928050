//! The output-head dots: the definitions the SIMD versions must match
//! (exactly for int8 and q6; up to the order of the float additions for bf16).

pub use crate::checkpoint::bf16_to_f32 as bf16_value;
use crate::kernels::q6::{self, Q6Rows, Q6Tokens, GROUP, GROUP_CODE_BYTES};

/// Σ a[i] · b[i] of int8 vectors.
pub fn int8_dot(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// `dots[r] = Σ rows[r · n + i] · x[i]` for consecutive rows of n = x.len()
/// int8 values.
pub fn int8_dots(rows: &[i8], x: &[i8], dots: &mut [i32]) {
    for (row, dot) in rows.chunks_exact(x.len()).zip(dots.iter_mut()) {
        *dot = int8_dot(row, x);
    }
}

/// `dots[i · rows + r] = Σ_k head[r · n + k] · xs[i · n + k]` for `tokens`
/// token rows of n values in `xs` ([tokens, n]) and the `rows = dots.len() /
/// tokens` consecutive rows of `head`: `dots` is [tokens, rows], each token's
/// `int8_dots`.
pub fn int8_dots_tokens(head: &[i8], xs: &[i8], tokens: usize, dots: &mut [i32]) {
    let (n, rows) = (xs.len() / tokens, dots.len() / tokens);
    for (x, dots) in xs.chunks_exact(n).zip(dots.chunks_exact_mut(rows)) {
        int8_dots(head, x, dots);
    }
}

/// Σ_c s_b(c) · (u_c − 32) · x_c over row r of `rows` (`x` of its padded
/// length): the q6 dot, in i64, column by column as the layout defines it
/// (`kernels::q6`).
pub fn q6_dot(rows: Q6Rows<'_>, r: usize, x: &[i8]) -> i64 {
    let (codes, scales) = (rows.codes(r), rows.scales(r));
    let mut dot = 0i64;
    for (g, (group, x)) in codes
        .chunks_exact(GROUP_CODE_BYTES)
        .zip(x.chunks_exact(GROUP))
        .enumerate()
    {
        for (c, &xc) in x.iter().enumerate() {
            let w = i64::from(q6::code(group, c)) - i64::from(q6::CODE_OFFSET);
            dot += i64::from(scales[q6::block_index(g, c)]) * w * i64::from(xc);
        }
    }
    dot
}

/// `dots[i · n + r] = q6_dot(rows, r, token i)` for every token i of `xs`
/// and the n = dots.len() / xs.len() first rows of `rows`: dots is [tokens, n].
pub fn q6_dots(rows: Q6Rows<'_>, xs: Q6Tokens<'_>, dots: &mut [i64]) {
    let n = dots.len() / xs.len();
    for (i, dots) in dots.chunks_mut(n.max(1)).enumerate() {
        for (r, dot) in dots.iter_mut().enumerate() {
            *dot = q6_dot(rows, r, xs.codes(i));
        }
    }
}

/// `out[r] = Σ_j bf16(rows[r · n + j]) · x[j]` for consecutive rows of n =
/// x.len() bfloat16 values, each a `dot_lanes` sum.
pub fn bf16_dots(rows: &[u16], x: &[f32], out: &mut [f32]) {
    for (row, y) in rows.chunks_exact(x.len()).zip(out.iter_mut()) {
        *y = dot_lanes(row, x, |b| bf16_value(*b));
    }
}

/// A float dot product with 8 independent partial sums: the compiler keeps
/// the lanes in one vector register (it may not reorder one serial sum), and
/// the error stays at the level of a BLAS blocked sum.
#[inline(always)]
pub fn dot_lanes<T>(w: &[T], x: &[f32], widen: impl Fn(&T) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let mut wc = w.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (wv, xv) in (&mut wc).zip(&mut xc) {
        for l in 0..LANES {
            acc[l] += widen(&wv[l]) * xv[l];
        }
    }
    let mut tail = 0.0f32;
    for (wv, xv) in wc.remainder().iter().zip(xc.remainder()) {
        tail += widen(wv) * xv;
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}
