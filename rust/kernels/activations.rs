//! Per-token int8 activation quantization, exactly as BitNet b1.58 defines it:
//! `s = 127 / max(absmax(x), 1e-5)`, `q = clamp(round_half_even(x * s), -128, 127)`,
//! all in f32, one division then one multiplication (transformers' order).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::packing::{blocks_for, BLOCK};
use super::tl::{tl_plane_chunks, to_plane_order};
use super::{aligned_scratch, CacheLine};
use crate::error::{Result, TritError};
use crate::memory::try_reserve_total;

/// Lower bound on a token's absmax, as in transformers (avoids dividing by zero).
pub const ABSMAX_FLOOR: f32 = 1e-5;

/// Batches of at least this many tokens are quantized in parallel.
const PARALLEL_TOKENS: usize = 8;

/// A batch of quantized tokens, laid out for the kernels.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    m: usize,
    k: usize,
    k_padded: usize,
    /// [m, k_padded] int8 codes, zero past k (zero padding keeps the padded
    /// weights' codes out of every sum). Stored in 64-byte lines so every
    /// token starts on a cache line and SIMD loads never split one.
    q: Vec<CacheLine>,
    /// [m] the multiplier `s` of each token: `x ≈ q / s`.
    scale: Vec<f32>,
    /// [m] Σ_k q[t, k]: the kernels subtract it to undo the `+1` of the weight codes.
    sum: Vec<i32>,
    /// [m, k_padded] the codes in a tl matrix's GEMM order (`tl_planes`),
    /// made by the first GEMM that asks; None inside if there was no memory.
    tl_planes: OnceLock<Option<Vec<CacheLine>>>,
}

/// Makes room in `q` for the codes of `m` tokens of `k_padded` (a multiple
/// of 64) and returns their count of cache lines: an error if they overflow
/// or cannot be allocated, since the sizes come from callers' arrays.
fn reserve_code_lines(q: &mut Vec<CacheLine>, m: usize, k_padded: usize) -> Result<usize> {
    let lines = m.checked_mul(k_padded / 64).ok_or_else(|| {
        TritError::invalid(format!(
            "activations of {m} tokens of {k_padded} features are too large to address"
        ))
    })?;
    try_reserve_total(q, lines, "the quantized activations")?;
    Ok(lines)
}

