//! AVX-512 output-head dots: int8 rows with VNNI for several tokens at once
//! (a batched decode step asks for the logits of every sequence: the head is
//! read from memory once per step, and each 64 bytes of a row, once loaded,
//! multiply every token's activations), and q6 rows (`kernels::q6`) for one
//! token (three streams) and for several (2 × 4 tiles summing each band in
//! 32-bit lanes, `q6_tile`), with VNNI or without it. The q6 bodies are
//! `#[inline(always)]` generic over VNNI for the reason given in
//! `x86_avx512::ternary`.
//!
//! For int8 rows: `vpdpbusd` multiplies u8 by i8, and both the head's codes
//! and the activations are signed: a row's codes are flipped to `w + 128` (u8, one
//! `vpxorq` per 64 bytes) and the excess `128 · Σx` is subtracted once per
//! token at the end. Every product and sum is an integer well inside i32
//! (|Σ| <= 255 · 127 · n), so the dots are exactly the scalar ones.

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::q6::{
    band_start, blocks_for, row_bytes, Q6Rows, Q6Tokens, BAND_GROUPS, BLOCKS_PER_BAND, CODE_OFFSET,
    GROUP, GROUP_CODE_BYTES, SPAN_GROUPS,
};
use crate::kernels::{x86_avx2, x86_avx512};

/// Tiles: 4 rows × 4 tokens (16 accumulators, 4 row and 4 token operands)
/// for up to four tokens, 2 rows × 8 tokens (16 accumulators, 2 row and 8
/// token operands) for more: eight tokens' dots are then taken in one pass
/// over the rows, which come from memory once, rather than in two passes of
/// which the second reads them back from L2 while memory idles.
const ROWS: usize = 4;
const TOKENS: usize = 4;
const WIDE_ROWS: usize = 2;
const WIDE_TOKENS: usize = 8;
/// The accumulator block every tile fills: [ROWS.max(WIDE_ROWS), TOKENS.max(WIDE_TOKENS)].
type TileDots = [[i32; WIDE_TOKENS]; ROWS];

/// Rows of the head ahead of the tile being read that it prefetches, into
/// L2: the head streams from memory, and prefetching into L1 held too few
/// lines in flight (the L1 has fewer miss buffers than L2) to keep up with
/// a tile's compute.
const PREFETCH_ROWS: usize = 24;

/// `dots[i · rows + r] = Σ_k head[r · n + k] · xs[i · n + k]` for the
/// `dots.len() / tokens` consecutive rows of n = `xs.len() / tokens` int8 values
/// in `head`, and `tokens` token rows in `xs` ([tokens, n]); `dots` is [tokens, rows].
///
/// Token tile by token tile: the first reads the rows from memory (and
/// prefetches them), the others from cache (a call's rows are a head task's,
/// sized to stay in L2).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn int8_dots_tokens_vnni(
    head: &[i8],
    xs: &[i8],
    tokens: usize,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    assert!(tokens > 0 && xs.len().is_multiple_of(tokens) && dots.len().is_multiple_of(tokens));
    let (n, rows) = (xs.len() / tokens, dots.len() / tokens);
    assert!(head.len() >= rows * n);
    let mut t0 = 0;
    while t0 < tokens {
        let wide = tokens - t0 > TOKENS;
        let (tile_rows, tile_tokens) = if wide {
            (WIDE_ROWS, WIDE_TOKENS)
        } else {
            (ROWS, TOKENS)
        };
        let nt = tile_tokens.min(tokens - t0);
        // 128 · Σx of each token: what flipping the codes to w + 128 added.
        let mut excess = [0i32; WIDE_TOKENS];
        for (i, e) in excess.iter_mut().enumerate().take(nt) {
            let x = &xs[(t0 + i) * n..(t0 + i + 1) * n];
            *e = 128 * x.iter().map(|&v| i32::from(v)).sum::<i32>();
        }
        for r0 in (0..rows).step_by(tile_rows) {
            let nr = tile_rows.min(rows - r0);
            let operands = Operands {
                // SAFETY: r0 < rows, inside head's rows·n values.
                rows: unsafe { head.as_ptr().add(r0 * n) },
                // SAFETY: t0 < tokens, inside xs.
                xs: unsafe { xs.as_ptr().add(t0 * n) },
                n,
                prefetch: t0 == 0,
            };
            let mut tile: TileDots = [[0; WIDE_TOKENS]; ROWS];
            macro_rules! run {
                ($nr:literal, $nt:literal) => {
                    // SAFETY: this function runs with AVX-512 F, BW and
                    // VNNI; rows r0..r0 + nr and tokens t0..t0 + nt exist.
                    unsafe { tile_dots::<$nr, $nt>(operands, &mut tile) }
                };
            }
            if wide {
                crate::kernels::driver::tile_2x8!(nr, nt, run);
            } else {
                crate::kernels::driver::tile_4x4!(nr, nt, run);
            }
            for (j, tile_row) in tile.iter().enumerate().take(nr) {
                for (i, &dot) in tile_row.iter().enumerate().take(nt) {
                    dots[(t0 + i) * rows + r0 + j] = dot - excess[i];
                }
            }
        }
        t0 += nt;
    }
}

