//! IEEE half precision, the KV cache's default element: the `F16` type and
//! the f32 → f16 conversion of whole rows, dispatched by `Kernel`.

use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::x86_avx2;
use super::Kernel;

/// IEEE binary16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// The nearest half (ties to even), as `vcvtps2ph` rounds: overflow
    /// becomes infinity, tiny values subnormals or zero, NaN stays NaN.
    pub fn from_f32(x: f32) -> F16 {
        F16(scalar::half::f16_bits(x))
    }

    /// The exact f32 value.
    #[inline]
    pub fn to_f32(self) -> f32 {
        crate::checkpoint::f16_to_f32(self.0)
    }
}

/// `dst[i] = F16::from_f32(src[i])`: eight at a time with F16C's
/// `vcvtps2ph` on the x86-64 SIMD paths (the scalar conversion, a few
/// branches per value, shows in a prompt's time: docs/performance.md).
pub fn halves_from_f32(kernel: Kernel, dst: &mut [F16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has F16C.
        unsafe { x86_avx2::half::halves_from_f32(dst, src) };
        return;
    }
    let _ = kernel;
    scalar::half::halves_from_f32(dst, src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_half_survives_the_round_trip() {
        for bits in 0..=u16::MAX {
            let h = F16(bits);
            let x = h.to_f32();
            if x.is_nan() {
                assert!(F16::from_f32(x).to_f32().is_nan());
            } else {
                assert_eq!(F16::from_f32(x), h, "{bits:#06x}");
            }
        }
    }

    #[test]
    fn rounding_to_half_is_to_nearest_even() {
        // Halfway between 1 and the next half (1 + 2^-10) goes to 1 (even);
        // halfway between 1 + 2^-10 and 1 + 2^-9 goes up to the even one.
        assert_eq!(F16::from_f32(1.0 + 2f32.powi(-11)).0, 0x3c00);
        assert_eq!(F16::from_f32(1.0 + 3.0 * 2f32.powi(-11)).0, 0x3c02);
        assert_eq!(
            F16::from_f32(1.0 + 2f32.powi(-11) + 2f32.powi(-20)).0,
            0x3c01
        );
        assert_eq!(F16::from_f32(65520.0).0, 0x7c00); // rounds up to infinity
        assert_eq!(F16::from_f32(65519.0).0, 0x7bff);
        assert_eq!(F16::from_f32(2f32.powi(-25)).0, 0); // a tie, to even zero
        assert_eq!(F16::from_f32(2f32.powi(-25) * 1.5).0, 1);
        assert_eq!(F16::from_f32(-2f32.powi(-24)).0, 0x8001);
        assert_eq!(F16::from_f32(f32::NEG_INFINITY).0, 0xfc00);
    }

    /// Every path's slice conversion equals the scalar one, on every
    /// length's tail and every magnitude, bit for bit.
    #[test]
    fn every_path_converts_slices_as_scalar_does() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u32
        };
        for len in 0..40 {
            let src: Vec<f32> = (0..len)
                .map(|i| {
                    let r = next();
                    // Subnormal halves to overflow, and random bit patterns.
                    let bits = (r & 0x807f_ffff) | ((100 + (r >> 8) % 60) << 23);
                    f32::from_bits(if i % 3 == 0 { r & 0xff7f_ffff } else { bits })
                })
                .collect();
            let want: Vec<F16> = src.iter().map(|&x| F16::from_f32(x)).collect();
            for kernel in Kernel::supported() {
                let mut got = vec![F16(0); len];
                halves_from_f32(kernel, &mut got, &src);
                assert_eq!(got, want, "{kernel}, length {len}");
            }
        }
    }

    /// The conversion matches the CPU's own (`vcvtps2ph`, round to nearest
    /// even) on values of every magnitude.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn conversion_matches_the_hardware() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("f16c") {
            return;
        }
        #[target_feature(enable = "f16c")]
        fn hardware(x: f32) -> u16 {
            let h = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set1_ps(x));
            _mm_extract_epi16::<0>(h) as u16
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..2_000_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Every exponent from subnormal to overflow, and every rounding case.
            let bits = if i % 2 == 0 {
                state as u32
            } else {
                ((state as u32) & 0x807f_ffff) | ((100 + i % 60) << 23)
            };
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            // SAFETY: F16C was detected above.
            let want = unsafe { hardware(x) };
            assert_eq!(F16::from_f32(x).0, want, "{x:e} ({bits:#010x})");
        }
    }
}
