//! The output-head dots: the definitions the SIMD versions must match
//! (exactly for int8; up to the order of the float additions for bf16).

pub use crate::checkpoint::bf16_to_f32 as bf16_value;

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