/// One tile's operands: NR consecutive rows and NT consecutive tokens of n values.
#[derive(Clone, Copy)]
struct Operands {
    rows: *const i8, // [NR, n]
    xs: *const i8,   // [NT, n]
    n: usize,
    /// Whether to prefetch the rows PREFETCH_ROWS on (the first token tile
    /// of a row tile reads the rows from memory; the others from cache).
    prefetch: bool,
}

/// `out[j][i] = Σ_k (rows[j·n + k] + 128) · xs[i·n + k]`.
///
/// # Safety
/// AVX-512 F, BW and VNNI; the operands hold NR rows and NT tokens of n values.
#[inline(always)]
unsafe fn tile_dots<const NR: usize, const NT: usize>(ops: Operands, out: &mut TileDots) {
    let Operands {
        rows,
        xs,
        n,
        prefetch,
    } = ops;
    // SAFETY: per the contract (AVX-512 F, BW and VNNI); every load is
    // masked to the n values of a row or token; a prefetch never faults.
    unsafe {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); NT]; NR];
        // 64 columns from k on, each vector read by `$load` (plain, or
        // masked to the rows' tail).
        macro_rules! columns {
            ($k:expr, $load:expr) => {{
                let k = $k;
                if prefetch {
                    for j in 0..NR {
                        let ahead = rows.wrapping_add((PREFETCH_ROWS + j) * n + k);
                        _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                    }
                }
                let mut x = [_mm512_setzero_si512(); NT];
                for (i, x) in x.iter_mut().enumerate() {
                    *x = $load(xs.add(i * n + k));
                }
                for j in 0..NR {
                    let w = _mm512_xor_si512($load(rows.add(j * n + k)), flip);
                    for i in 0..NT {
                        acc[j][i] = _mm512_dpbusd_epi32(acc[j][i], w, x[i]);
                    }
                }
            }};
        }
        let whole = n - n % 64;
        for k in (0..whole).step_by(64) {
            columns!(k, |at: *const i8| _mm512_loadu_si512(at.cast()));
        }
        if whole < n {
            // Lanes past n load as 0: a flipped 0 (128) times an activation 0 adds nothing.
            let mask: __mmask64 = (1u64 << (n - whole)) - 1;
            columns!(whole, |at: *const i8| _mm512_maskz_loadu_epi8(mask, at));
        }
        // Sixteen accumulators (a full tile) in one transposing tree.
        let sums = x86_avx512::ternary::tile_sums(&acc);
        for (out, sums) in out.iter_mut().zip(&sums) {
            out[..NT].copy_from_slice(sums);
        }
    }
}

/// The q6 dots of a group of 64 columns in 16 i32 lanes (4 columns each):
/// `vpmaddubsw` pairs of one block each, times the band's sub-scales
/// (`q6_sub_scales`): `vpdpwssd` with VNNI, else `vpmaddwd` + add.
///
/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
unsafe fn q6_step<const VNNI: bool>(
    acc: __m512i,
    codes: __m512i,
    x: __m512i,
    scales: __m512i,
) -> __m512i {
    // SAFETY: per the contract.
    unsafe {
        let pairs = _mm512_maddubs_epi16(codes, x);
        if VNNI {
            _mm512_dpwssd_epi32(acc, pairs, scales)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, scales))
        }
    }
}

