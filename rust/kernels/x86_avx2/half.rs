//! f32 → IEEE half with F16C's `vcvtps2ph` (round to nearest even, as
//! `scalar::half::f16_bits`).

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::half::F16;

/// `dst[i] = F16::from_f32(src[i])`, eight at a time.
///
/// # Safety
/// The CPU must support AVX and F16C.
#[target_feature(enable = "avx,f16c")]
pub(crate) unsafe fn halves_from_f32(dst: &mut [F16], src: &[f32]) {
    counts::enter(Isa::Avx2);
    assert_eq!(dst.len(), src.len());
    let n = dst.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n values of src, and of dst (F16 is a transparent u16).
        unsafe {
            let halves = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(
                src.as_ptr().add(i),
            ));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), halves);
        }
        i += 8;
    }
    for (d, &s) in dst[i..].iter_mut().zip(&src[i..]) {
        *d = F16::from_f32(s);
    }
}
