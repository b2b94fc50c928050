//! The key/value cache of one sequence, preallocated for `n_ctx` positions,
//! in f32 or in IEEE half precision.

use crate::error::{Result, TritError};

/// What the cache stores keys and values as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision (as llama.cpp and bitnet.cpp keep their caches): half
    /// the bytes attention reads per generated token, so a long context slows
    /// generation half as much; keys and values are rounded to 11 bits.
    #[default]
    F16,
    /// Exactly the values computed: transformers' own attention inputs.
    F32,
}

impl KvType {
    pub const ALL: [KvType; 2] = [KvType::F16, KvType::F32];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        }
    }

    pub fn parse(name: &str) -> Result<KvType> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown KV cache type {name:?}; expected \"f16\" or \"f32\""
                ))
            })
    }
}

/// IEEE binary16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// The nearest half (ties to even), as `vcvtps2ph` rounds: overflow
    /// becomes infinity, tiny values subnormals or zero, NaN stays NaN.
    pub fn from_f32(x: f32) -> F16 {
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
            return F16(sign | 0x7c00 | nan);
        }
        let e = exp - 127 + 15; // the half's biased exponent
        if e >= 0x1f {
            return F16(sign | 0x7c00);
        }
        let (kept, shift) = if e <= 0 {
            // A subnormal half counts units of 2^-24; below 2^-25 all round to 0.
            if e < -10 {
                return F16(sign);
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
        F16(sign | h as u16)
    }

    /// The exact f32 value.
    #[inline]
    pub fn to_f32(self) -> f32 {
        super::tensor::f16_to_f32(self.0)
    }
}

/// `dst[i] = F16::from_f32(src[i])`, eight at a time with F16C's `vcvtps2ph`
/// where the CPU has it: the scalar conversion, a few branches per value, was
/// 1 % of a prompt's time, all of it on one thread.
pub fn halves_from_f32(dst: &mut [F16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (which implies AVX) was detected just above.
        unsafe { x86::halves_from_f32(dst, src) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F16::from_f32(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::F16;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support F16C; the slices have one length.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn halves_from_f32(dst: &mut [F16], src: &[f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            let halves = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(
                src.as_ptr().add(i),
            ));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), halves);
            i += 8;
        }
        for (d, &s) in dst[i..].iter_mut().zip(&src[i..]) {
            *d = F16::from_f32(s);
        }
    }
}

/// An element type the cache can hold.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl KvElement for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElement for F16 {
    #[inline]
    fn to_f32(self) -> f32 {
        F16::to_f32(self)
    }
}

/// Rows of keys or values of one KV head, [n, head_dim].
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [F16]),
}

#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<F16>),
}

impl Store {
    fn new(kind: KvType, len: usize) -> Store {
        // Zero pages from the allocator: memory is only touched as positions fill.
        match kind {
            KvType::F32 => Store::F32(vec![0.0; len]),
            KvType::F16 => Store::F16(vec![F16(0); len]),
        }
    }

    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            Store::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Store::F16(v) => halves_from_f32(&mut v[at..at + x.len()], x),
        }
    }

    fn rows(&self, at: usize, len: usize) -> KvRows<'_> {
        match self {
            Store::F32(v) => KvRows::F32(&v[at..at + len]),
            Store::F16(v) => KvRows::F16(&v[at..at + len]),
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
        }
    }
}

/// Keys and values of every layer, GQA-aware: one entry per *key/value* head,
/// not per query head.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_ctx: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kind: KvType,
    k: Store, // [layers, n_kv_heads, n_ctx, head_dim]
    v: Store, // [layers, n_kv_heads, n_ctx, head_dim]
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        n_ctx: usize,
        head_dim: usize,
        kind: KvType,
    ) -> Self {
        let len = n_layers * n_kv_heads * n_ctx * head_dim;
        KvCache {
            n_ctx,
            n_kv_heads,
            head_dim,
            kind,
            k: Store::new(kind, len),
            v: Store::new(kind, len),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kind(&self) -> KvType {
        self.kind
    }

    fn head_offset(&self, layer: usize, kv_head: usize) -> usize {
        (layer * self.n_kv_heads + kv_head) * self.n_ctx * self.head_dim
    }

    /// Stores the key and value of `kv_head` at `pos` (each [head_dim]).
    pub fn write(&mut self, layer: usize, kv_head: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.n_ctx);
        let at = self.head_offset(layer, kv_head) + pos * self.head_dim;
        self.k.write(at, &k[..self.head_dim]);
        self.v.write(at, &v[..self.head_dim]);
    }

    /// Keys of `kv_head` at positions 0..n, [n, head_dim].
    pub fn keys(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.k
            .rows(self.head_offset(layer, kv_head), n * self.head_dim)
    }

    /// Values of `kv_head` at positions 0..n, [n, head_dim].
    pub fn values(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.v
            .rows(self.head_offset(layer, kv_head), n * self.head_dim)
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.k.nbytes() + self.v.nbytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(rows: KvRows<'_>) -> Vec<f32> {
        match rows {
            KvRows::F32(v) => v.to_vec(),
            KvRows::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
        }
    }

    #[test]
    fn heads_and_layers_do_not_overlap() {
        for kind in KvType::ALL {
            let mut c = KvCache::new(2, 3, 4, 2, kind);
            c.write(1, 2, 3, &[1.0, 2.0], &[3.0, 4.0]);
            c.write(0, 0, 0, &[5.0, 6.0], &[7.0, 8.0]);
            assert_eq!(&f32s(c.keys(1, 2, 4))[6..], &[1.0, 2.0]);
            assert_eq!(&f32s(c.values(1, 2, 4))[6..], &[3.0, 4.0]);
            assert_eq!(f32s(c.keys(0, 0, 1)), &[5.0, 6.0]);
            assert_eq!(f32s(c.keys(0, 1, 4)), &[0.0; 8]);
            let size = if kind == KvType::F32 { 4 } else { 2 };
            assert_eq!(c.nbytes(), 2 * 2 * 3 * 4 * 2 * size);
        }
    }

    #[test]
    fn kv_types_parse_by_name() {
        assert_eq!(KvType::parse("f16").unwrap(), KvType::F16);
        assert_eq!(KvType::parse("f32").unwrap(), KvType::F32);
        assert!(KvType::parse("q8_0").is_err());
    }

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

    /// The slice conversion (F16C where present) equals the scalar one on
    /// every length's tail and every magnitude.
    #[test]
    fn slice_conversion_equals_the_scalar_one() {
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
            let mut got = vec![F16(0); len];
            halves_from_f32(&mut got, &src);
            let want: Vec<F16> = src.iter().map(|&x| F16::from_f32(x)).collect();
            assert_eq!(got, want, "length {len}");
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
        unsafe fn hardware(x: f32) -> u16 {
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
