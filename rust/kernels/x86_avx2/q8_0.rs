//! q8_0 quantization with AVX2: `scalar::q8_0::quantize_block` eight lanes
//! at a time, with the same maximum, scale and rounding, so the blocks agree
//! bit for bit.

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::q8_0::{BlockQ8_0, Q8_0_VALUES};
use crate::kernels::scalar::q8_0 as scalar;

/// `scalar::q8_0::quantize`.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn quantize(dst: &mut [BlockQ8_0], src: &[f32]) {
    counts::enter(Isa::Avx2);
    assert_eq!(src.len(), dst.len() * Q8_0_VALUES);
    for (block, x) in dst.iter_mut().zip(src.chunks_exact(Q8_0_VALUES)) {
        *block = quantize_block(x);
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn quantize_block(x: &[f32]) -> BlockQ8_0 {
    assert_eq!(x.len(), Q8_0_VALUES);
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: x holds 32 values: four loads of eight.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
    // max(|x|, m) keeps m where x is NaN, as `scalar::q8_0::block_amax`;
    // the maximum of the rest does not depend on the order.
    let mut m = _mm256_setzero_ps();
    for &vi in &v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
    }
    let quad = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    let amax = _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
    let (d, inverse) = scalar::block_scale(amax);
    let inverse = _mm256_set1_ps(inverse);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let codes = v.map(|vi| {
        let t = _mm256_mul_ps(vi, inverse);
        // Half away from zero, exactly: the truncation, plus ±1 where the
        // dropped fraction (t - trunc(t), exact) is at least one half.
        let whole = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
        let fraction = _mm256_andnot_ps(sign, _mm256_sub_ps(t, whole));
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(fraction, half);
        let step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(t, sign), one));
        let rounded = _mm256_add_ps(whole, step);
        // NaN (an unordered lane) becomes 0, as `as i8` makes it.
        let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(t, t);
        _mm256_cvttps_epi32(_mm256_and_ps(rounded, ordered))
    });
    // Codes are within [-127, 127] (`scalar::q8_0::block_scale`): the
    // saturating packs keep them; the packs interleave 128-bit lanes, which
    // the permutation undoes.
    let words_lo = _mm256_packs_epi32(codes[0], codes[1]);
    let words_hi = _mm256_packs_epi32(codes[2], codes[3]);
    let bytes = _mm256_packs_epi16(words_lo, words_hi);
    let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut block = BlockQ8_0 {
        d,
        qs: [0; Q8_0_VALUES],
    };
    // SAFETY: qs holds 32 bytes.
    unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), ordered) };
    block
}
