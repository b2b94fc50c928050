//! The output head's dot products, dispatched by `Kernel`: int8 and q6
//! (6-bit, `kernels::q6`) rows times quantized activations (exact on every
//! path) and bf16 rows times f32
//! activations (the same products on every path, added in a path's own
//! order). The matrix and its matvec are `model::dense`'s.

#[cfg(target_arch = "aarch64")]
use super::neon;
use super::q6::{Q6Rows, Q6Tokens};
use super::scalar;
use super::Kernel;
#[cfg(target_arch = "x86_64")]
use super::{x86_avx2, x86_avx512};

/// `dots[r] = Σ_i rows[r · n + i] · x[i]` for the `dots.len()` consecutive
/// rows of n = x.len() int8 values in `rows`.
pub fn int8_dots(kernel: Kernel, rows: &[i8], x: &[i8], dots: &mut [i32]) {
    assert!(rows.len() >= dots.len() * x.len());
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2.
        unsafe { x86_avx2::head::int8_dots(rows, x, dots) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if kernel == Kernel::Neon {
        kernel.assert_supported();
        // SAFETY: the Neon path runs on this CPU (asserted).
        unsafe { neon::head::int8_dots(rows, x, dots) };
        return;
    }
    let _ = kernel;
    scalar::head::int8_dots(rows, x, dots);
}

/// `dots[i · rows + r] = Σ_k head[r · n + k] · xs[i · n + k]`: the int8 dots
/// of `tokens` token rows ([tokens, n] in `xs`) with the `rows = dots.len() /
/// tokens` consecutive rows of `head`; `dots` is [tokens, rows]. With VNNI
/// each row is read once for all the tokens; the other paths take the
/// tokens one by one (`int8_dots`), the rows then coming from cache after
/// the first.
pub fn int8_dots_tokens(kernel: Kernel, head: &[i8], xs: &[i8], tokens: usize, dots: &mut [i32]) {
    assert!(tokens > 0 && xs.len().is_multiple_of(tokens) && dots.len().is_multiple_of(tokens));
    let (n, rows) = (xs.len() / tokens, dots.len() / tokens);
    assert!(head.len() >= rows * n);
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni {
        kernel.assert_supported();
        // SAFETY: the VNNI path runs on this CPU (asserted).
        unsafe { x86_avx512::head::int8_dots_tokens_vnni(head, xs, tokens, dots) };
        return;
    }
    if kernel == Kernel::Scalar {
        scalar::head::int8_dots_tokens(head, xs, tokens, dots);
        return;
    }
    for (x, dots) in xs.chunks_exact(n).zip(dots.chunks_exact_mut(rows)) {
        int8_dots(kernel, head, x, dots);
    }
}

/// `out[r] = Σ_j bf16(rows[r · n + j]) · x[j]` for the `out.len()`
/// consecutive rows of n = x.len() bfloat16 values in `rows`.
pub fn bf16_dots(kernel: Kernel, rows: &[u16], x: &[f32], out: &mut [f32]) {
    assert!(rows.len() >= out.len() * x.len());
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2 and FMA.
        unsafe { x86_avx2::head::bf16_dots(rows, x, out) };
        return;
    }
    let _ = kernel;
    scalar::head::bf16_dots(rows, x, out);
}

/// `dots[r]` = the q6 dot (`scalar::head::q6_dot`) of row r of `rows` with
/// the one token of `x`, for the dots.len() first rows.
pub fn q6_dots(kernel: Kernel, rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    assert!(x.len() == 1 && x.groups() == rows.groups() && rows.len() >= dots.len());
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Avx2 => {
            kernel.assert_supported();
            // SAFETY: the AVX2 path runs on this CPU (asserted).
            unsafe { x86_avx2::head::q6_dots(rows, x, dots) };
            return;
        }
        Kernel::Avx512Bw => {
            kernel.assert_supported();
            // SAFETY: the AVX-512 BW path runs on this CPU (asserted).
            unsafe { x86_avx512::head::q6_dots_bw(rows, x, dots) };
            return;
        }
        Kernel::Avx512Vnni => {
            kernel.assert_supported();
            // SAFETY: the VNNI path runs on this CPU (asserted).
            unsafe { x86_avx512::head::q6_dots_vnni(rows, x, dots) };
            return;
        }
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if kernel == Kernel::Neon {
        kernel.assert_supported();
        // SAFETY: the Neon path runs on this CPU (asserted).
        unsafe { neon::head::q6_dots(rows, x, dots) };
        return;
    }
    let _ = kernel;
    scalar::head::q6_dots(rows, x, dots);
}

/// `dots[i · n + r]` = the q6 dot of row r of `rows` with token i of `xs`,
/// for the n = dots.len() / xs.len() first rows: dots is [tokens, n]. The
/// x86-64 paths multiply each group of a row, once decoded, with a tile of
/// tokens; Neon takes the tokens one by one (`q6_dots`), the rows then
/// coming from cache after the first.
pub fn q6_dots_tokens(kernel: Kernel, rows: Q6Rows<'_>, xs: Q6Tokens<'_>, dots: &mut [i64]) {
    let tokens = xs.len();
    assert!(tokens > 0 && xs.groups() == rows.groups() && dots.len().is_multiple_of(tokens));
    let n = dots.len() / tokens;
    assert!(rows.len() >= n);
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Avx2 => {
            kernel.assert_supported();
            // SAFETY: the AVX2 path runs on this CPU (asserted).
            unsafe { x86_avx2::head::q6_dots_tokens(rows, xs, dots) };
            return;
        }
        Kernel::Avx512Bw => {
            kernel.assert_supported();
            // SAFETY: the AVX-512 BW path runs on this CPU (asserted).
            unsafe { x86_avx512::head::q6_dots_tokens_bw(rows, xs, dots) };
            return;
        }
        Kernel::Avx512Vnni => {
            kernel.assert_supported();
            // SAFETY: the VNNI path runs on this CPU (asserted).
            unsafe { x86_avx512::head::q6_dots_tokens_vnni(rows, xs, dots) };
            return;
        }
        _ => {}
    }
    if kernel == Kernel::Scalar || n == 0 {
        scalar::head::q6_dots(rows, xs, dots);
        return;
    }
    for (i, dots) in dots.chunks_exact_mut(n).enumerate() {
        q6_dots(kernel, rows, xs.token(i), dots);
    }
}
