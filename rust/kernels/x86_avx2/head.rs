//! AVX2 output-head dots: int8 and q6 rows times quantized activations
//! (exact, as `scalar::head::int8_dots` and `q6_dots`), and bf16 rows times f32 activations (FMA; the
//! same products as `scalar::head::bf16_dots`, added in another order). The
//! head is one long read per token, so both read their rows as three streams
//! (`driver::three_streams`).

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::q6::{
    band_start, blocks_for, row_bytes, Q6Rows, Q6Tokens, CODE_OFFSET, GROUP, GROUP_CODE_BYTES,
    SPAN_GROUPS,
};
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

/// `dots[r]` = the q6 dot of row r with the one token of `x`
/// (`scalar::head::q6_dot`, exactly), for the dots.len() first rows, read as
/// three streams.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn q6_dots(rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx2);
    assert!(x.len() == 1 && x.groups() == rows.groups() && rows.len() >= dots.len());
    let q6 = Q6RowDots {
        rows,
        x: x.codes(0),
        sums: x.sums(0),
    };
    // SAFETY: this function runs with AVX2; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&q6, dots) }
}

struct Q6RowDots<'a> {
    rows: Q6Rows<'a>,
    x: &'a [i8],     // [groups · GROUP]
    sums: &'a [i16], // [blocks_for(groups)]
}

impl RowDots for Q6RowDots<'_> {
    type Dot = i64;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i64; R] {
        let mut row_data = [&[][..]; R];
        for (d, &r) in row_data.iter_mut().zip(&rows) {
            *d = self.rows.row(r);
        }
        // SAFETY: the caller runs the AVX2 path.
        unsafe { q6_dots_of(&row_data, self.rows.groups(), self.x, self.sums) }
    }
}

/// The q6 dots of R rows (each `groups` groups) with one token, sharing
/// its loads: span by span (`q6::SPAN_GROUPS`), 32-bit lanes summed into
/// i64 at the end of each.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_dots_of<const R: usize>(
    rows: &[&[u8]; R],
    groups: usize,
    x: &[i8],
    sums: &[i16],
) -> [i64; R] {
    let code_bytes = groups * GROUP_CODE_BYTES;
    assert!(x.len() == groups * GROUP && sums.len() == blocks_for(groups));
    assert!(rows.iter().all(|row| row.len() == row_bytes(groups)));
    let mut dots = [0i64; R];
    for g0 in (0..groups).step_by(SPAN_GROUPS) {
        let g1 = (g0 + SPAN_GROUPS).min(groups);
        let mut acc = [_mm256_setzero_si256(); R];
        for g in g0..g1 {
            // SAFETY: group g's 64 values of x (asserted length).
            let xs = unsafe { load_q6_activations(x.as_ptr().add(g * GROUP)) };
            for (acc, row) in acc.iter_mut().zip(rows) {
                // SAFETY: each row holds `groups` groups' codes, then their
                // sub-scales (asserted length).
                let (codes, scales) = unsafe {
                    (
                        row.as_ptr().add(g * GROUP_CODE_BYTES),
                        row.as_ptr().add(code_bytes + band_start(g)),
                    )
                };
                _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(PREFETCH).cast());
                // SAFETY: as above.
                let (u, s) = unsafe { (q6_codes(codes), q6_sub_scales(scales)) };
                *acc = _mm256_add_epi32(*acc, q6_products(u, xs, s));
            }
        }
        let blocks = band_start(g0)..blocks_for(g1);
        for ((dot, acc), row) in dots.iter_mut().zip(acc).zip(rows) {
            let scales = &row[code_bytes..][blocks.clone()];
            *dot += widening_sum(acc)
                - i64::from(CODE_OFFSET) * i64::from(scaled_sums(scales, &sums[blocks.clone()]));
        }
    }
    dots
}

/// The dots of the tokens of `xs` with the n = dots.len() / tokens first
/// rows of `rows` (dots is [tokens, n]), as `q6_dots` gives each: row by
/// row, a group's codes decoded once for up to `Q6_TOKENS` tokens.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn q6_dots_tokens(rows: Q6Rows<'_>, xs: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx2);
    let tokens = xs.len();
    assert!(tokens > 0 && xs.groups() == rows.groups() && dots.len().is_multiple_of(tokens));
    let n = dots.len() / tokens;
    assert!(rows.len() >= n);
    for t0 in (0..tokens).step_by(Q6_TOKENS) {
        let nt = Q6_TOKENS.min(tokens - t0);
        for r in 0..n {
            macro_rules! run {
                ($nt:literal) => {{
                    let mut x = [&[][..]; $nt];
                    let mut sums = [&[][..]; $nt];
                    for i in 0..$nt {
                        x[i] = xs.codes(t0 + i);
                        sums[i] = xs.sums(t0 + i);
                    }
                    // SAFETY: this function runs with AVX2.
                    let got = unsafe { q6_tile::<$nt>(rows.row(r), rows.groups(), &x, &sums) };
                    for (i, &dot) in got.iter().enumerate() {
                        dots[(t0 + i) * n + r] = dot;
                    }
                }};
            }
            match nt {
                4 => run!(4),
                3 => run!(3),
                2 => run!(2),
                _ => run!(1),
            }
        }
    }
}

/// Tokens of a `q6_dots_tokens` tile: 4 accumulators, a group's two code
/// vectors and its sub-scales stay in registers beside the constants.
const Q6_TOKENS: usize = 4;