/// A q6 group's 64 codes (u in 0..63), one a byte in column order: the low
/// nibbles, in both halves, shifted down by 4 in the upper one; the high bit
/// pairs, in every 16-byte lane, rotated to bits 4-5 (by 4, 2, 0 and 30 for
/// columns 0-15, 16-31, 32-47 and 48-63: a pair stays inside its byte);
/// `(nibbles & 0x0F) | pairs` in one `vpternlogd`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `group` begins the group's 48 code bytes.
#[inline(always)]
unsafe fn q6_codes(group: *const u8) -> __m512i {
    // SAFETY: per the contract.
    unsafe {
        let low = _mm512_broadcast_i64x4(_mm256_loadu_si256(group.cast()));
        let nibbles = _mm512_mask_srli_epi16::<4>(low, 0xFFFF_0000, low);
        let high = _mm512_broadcast_i32x4(_mm_loadu_si128(group.add(32).cast()));
        let rotations = _mm512_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0, 30, 30, 30, 30);
        let pairs = _mm512_and_si512(_mm512_rolv_epi32(high, rotations), _mm512_set1_epi8(0x30));
        // 0xEC: (A & C) | B, bit by bit.
        _mm512_ternarylogic_epi32::<0xEC>(nibbles, pairs, _mm512_set1_epi8(0x0F))
    }
}

/// A band's eight sub-scales as 16-bit lanes `[s0, s0, s1, s1, …, s7, s7]`
/// in both halves: lane j of a `vpmaddubsw` result holds columns 2j and
/// 2j + 1, of block (j / 2) % 8 (`q6::lane_of`).
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `scales` begins 8 readable bytes.
#[inline(always)]
unsafe fn q6_sub_scales(scales: *const u8) -> __m512i {
    // SAFETY: per the contract.
    unsafe {
        let eight = _mm_loadl_epi64(scales.cast());
        _mm512_broadcast_i64x4(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(eight, eight)))
    }
}

/// Σ of sixteen i32 lanes, in i64: widened in two halves and reduced in
/// vector registers, not through memory and sixteen scalar adds (a tile
/// takes one per row and token).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn widening_sum(v: __m512i) -> i64 {
    // SAFETY: per the contract.
    unsafe {
        let low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
        let high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(v));
        _mm512_reduce_add_epi64(_mm512_add_epi64(low, high))
    }
}

/// `dots[r]` = the q6 dot of row r with the one token of `x`
/// (`scalar::head::q6_dot`, exactly), for the dots.len() first rows, read as
/// three streams.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn q6_dots_vnni(rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI.
    unsafe { q6_dots_with::<true>(rows, x, dots) }
}

/// `q6_dots_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn q6_dots_bw(rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW.
    unsafe { q6_dots_with::<false>(rows, x, dots) }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
unsafe fn q6_dots_with<const VNNI: bool>(rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    assert!(x.len() == 1 && x.groups() == rows.groups() && rows.len() >= dots.len());
    let q6 = Q6RowDots::<VNNI> {
        rows,
        x: x.codes(0),
        sums: x.sums(0),
    };
    // SAFETY: per the contract; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&q6, dots) }
}

struct Q6RowDots<'a, const VNNI: bool> {
    rows: Q6Rows<'a>,
    x: &'a [i8],     // [groups · GROUP]
    sums: &'a [i16], // [blocks_for(groups)]
}

impl<const VNNI: bool> RowDots for Q6RowDots<'_, VNNI> {
    type Dot = i64;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i64; R] {
        let groups = self.rows.groups();
        let code_bytes = groups * GROUP_CODE_BYTES;
        let mut starts = [std::ptr::null::<u8>(); R];
        for (p, &r) in starts.iter_mut().zip(&rows) {
            *p = self.rows.row(r).as_ptr();
        }
        assert!(self.x.len() == groups * GROUP && self.sums.len() == blocks_for(groups));
        let mut dots = [0i64; R];
        for g0 in (0..groups).step_by(SPAN_GROUPS) {
            let g1 = (g0 + SPAN_GROUPS).min(groups);
            // SAFETY: the caller runs this path (AVX-512 F).
            let mut acc = [unsafe { _mm512_setzero_si512() }; R];
            for g in g0..g1 {
                // SAFETY: the caller runs this path (AVX-512 F and BW, VNNI
                // if VNNI); x holds the groups' 64 values each (asserted) and
                // each row (from `Q6Rows::row`) the groups' codes, then their
                // sub-scales.
                unsafe {
                    let x = _mm512_loadu_si512(self.x.as_ptr().add(g * GROUP).cast());
                    for (acc, &row) in acc.iter_mut().zip(&starts) {
                        let codes = row.add(g * GROUP_CODE_BYTES);
                        _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(PREFETCH).cast());
                        let scales = q6_sub_scales(row.add(code_bytes + band_start(g)));
                        *acc = q6_step::<VNNI>(*acc, q6_codes(codes), x, scales);
                    }
                }
            }
            let blocks = band_start(g0)..blocks_for(g1);
            for ((dot, acc), &r) in dots.iter_mut().zip(acc).zip(&rows) {
                let scales = &self.rows.scales(r)[blocks.clone()];
                // SAFETY: the caller runs this path, with AVX-512 F (and so AVX2).
                let (sum, corrected) = unsafe {
                    (
                        widening_sum(acc),
                        x86_avx2::head::scaled_sums(scales, &self.sums[blocks.clone()]),
                    )
                };
                *dot += sum - i64::from(CODE_OFFSET) * i64::from(corrected);
            }
        }
        dots
    }
}