impl QuantizedActivations {
    /// Quantizes `x` ([m, k] row-major f32) token by token. Values must be finite.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Result<Self> {
        let mut out = QuantizedActivations::default();
        out.requantize(x, m, k)?;
        Ok(out)
    }

    /// As `quantize`, reusing this batch's buffers (no allocation once they are big enough).
    pub fn requantize(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        if m == 0 || k == 0 {
            return Err(TritError::invalid(format!(
                "activations need at least one token and one feature, got [{m}, {k}]"
            )));
        }
        if m.checked_mul(k) != Some(x.len()) {
            return Err(TritError::invalid(format!(
                "activations hold {} values, not m * k = {m} * {k}",
                x.len()
            )));
        }
        let k_padded = blocks_for(k) * BLOCK;
        let lines = reserve_code_lines(&mut self.q, m, k_padded)?;
        self.m = m;
        self.k = k;
        self.k_padded = k_padded;
        self.tl_planes = OnceLock::new();
        // No clearing: each token writes all of its row, padding included,
        // so a prompt batch leaves no serial pass over the buffer.
        self.q.resize(lines, CacheLine([0; 64]));
        self.scale.resize(m, 0.0);
        self.sum.resize(m, 0);
        // (token [k], its codes [k_padded]), (its multiplier, its code sum)
        type Work<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut f32, &'a mut i32));
        // Whether the token was finite (and so quantized).
        let quantize = |((token, q_row), (s, sum)): Work<'_>| -> bool {
            // A branch-free pass (it vectorizes); the position only on failure.
            if token.iter().fold(false, |bad, v| bad | !v.is_finite()) {
                return false;
            }
            (*s, *sum) = quantize_token(token, &mut q_row[..k]);
            q_row[k..].fill(0);
            true
        };
        let codes = as_codes_mut(&mut self.q);
        let finite = if m >= PARALLEL_TOKENS {
            // A prompt batch: tokens in parallel (on the caller's rayon pool).
            x.par_chunks_exact(k)
                .zip(codes.par_chunks_exact_mut(k_padded))
                .zip(self.scale.par_iter_mut().zip(self.sum.par_iter_mut()))
                .map(quantize)
                .reduce(|| true, |a, b| a & b)
        } else {
            x.chunks_exact(k)
                .zip(codes.chunks_exact_mut(k_padded))
                .zip(self.scale.iter_mut().zip(self.sum.iter_mut()))
                .map(quantize)
                .fold(true, |a, b| a & b)
        };
        if !finite {
            let pos = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(TritError::invalid(format!(
                "activation [{}, {}] is {}; activations must be finite",
                pos / k,
                pos % k,
                x[pos]
            )));
        }
        Ok(())
    }

    /// A batch from codes already quantized elsewhere: `codes` is [m, k], `scales` [m].
    pub fn from_codes(codes: &[i8], m: usize, k: usize, scales: &[f32]) -> Result<Self> {
        if m == 0 || k == 0 || m.checked_mul(k) != Some(codes.len()) || scales.len() != m {
            return Err(TritError::invalid(format!(
                "codes [{}] and scales [{}] do not make a batch of [{m}, {k}]",
                codes.len(),
                scales.len()
            )));
        }
        let k_padded = blocks_for(k) * BLOCK;
        let mut q = aligned_scratch(m * k_padded);
        for (row, src) in as_codes_mut(&mut q)
            .chunks_exact_mut(k_padded)
            .zip(codes.chunks_exact(k))
        {
            row[..k].copy_from_slice(src);
        }
        let sum = codes
            .chunks_exact(k)
            .map(|row| row.iter().map(|&v| i32::from(v)).sum())
            .collect();
        Ok(QuantizedActivations {
            m,
            k,
            k_padded,
            q,
            scale: scales.to_vec(),
            sum,
            tl_planes: OnceLock::new(),
        })
    }

    pub fn m(&self) -> usize {
        self.m
    }

    /// A copy of the tokens in `range`.
    pub fn tokens(&self, range: std::ops::Range<usize>) -> QuantizedActivations {
        assert!(range.start < range.end && range.end <= self.m);
        let lines_per_token = self.k_padded / 64;
        QuantizedActivations {
            m: range.len(),
            k: self.k,
            k_padded: self.k_padded,
            q: self.q[range.start * lines_per_token..range.end * lines_per_token].to_vec(),
            scale: self.scale[range.clone()].to_vec(),
            sum: self.sum[range].to_vec(),
            tl_planes: OnceLock::new(),
        }
    }

    /// The codes ([m, k_padded]) with each token's inputs in the order a GEMM
    /// reads a `Packing::Tl` matrix's (`tl::to_plane_order`), made on the
    /// first call and kept until the activations change, so that every tl
    /// matrix that takes them and every thread share one copy. None if there
    /// is no memory for them.
    pub fn tl_planes(&self) -> Option<&[i8]> {
        let lines = self.tl_planes.get_or_init(|| {
            let mut lines = Vec::new();
            try_reserve_total(&mut lines, self.q.len(), "the tl-ordered activations").ok()?;
            lines.resize(self.q.len(), CacheLine([0; 64]));
            let chunks = tl_plane_chunks(self.k, self.k_padded);
            for (src, dst) in self
                .codes()
                .chunks_exact(self.k_padded)
                .zip(as_codes_mut(&mut lines).chunks_exact_mut(self.k_padded))
            {
                to_plane_order(src, chunks, dst);
            }
            Some(lines)
        });
        lines.as_deref().map(as_codes)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn k_padded(&self) -> usize {
        self.k_padded
    }

    /// All codes, [m, k_padded].
    pub fn codes(&self) -> &[i8] {
        as_codes(&self.q)
    }

    /// The codes of token `t`, [k_padded].
    pub fn token(&self, t: usize) -> &[i8] {
        &self.codes()[t * self.k_padded..(t + 1) * self.k_padded]
    }

    /// [m] per-token multipliers.
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// [m] per-token code sums.
    pub fn sums(&self) -> &[i32] {
        &self.sum
    }
}

/// The bytes of `lines` as int8 codes.
fn as_codes(lines: &[CacheLine]) -> &[i8] {
    // SAFETY: the lines are plain bytes, and i8 has the size and alignment of u8.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<i8>(), lines.len() * 64) }
}

/// The bytes of `lines` as int8 codes, to write.
fn as_codes_mut(lines: &mut [CacheLine]) -> &mut [i8] {
    // SAFETY: the lines are plain bytes, i8 has the size and alignment of u8,
    // and the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<i8>(), lines.len() * 64) }
}