/// The q6 dots of one row with T tokens.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_tile<const T: usize>(
    row: &[u8],
    groups: usize,
    xs: &[&[i8]; T],
    sums: &[&[i16]; T],
) -> [i64; T] {
    let code_bytes = groups * GROUP_CODE_BYTES;
    assert!(row.len() == row_bytes(groups));
    assert!(xs.iter().all(|x| x.len() == groups * GROUP));
    assert!(sums.iter().all(|s| s.len() == blocks_for(groups)));
    let mut dots = [0i64; T];
    for g0 in (0..groups).step_by(SPAN_GROUPS) {
        let g1 = (g0 + SPAN_GROUPS).min(groups);
        let mut acc = [_mm256_setzero_si256(); T];
        for g in g0..g1 {
            // SAFETY: the row holds `groups` groups' codes, then their
            // sub-scales (asserted length).
            let (u, s) = unsafe {
                (
                    q6_codes(row.as_ptr().add(g * GROUP_CODE_BYTES)),
                    q6_sub_scales(row.as_ptr().add(code_bytes + band_start(g))),
                )
            };
            for (acc, x) in acc.iter_mut().zip(xs) {
                // SAFETY: group g's 64 values of each token (asserted lengths).
                let xv = unsafe { load_q6_activations(x.as_ptr().add(g * GROUP)) };
                *acc = _mm256_add_epi32(*acc, q6_products(u, xv, s));
            }
        }
        let blocks = band_start(g0)..blocks_for(g1);
        let scales = &row[code_bytes..][blocks.clone()];
        for ((dot, acc), sums) in dots.iter_mut().zip(acc).zip(sums) {
            *dot += widening_sum(acc)
                - i64::from(CODE_OFFSET) * i64::from(scaled_sums(scales, &sums[blocks.clone()]));
        }
    }
    dots
}

/// A q6 group's 64 activation codes: columns 0..31 and 32..63.
///
/// # Safety
/// The CPU must support AVX2; `x` begins 64 readable values.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_q6_activations(x: *const i8) -> [__m256i; 2] {
    // SAFETY: per the contract.
    unsafe {
        [
            _mm256_loadu_si256(x.cast()),
            _mm256_loadu_si256(x.add(32).cast()),
        ]
    }
}

/// A q6 group's 64 codes (u in 0..63, one a byte): columns 0..31 and 32..63.
/// The low nibbles by an AND (and a shift); the high bit pairs, their 16
/// bytes in both lanes, by a per-lane shift to bits 4-5 (left 4 and 2 for
/// columns 0-15 and 16-31, right 0 and 2 for 32-47 and 48-63: the pair
/// stays inside its byte) and an AND.
///
/// # Safety
/// The CPU must support AVX2; `group` begins the group's 48 code bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_codes(group: *const u8) -> [__m256i; 2] {
    // SAFETY: per the contract.
    let (low, high) = unsafe {
        (
            _mm256_loadu_si256(group.cast()),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(group.add(32).cast())),
        )
    };
    let (nibble, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let high_a = _mm256_sllv_epi32(high, _mm256_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2));
    let high_b = _mm256_srlv_epi32(high, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    [
        _mm256_or_si256(
            _mm256_and_si256(low, nibble),
            _mm256_and_si256(high_a, pair),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(low), nibble),
            _mm256_and_si256(high_b, pair),
        ),
    ]
}

/// A band's eight sub-scales as 16-bit lanes `[s0, s0, s1, s1, …, s7, s7]`:
/// lane j of a `vpmaddubsw` result holds columns 2j and 2j + 1 of a half
/// group, of block j / 2 (`q6::lane_of`).
///
/// # Safety
/// The CPU must support AVX2; `scales` begins 8 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_sub_scales(scales: *const u8) -> __m256i {
    // SAFETY: per the contract.
    let eight = unsafe { _mm_loadl_epi64(scales.cast()) };
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(eight, eight))
}

/// Σ s_b · u · x of a group in eight i32 lanes (8 columns each). The two
/// halves' `vpmaddubsw` pairs are added as i16 before scaling (columns c and
/// 32 + c are of one block): a lane then holds four products of the same
/// block, at most 4 · 63 · 128 = 32256.
#[inline]
#[target_feature(enable = "avx2")]
fn q6_products(u: [__m256i; 2], x: [__m256i; 2], scales: __m256i) -> __m256i {
    let pairs = _mm256_add_epi16(
        _mm256_maddubs_epi16(u[0], x[0]),
        _mm256_maddubs_epi16(u[1], x[1]),
    );
    _mm256_madd_epi16(pairs, scales)
}

/// Σ of eight i32 lanes, in i64.
#[inline]
#[target_feature(enable = "avx2")]
fn widening_sum(v: __m256i) -> i64 {
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` is 32 writable bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v) };
    lanes.iter().map(|&l| i64::from(l)).sum()
}

/// Σ_b s_b · X_b of a span's sub-scales and block sums (at most 256 terms
/// of at most 255 · 4096 in magnitude: an i32), 16 at a time.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn scaled_sums(scales: &[u8], sums: &[i16]) -> i32 {
    assert!(scales.len() == sums.len());
    let mut acc = _mm256_setzero_si256();
    let mut k = 0;
    while k + 16 <= scales.len() {
        // SAFETY: k + 16 <= len of both.
        let (s, x) = unsafe {
            (
                _mm256_cvtepu8_epi16(_mm_loadu_si128(scales.as_ptr().add(k).cast())),
                _mm256_loadu_si256(sums.as_ptr().add(k).cast()),
            )
        };
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, x));
        k += 16;
    }
    let tail: i32 = scales[k..]
        .iter()
        .zip(&sums[k..])
        .map(|(&s, &x)| i32::from(s) * i32::from(x))
        .sum();
    widening_sum(acc) as i32 + tail
}
