//! AVX2 output-head dots: int8 rows times quantized activations (exact, as
//! `scalar::head::int8_dots`), and bf16 rows times f32 activations (FMA; the
//! same products as `scalar::head::bf16_dots`, added in another order). The
//! head is one long read per token, so both read their rows as three streams
//! (`driver::three_streams`).

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::scalar;

/// Bytes of the head to prefetch ahead of the one being read: without a
/// software prefetch one stream stayed well under the read bandwidth
/// (docs/performance.md, "Output head").
const PREFETCH: usize = 2048;

/// `dots[r] = Σ_i rows[r·n + i] · x[i]` for the `dots.len()` consecutive rows
/// of n = x.len() values in `rows`: each row's products by
/// `vpmaddubsw(|a|, sign(x, a))`, exact because both sides are symmetric
/// int8 (|a|, |x| <= 127, so a pair is at most 2 · 127 · 127 = 32258 and fits
/// an i16), widened at once by `vpmaddwd`; 64 bytes a step, in two
/// independent chains per row.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn int8_dots(rows: &[i8], x: &[i8], dots: &mut [i32]) {
    counts::enter(Isa::Avx2);
    assert!(rows.len() >= dots.len() * x.len());
    // SAFETY: this function runs with AVX2; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&Int8Rows { rows, x }, dots) }
}

struct Int8Rows<'a> {
    rows: &'a [i8], // [>= dots, n]
    x: &'a [i8],    // [n]
}

impl RowDots for Int8Rows<'_> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let n = self.x.len();
        let mut starts = [std::ptr::null::<i8>(); R];
        for (p, &r) in starts.iter_mut().zip(&rows) {
            *p = self.rows[r * n..(r + 1) * n].as_ptr();
        }
        let mut dots = [0i32; R];
        // SAFETY: the caller runs the AVX2 path; each start begins n values of `rows`.
        unsafe { int8_dots_of(&starts, self.x, &mut dots) };
        dots
    }
}

/// The dots of R rows of `x.len()` values with `x`, sharing its loads.
///
/// # Safety
/// The CPU must support AVX2; each row pointer begins `x.len()` readable values.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn int8_dots_of<const R: usize>(rows: &[*const i8; R], x: &[i8], dots: &mut [i32; R]) {
    let (n, b) = (x.len(), x.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let mut j = 0;
    while j + 64 <= n {
        for a in rows {
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(j + PREFETCH).cast());
        }
        for h in 0..2 {
            // SAFETY: j + 32·h + 32 <= n values of x and of each row.
            let bv = unsafe { _mm256_loadu_si256(b.add(j + 32 * h).cast()) };
            for (acc, a) in acc.iter_mut().zip(rows) {
                // SAFETY: as above.
                let av = unsafe { _mm256_loadu_si256(a.add(j + 32 * h).cast()) };
                acc[h] = _mm256_add_epi32(acc[h], int8_products(av, bv, ones));
            }
        }
        j += 64;
    }
    if j + 32 <= n {
        // SAFETY: j + 32 <= n.
        let bv = unsafe { _mm256_loadu_si256(b.add(j).cast()) };
        for (acc, a) in acc.iter_mut().zip(rows) {
            // SAFETY: as above.
            let av = unsafe { _mm256_loadu_si256(a.add(j).cast()) };
            acc[0] = _mm256_add_epi32(acc[0], int8_products(av, bv, ones));
        }
        j += 32;
    }
    for ((dot, acc), &a) in dots.iter_mut().zip(acc).zip(rows) {
        let v = _mm256_add_epi32(acc[0], acc[1]);
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        // SAFETY: the row begins n readable values (the contract).
        let row = unsafe { std::slice::from_raw_parts(a, n) };
        *dot = _mm_cvtsi128_si32(s) + scalar::head::int8_dot(&row[j..], &x[j..]);
    }
}

/// Σ of the products a·b of four neighbouring pairs, in i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn int8_products(a: __m256i, b: __m256i, ones: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)),
        ones,
    )
}

/// `out[r] = Σ_j bf16(rows[r · n + j]) · x[j]` for the `out.len()`
/// consecutive rows of n = x.len() values in `rows`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn bf16_dots(rows: &[u16], x: &[f32], out: &mut [f32]) {
    counts::enter(Isa::Avx2);
    assert!(rows.len() >= out.len() * x.len());
    // SAFETY: this function runs with AVX2 and FMA; `rows` holds out.len() rows (asserted).
    unsafe { driver::three_streams(&Bf16Rows { rows, x }, out) }
}

struct Bf16Rows<'a> {
    rows: &'a [u16], // [>= out, n] bfloat16 bits
    x: &'a [f32],    // [n]
}

impl RowDots for Bf16Rows<'_> {
    type Dot = f32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [f32; R] {
        let n = self.x.len();
        let mut starts = [std::ptr::null::<u16>(); R];
        for (p, &r) in starts.iter_mut().zip(&rows) {
            *p = self.rows[r * n..(r + 1) * n].as_ptr();
        }
        let mut dots = [0.0f32; R];
        // SAFETY: the caller runs the AVX2 path (FMA included); each start
        // begins n values of `rows`.
        unsafe { bf16_dots_of(&starts, self.x, &mut dots) };
        dots
    }
}

/// Σ_j bf16(w[j]) · x[j] for R rows w of x.len() values, sharing the
/// loads of x: 32 products per step in four independent FMA chains a row.
///
/// # Safety
/// The CPU must support AVX2 and FMA; each row pointer begins `x.len()` readable values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_dots_of<const R: usize>(rows: &[*const u16; R], x: &[f32], out: &mut [f32; R]) {
    let (n, xp) = (x.len(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let mut j = 0;
    while j + 32 <= n {
        for &w in rows {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j + PREFETCH / 2).cast());
        }
        for l in 0..4 {
            // SAFETY: j + 8·l + 8 <= n values of x and of each row.
            let xs = unsafe { _mm256_loadu_ps(xp.add(j + 8 * l)) };
            for (acc, &w) in acc.iter_mut().zip(rows) {
                // SAFETY: as above.
                let half = unsafe { _mm_loadu_si128(w.add(j + 8 * l).cast()) };
                // bf16 is the top half of an f32: widen and shift into place.
                let wf = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)));
                acc[l] = _mm256_fmadd_ps(wf, xs, acc[l]);
            }
        }
        j += 32;
    }
    for ((total, acc), &w) in out.iter_mut().zip(&acc).zip(rows) {
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let quad = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        *total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
        // SAFETY: the row begins n readable values (the contract).
        let row = unsafe { std::slice::from_raw_parts(w, n) };
        for k in j..n {
            *total += scalar::head::bf16_value(row[k]) * x[k];
        }
    }
}