/// An int8 code: `clamp(round_half_even(v), -128, 127)`, with neither a libm
/// call nor a float-to-integer conversion, so that it vectorizes (the baseline
/// x86-64 target has no rounding instruction, and Rust's saturating `as` is a
/// branchy sequence). Adding 1.5 · 2^23 to |v| <= 128 leaves no fraction bits,
/// so IEEE addition itself rounds half to even, and the sum's low mantissa
/// bits are the rounded value. Clamping before rounding is the same, the
/// bounds being integers.
#[inline(always)]
pub(crate) fn int8_code(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23

    // max/min rather than clamp: NaN (excluded by the callers) cannot panic.
    #[allow(clippy::manual_clamp)]
    let v = v.max(-128.0).min(127.0);
    ((v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8
}

/// `clamp(round_half_even(v), lo, hi)` for a code narrower than int8 (a
/// ternarized weight, a q6 code), 0 for NaN (as `as` made it): `int8_code`'s
/// rounding, without the libm call `round_ties_even` is on the baseline
/// x86-64 target, once per weight of a model at load.
#[inline(always)]
pub(crate) fn clamped_code(v: f32, lo: i8, hi: i8) -> i8 {
    if v.is_nan() {
        0
    } else {
        int8_code(v).clamp(lo, hi)
    }
}

/// max |x_i| (0 for an empty slice; NaNs are passed over, as `f32::max` does).
/// Sixteen running maxima, so that the comparisons vectorize (a single chain
/// of `max` waits for each result); the largest is the same in any order.
#[inline]
pub(crate) fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v.abs());
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantizes one token into `q` (same length as `x`); returns its multiplier and code sum.
pub fn quantize_token(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    debug_assert_eq!(x.len(), q.len());
    let absmax = abs_max(x);
    let s = 127.0f32 / absmax.max(ABSMAX_FLOOR);
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // The clamp matters only for -128: |x * s| <= 127 up to rounding.
        let code = int8_code(xi * s);
        *qi = code;
        sum += i32::from(code);
    }
    (s, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_on_a_worked_example() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 1.0 / 254.0];
        let qa = QuantizedActivations::quantize(&x, 1, 5).unwrap();
        assert_eq!(qa.scales()[0], 127.0);
        // 0.5*127 = 63.5 -> 64 (half to even), 0.25*127 = 31.75 -> 32, 127/254 = 0.5 -> 0.
        assert_eq!(&qa.token(0)[..5], &[64, -127, 32, 0, 0]);
        assert_eq!(qa.sums()[0], 64 - 127 + 32);
        assert_eq!(qa.k_padded(), 256);
        assert!(qa.token(0)[5..].iter().all(|&v| v == 0));
    }

    #[test]
    fn int8_codes_round_half_even_and_saturate() {
        let mut v = -300.0f32;
        while v <= 300.0 {
            let want = v.round_ties_even().clamp(-128.0, 127.0) as i8;
            assert_eq!(int8_code(v), want, "{v}");
            v += 0.125;
        }
        for v in [0.49999997f32, -0.49999997, 127.5, -128.5, 126.5, 1e9, -1e9] {
            assert_eq!(
                int8_code(v),
                v.round_ties_even().clamp(-128.0, 127.0) as i8,
                "{v}"
            );
        }
    }

    #[test]
    fn requantizing_into_used_buffers_equals_a_fresh_batch() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 7.0;
        let mut reused =
            QuantizedActivations::quantize(&(0..9 * 700).map(value).collect::<Vec<_>>(), 9, 700)
                .unwrap();
        // Fewer tokens, a shorter row with the same padded length, then a longer batch.
        for (m, k) in [(3, 600), (10, 300), (12, 513)] {
            let x: Vec<f32> = (0..m * k).map(|i| value(i + m)).collect();
            reused.requantize(&x, m, k).unwrap();
            let fresh = QuantizedActivations::quantize(&x, m, k).unwrap();
            assert_eq!(reused.codes(), fresh.codes(), "[{m}, {k}]");
            assert_eq!(
                (reused.scales(), reused.sums()),
                (fresh.scales(), fresh.sums())
            );
        }
        // A bad value in a parallel batch is still named.
        let mut x = vec![1.0f32; 10 * 4];
        x[7 * 4 + 2] = f32::NAN;
        let err = reused.requantize(&x, 10, 4).unwrap_err().to_string();
        assert!(err.contains("[7, 2]"), "{err}");
    }

    #[test]
    fn all_zero_token_uses_the_floor() {
        let qa = QuantizedActivations::quantize(&[0.0; 3], 1, 3).unwrap();
        assert_eq!(qa.scales()[0], 127.0 / 1e-5);
        assert_eq!(qa.sums()[0], 0);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(QuantizedActivations::quantize(&[], 0, 4).is_err());
        assert!(QuantizedActivations::quantize(&[1.0; 3], 1, 4).is_err());
        assert!(QuantizedActivations::quantize(&[1.0, f32::NAN], 1, 2).is_err());
        assert!(QuantizedActivations::quantize(&[1.0, f32::INFINITY], 2, 1).is_err());
        assert!(QuantizedActivations::from_codes(&[1, 2, 3], 1, 2, &[1.0]).is_err());
        assert!(QuantizedActivations::from_codes(&[1, 2], 1, 2, &[]).is_err());
    }

    #[test]
    fn from_codes_pads_and_sums() {
        let qa =
            QuantizedActivations::from_codes(&[-128, 127, 5, 1, 2, 3], 2, 3, &[2.0, 3.0]).unwrap();
        assert_eq!(qa.sums(), &[4, 6]);
        assert_eq!(&qa.token(1)[..4], &[1, 2, 3, 0]);
        assert_eq!(qa.scales(), &[2.0, 3.0]);
    }
}
