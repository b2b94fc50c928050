//! The output head's dot products, dispatched by `Kernel`: int8 rows times
//! quantized activations (exact on every path) and bf16 rows times f32
//! activations (the same products on every path, added in a path's own
//! order). The matrix and its matvec are `model::dense`'s.

#[cfg(target_arch = "aarch64")]
use super::neon;
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