/// Bytes of a row ahead of the one being read that the single-token q6
/// dots prefetch (as the AVX2 head dots do).
const PREFETCH: usize = 2048;

/// The dots of the tokens of `xs` with the n = dots.len() / tokens first
/// rows of `rows` (dots is [tokens, n]), as `q6_dots_vnni` gives each:
/// tiles of 2 rows × 8 tokens (`q6_tile`), each group of a row decoded once
/// per tile. Token tile by token tile: the first reads the rows from memory
/// (and prefetches them), the others from cache (a call's rows are a head
/// task's, sized to stay in L2).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn q6_dots_tokens_vnni(rows: Q6Rows<'_>, xs: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI.
    unsafe { q6_dots_tokens_with::<true>(rows, xs, dots) }
}

/// `q6_dots_tokens_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn q6_dots_tokens_bw(rows: Q6Rows<'_>, xs: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW.
    unsafe { q6_dots_tokens_with::<false>(rows, xs, dots) }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
unsafe fn q6_dots_tokens_with<const VNNI: bool>(
    rows: Q6Rows<'_>,
    xs: Q6Tokens<'_>,
    dots: &mut [i64],
) {
    let tokens = xs.len();
    assert!(tokens > 0 && xs.groups() == rows.groups() && dots.len().is_multiple_of(tokens));
    let (n, groups) = (dots.len() / tokens, rows.groups());
    assert!(rows.len() >= n);
    let row_bytes = row_bytes(groups);
    let bands = groups.div_ceil(BAND_GROUPS);
    let offsets = band_offsets(xs);
    for t0 in (0..tokens).step_by(Q6_TOKENS) {
        let nt = Q6_TOKENS.min(tokens - t0);
        for r0 in (0..n).step_by(Q6_ROWS) {
            let nr = Q6_ROWS.min(n - r0);
            let operands = Q6Operands {
                rows: rows.row(r0).as_ptr(),
                row_bytes,
                xs: xs.codes(t0).as_ptr(),
                offsets: offsets[t0 * bands..].as_ptr(),
                groups,
                prefetch: t0 == 0,
            };
            let mut tile = [[0i64; WIDE_TOKENS]; WIDE_ROWS];
            macro_rules! run {
                ($nr:literal, $nt:literal) => {
                    // SAFETY: per the contract; rows r0..r0 + nr and tokens
                    // t0..t0 + nt exist (each token's codes and offsets
                    // follow the last's).
                    unsafe { q6_tile::<$nr, $nt, VNNI>(operands, &mut tile) }
                };
            }
            crate::kernels::driver::tile_2x8!(nr, nt, run);
            for (j, tile_row) in tile.iter().enumerate().take(nr) {
                for (i, &dot) in tile_row.iter().enumerate().take(nt) {
                    dots[(t0 + i) * n + r0 + j] = dot;
                }
            }
        }
    }
}

/// What a q6 tile's band accumulators start from, [tokens, bands] of 16
/// lanes: lane l (l < 8) −32 · X_l, the token's sum over block l
/// (`Q6Tokens::sums`), and lanes 8..16 zero. Lanes l and l + 8 both hold
/// block l's columns and are scaled alike, so the band then sums
/// Σ (u − 32) · x per block.
fn band_offsets(xs: Q6Tokens<'_>) -> Vec<[i32; 16]> {
    let bands = xs.groups().div_ceil(BAND_GROUPS);
    let mut offsets = vec![[0i32; 16]; xs.len() * bands];
    for (i, token) in offsets.chunks_exact_mut(bands).enumerate() {
        for (lanes, sums) in token
            .iter_mut()
            .zip(xs.sums(i).chunks_exact(BLOCKS_PER_BAND))
        {
            for (lane, &sum) in lanes.iter_mut().zip(sums) {
                *lane = -CODE_OFFSET * i32::from(sum);
            }
        }
    }
    offsets
}

