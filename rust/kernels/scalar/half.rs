//! f32 → IEEE half conversion: the definition `vcvtps2ph` is tested against.

use crate::kernels::half::F16;

/// The bits of the half nearest `x` (ties to even): overflow becomes
/// infinity, tiny values subnormals or zero, NaN stays NaN.
pub fn f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        // Infinity, or a quiet NaN keeping the top of the payload.
        let nan = if mant != 0 {
            0x200 | (mant >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15; // the half's biased exponent
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let (kept, shift) = if e <= 0 {
        // A subnormal half counts units of 2^-24; below 2^-25 all round to 0.
        if e < -10 {
            return sign;
        }
        (mant | 0x80_0000, (14 - e) as u32)
    } else {
        ((e as u32) << 23 | mant, 13)
    };
    let mut h = kept >> shift;
    let rest = kept & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rest > half || (rest == half && h & 1 == 1) {
        h += 1; // a carry into the exponent is the right answer too
    }
    sign | h as u16
}

/// `dst[i] = F16::from_f32(src[i])`.
pub fn halves_from_f32(dst: &mut [F16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F16::from_f32(s);
    }
}