/// The q6 tile: `Q6_ROWS` rows × `Q6_TOKENS` tokens, each with a band
/// accumulator and a span total in registers.
const Q6_ROWS: usize = 2;
const Q6_TOKENS: usize = 4;

/// One q6 tile's operands: NR consecutive rows and NT consecutive tokens.
#[derive(Clone, Copy)]
struct Q6Operands {
    rows: *const u8, // [NR, row_bytes]
    row_bytes: usize,
    xs: *const i8,             // [NT, groups · GROUP]
    offsets: *const [i32; 16], // [NT, bands] band lanes' −32 · Σx
    groups: usize,
    /// Whether to prefetch the rows PREFETCH_ROWS on (into L2, as the
    /// int8 tiles do).
    prefetch: bool,
}

/// `out[j][i] = Σ s_b · (u − 32) · x` over row j and token i: the q6 dot.
/// Band by band (`q6::BAND_GROUPS`): the codes times the activations summed
/// as plain u8 · i8 dots in 32-bit lanes (`vpdpbusd`, or `vpmaddubsw` +
/// `vpmaddwd`), lanes l and l + 8 of block l, lane l starting from the
/// block's `−32 · X_l` (`band_offsets`), then times its block's sub-scale
/// (`vpmulld`) into the span's totals: one multiply per lane a band, where
/// scaling each group's pairs (as the one-token dots do) costs a second
/// instruction per group and token. A band's lane holds at most its own 16
/// columns' (u − 32) · x plus 32 times the other lane's 16 activations,
/// 16 · 32 · 128 + 32 · 16 · 128 = 131072 in magnitude; a span's total lane
/// at most 32 bands of that times 255, below 2^31 (`q6::SPAN_GROUPS`).
///
/// # Safety
/// AVX-512 F and BW, and VNNI if `VNNI`; the operands hold NR rows and NT
/// tokens of `groups` groups.
#[inline(always)]
unsafe fn q6_tile<const NR: usize, const NT: usize, const VNNI: bool>(
    ops: Q6Operands,
    out: &mut [[i64; WIDE_TOKENS]; WIDE_ROWS],
) {
    let Q6Operands {
        rows,
        row_bytes,
        xs,
        offsets,
        groups,
        prefetch,
    } = ops;
    let (code_bytes, n) = (groups * GROUP_CODE_BYTES, groups * GROUP);
    let bands = groups.div_ceil(BAND_GROUPS);
    // SAFETY: per the contract; every load is inside row j's codes and
    // sub-scales or token i's codes; a prefetch never faults.
    unsafe {
        for g0 in (0..groups).step_by(SPAN_GROUPS) {
            let g1 = (g0 + SPAN_GROUPS).min(groups);
            let mut total = [[_mm512_setzero_si512(); NT]; NR];
            for b0 in (g0..g1).step_by(BAND_GROUPS) {
                let mut acc = [[_mm512_setzero_si512(); NT]; NR];
                for i in 0..NT {
                    let start = offsets.add(i * bands + b0 / BAND_GROUPS);
                    let start = _mm512_loadu_si512(start.cast());
                    for acc in acc.iter_mut() {
                        acc[i] = start;
                    }
                }
                for g in b0..(b0 + BAND_GROUPS).min(g1) {
                    let mut x = [_mm512_setzero_si512(); NT];
                    for (i, x) in x.iter_mut().enumerate() {
                        *x = _mm512_loadu_si512(xs.add(i * n + g * GROUP).cast());
                    }
                    for j in 0..NR {
                        let row = rows.add(j * row_bytes);
                        if prefetch {
                            let ahead = (PREFETCH_ROWS + j) * row_bytes + g * GROUP_CODE_BYTES;
                            _mm_prefetch::<_MM_HINT_T1>(rows.wrapping_add(ahead).cast());
                        }
                        let codes = q6_codes(row.add(g * GROUP_CODE_BYTES));
                        for i in 0..NT {
                            acc[j][i] = x86_avx512::ternary::step::<VNNI>(acc[j][i], codes, x[i]);
                        }
                    }
                }
                for j in 0..NR {
                    let eight = _mm_loadl_epi64(
                        rows.add(j * row_bytes + code_bytes + band_start(b0)).cast(),
                    );
                    let scales = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(eight, eight));
                    for i in 0..NT {
                        total[j][i] =
                            _mm512_add_epi32(total[j][i], _mm512_mullo_epi32(acc[j][i], scales));
                    }
                }
            }
            for j in 0..NR {
                for i in 0..NT {
                    out[j][i] += widening_sum(total[j][i]);
                }
            }
        }
    }
}
