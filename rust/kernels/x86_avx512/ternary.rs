//! AVX-512 ternary matmuls. The same scheme as AVX2 (codes `w + 1` times
//! int8 activations, Σx subtracted at the end) on 64-byte vectors: one
//! 64-byte block masked to plane i gives the codes of 64 consecutive inputs
//! (shifted down by 2i for the GEMM; the GEMV keeps them scaled, see
//! `gemv_row`). With VNNI, `vpdpbusd` multiplies and sums four u8 × i8
//! products straight into i32 lanes; without it, `vpmaddubsw` + `vpmaddwd`
//! do the same in two steps (each i16 pair widened at once, so nothing can
//! overflow).
//!
//! Why the bodies below are `#[inline(always)]` with no `target_feature` of
//! their own: a function with more features (VNNI) is never inlined into
//! one with fewer, so a `vpdpbusd` helper called from an AVX-512 F/BW loop
//! would be a real call per instruction, its vectors passed through memory
//! (docs/performance.md, "AVX-512 and VNNI"). Each body is instead inlined
//! whole into one of two entry points per routine, one compiled with VNNI
//! (`*_vnni`, `Kernel::Avx512Vnni`) and one without (`*_bw`,
//! `Kernel::Avx512Bw`), and the intrinsics inline into those.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{
    self, GemmTile, RowDots, SmallGemmTile, SmallTileOperands, TileOperands,
};
use crate::kernels::packing::{PackedBlock, TernaryMatrix, Tq1Block, BLOCK};
use crate::kernels::x86_avx2::ternary::GEMV_PREFETCH;
use crate::kernels::{CacheLine, QuantizedActivations};

/// acc + Σ of the four u8 × i8 products in each 32-bit lane: `vpdpbusd` with
/// VNNI, else `vpmaddubsw` + `vpmaddwd`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
pub(super) unsafe fn step<const VNNI: bool>(
    acc: __m512i,
    codes: __m512i,
    acts: __m512i,
) -> __m512i {
    // SAFETY: per the contract.
    unsafe {
        if VNNI {
            _mm512_dpbusd_epi32(acc, codes, acts)
        } else {
            let pairs = _mm512_maddubs_epi16(codes, acts);
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BW.
#[inline(always)]
unsafe fn planes(packed: __m512i) -> [__m512i; 4] {
    // SAFETY: per the contract.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        [
            _mm512_and_si512(packed, mask),
            _mm512_and_si512(_mm512_srli_epi16::<2>(packed), mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(packed), mask),
            _mm512_and_si512(_mm512_srli_epi16::<6>(packed), mask),
        ]
    }
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn gemv_vnni(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI; the rest is the caller's.
    unsafe { gemv_with::<true>(w, xq, xsum, rows, dots) }
}

/// `gemv_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_bw(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW; the rest is the caller's.
    unsafe { gemv_with::<false>(w, xq, xsum, rows, dots) }
}

/// # Safety
/// As `gemv_vnni` (`gemv_bw` without VNNI).
#[inline(always)]
unsafe fn gemv_with<const VNNI: bool>(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let rows = TernaryRows::<VNNI> {
        w,
        first: rows.start,
        xq,
        xsum,
    };
    // SAFETY: per the contract, and `rows` covers dots.len() rows.
    unsafe { driver::three_streams(&rows, dots) }
}

/// Rows `first..` of `w` against one token `xq` (sum `xsum`).
struct TernaryRows<'a, const VNNI: bool> {
    w: &'a TernaryMatrix,
    first: usize,
    xq: &'a [i8],
    xsum: i32,
}

impl<const VNNI: bool> RowDots for TernaryRows<'_, VNNI> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let mut blocks: [&[PackedBlock]; R] = [&[]; R];
        for (b, &r) in blocks.iter_mut().zip(&rows) {
            *b = self.w.row(self.first + r);
        }
        // SAFETY: the caller runs this path (AVX-512 F and BW, VNNI if
        // VNNI); `gemv_with` checked that xq holds the rows' padded length.
        unsafe { gemv_rows::<R, VNNI>(&blocks, self.xq, self.xsum) }
    }
}

/// The dots of R rows (of equal length) with one token, sharing its
/// activation loads (R = 3: the three streams of `driver::three_streams`),
/// each row prefetched `GEMV_PREFETCH` blocks ahead.
///
/// The codes are not shifted down: plane i is masked in place (`packed &
/// 3 << 2i`), so it holds code · 4^i (at most 128, still a u8), and its own
/// accumulator sums 4^i times the plane's dot; an arithmetic shift by 2i at
/// the end recovers it exactly (every term is a multiple of 4^i). That saves
/// three shifts per 64 bytes. Without VNNI, a `vpmaddubsw` pair is then at
/// most 2 · 128 · 127 = 32512 and at least 2 · 128 · -128 = -32768, so it
/// still fits an i16 and is widened at once. Four accumulators a row also
/// make independent chains: `vpdpbusd` must wait several cycles before its
/// result can be added to again (docs/performance.md, "AVX-512 and VNNI").
///
/// # Safety
/// AVX-512 F and BW, and VNNI if `VNNI`; `xq` holds the rows' padded length.
#[inline(always)]
unsafe fn gemv_rows<const R: usize, const VNNI: bool>(
    rows: &[&[PackedBlock]; R],
    xq: &[i8],
    xsum: i32,
) -> [i32; R] {
    let x = xq.as_ptr();
    let n_blocks = rows[0].len();
    debug_assert!(rows.iter().all(|row| row.len() == n_blocks));
    // SAFETY: the CPU has AVX-512 F and BW (and VNNI if VNNI) per the
    // contract; block b's activations b·BLOCK..+256 lie inside xq; a
    // prefetch never faults.
    unsafe {
        let masks = [0x03, 0x0c, 0x30, 0xc0].map(|m: u8| _mm512_set1_epi8(m as i8));
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        for b in 0..n_blocks {
            let mut packed = [_mm512_setzero_si512(); R];
            for (p, row) in packed.iter_mut().zip(rows) {
                let ahead = row.as_ptr().wrapping_add(b + GEMV_PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                *p = _mm512_load_si512(row[b].0.as_ptr().cast());
            }
            for i in 0..4 {
                let acts = _mm512_loadu_si512(x.add(b * BLOCK + 64 * i).cast());
                for (acc, &p) in acc.iter_mut().zip(&packed) {
                    let plane = _mm512_and_si512(p, masks[i]); // codes · 4^i
                    acc[i] = step::<VNNI>(acc[i], plane, acts);
                }
            }
        }
        let mut dots = [0i32; R];
        for (dot, acc) in dots.iter_mut().zip(&acc) {
            let sum = _mm512_add_epi32(
                _mm512_add_epi32(acc[0], _mm512_srai_epi32::<2>(acc[1])),
                _mm512_add_epi32(
                    _mm512_srai_epi32::<4>(acc[2]),
                    _mm512_srai_epi32::<6>(acc[3]),
                ),
            );
            *dot = _mm512_reduce_add_epi32(sum) - xsum;
        }
        dots
    }
}

/// The GEMM tile: 4 rows × 4 tokens = 16 accumulators + 8 operands, of 32
/// registers.
pub(crate) struct Tile<const VNNI: bool>;

impl<const VNNI: bool> GemmTile for Tile<VNNI> {
    const ROWS: usize = 4;
    const TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn unpack(blocks: &[PackedBlock], out: *mut u8) {
        for (b, block) in blocks.iter().enumerate() {
            // SAFETY: per the trait's contract (AVX-512 F and BW; out takes
            // blocks.len()·BLOCK bytes, 64-byte aligned); a block is 64 aligned bytes.
            unsafe {
                let packed = _mm512_load_si512(block.0.as_ptr().cast());
                for (i, plane) in planes(packed).into_iter().enumerate() {
                    _mm512_store_si512(out.add(b * BLOCK + 64 * i).cast(), plane);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn unpack_tq1(blocks: &[Tq1Block], out: *mut u8) {
        // SAFETY: per the trait's contract (AVX-512 F and BW, which imply
        // AVX2; out takes blocks.len()·BLOCK bytes, 64-byte aligned).
        unsafe { crate::kernels::x86_avx2::tq1::unpack(blocks, out) }
    }

    #[inline(always)]
    unsafe fn unpack_tl(
        w: &TernaryMatrix,
        r0: usize,
        nr: usize,
        k0: usize,
        len: usize,
        out: *mut u8,
        stride: usize,
    ) {
        let isa = if VNNI { Isa::Avx512Vnni } else { Isa::Avx512Bw };
        // SAFETY: per the trait's contract; the VBMI routine runs only on a
        // CPU with VBMI, for four rows of one tile (r0 a multiple of 4).
        unsafe {
            if nr == 4 && r0.is_multiple_of(4) && crate::kernels::cpu::vbmi_detected() {
                crate::kernels::x86_avx512::tl::unpack_rows4(isa, w, r0, k0, len, out, stride)
            } else {
                driver::unpack_tl_rows(w, r0, nr, k0, len, out, stride)
            }
        }
    }

    #[inline(always)]
    unsafe fn tile(nr: usize, nt: usize, ops: TileOperands, out: &mut [i32], m: usize) {
        macro_rules! run {
            ($nr:literal, $nt:literal) => {
                tile::<$nr, $nt, VNNI>(ops, out, m)
            };
        }
        // SAFETY: per the trait's contract (the CPU runs this path; nr, nt
        // and the operands in range).
        unsafe { driver::tile_4x4!(nr, nt, run) }
    }
}

/// `dots[i, t] = Σ_k x[t, k] · W[rows.start + i, k]`, dots is [rows.len(), x.m()];
/// `scratch` holds the unpacked codes (kept by the caller between calls).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn gemm_vnni(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI, what `Tile<true>` needs.
    unsafe { driver::gemm::<Tile<true>>(w, x, rows, dots, scratch) }
}

/// `gemm_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_bw(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW, what `Tile<false>` needs.
    unsafe { driver::gemm::<Tile<false>>(w, x, rows, dots, scratch) }
}

/// `gemm_vnni` for a few tokens (a batched decode step): the small-batch tile.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn gemm_small_vnni(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI, what `SmallTile<true>` needs.
    unsafe { driver::gemm_small::<SmallTile<true>>(w, x, rows, dots) }
}

/// `gemm_small_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_small_bw(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW, what `SmallTile<false>` needs.
    unsafe { driver::gemm_small::<SmallTile<false>>(w, x, rows, dots) }
}

/// The small-batch tile: 2 rows × 8 tokens = 16 accumulators, 8 activation
/// vectors, 2 packed blocks and a plane of codes, of 32 registers.
pub(crate) struct SmallTile<const VNNI: bool>;

impl<const VNNI: bool> SmallGemmTile for SmallTile<VNNI> {
    const ROWS: usize = 2;
    const TOKENS: usize = 8;

    #[inline(always)]
    unsafe fn tile(nr: usize, nt: usize, ops: SmallTileOperands, out: &mut [i32], m: usize) {
        macro_rules! run {
            ($nr:literal, $nt:literal) => {
                small_tile::<$nr, $nt, VNNI>(ops, out, m)
            };
        }
        // SAFETY: per the trait's contract (the CPU runs this path; nr, nt
        // and the operands in range).
        unsafe { driver::tile_2x8!(nr, nt, run) }
    }
}

/// `out[j·m + i] += Σ_k code(row j, k) · acts[i·act_stride + k]`: block by
/// block, each row's block loaded once and its four planes decoded in
/// registers (shift and mask), each plane multiplied with the NT tokens'
/// activations for its 64 inputs.
///
/// # Safety
/// As `SmallGemmTile::tile`, with nr = NR and nt = NT; AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
unsafe fn small_tile<const NR: usize, const NT: usize, const VNNI: bool>(
    ops: SmallTileOperands,
    out: &mut [i32],
    m: usize,
) {
    let SmallTileOperands {
        rows,
        row_stride,
        blocks,
        acts,
        act_stride,
        prefetch_ahead,
    } = ops;
    // SAFETY: per the contract: rows j < NR hold `blocks` aligned blocks
    // from rows + j·row_stride, tokens i < NT hold blocks·BLOCK codes; a
    // prefetch never faults.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); NT]; NR];
        for b in 0..blocks {
            let mut packed = [_mm512_setzero_si512(); NR];
            for (j, packed) in packed.iter_mut().enumerate() {
                let block = rows.add(j * row_stride + b);
                if prefetch_ahead != 0 {
                    let ahead = block.wrapping_add(prefetch_ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                }
                *packed = _mm512_load_si512(block.cast());
            }
            for plane in 0..4 {
                let mut a = [_mm512_setzero_si512(); NT];
                for (i, a) in a.iter_mut().enumerate() {
                    let at = acts.add(i * act_stride + b * BLOCK + 64 * plane);
                    *a = _mm512_loadu_si512(at.cast());
                }
                for j in 0..NR {
                    let shifted = match plane {
                        0 => packed[j],
                        1 => _mm512_srli_epi16::<2>(packed[j]),
                        2 => _mm512_srli_epi16::<4>(packed[j]),
                        _ => _mm512_srli_epi16::<6>(packed[j]),
                    };
                    let codes = _mm512_and_si512(shifted, mask);
                    for i in 0..NT {
                        acc[j][i] = step::<VNNI>(acc[j][i], codes, a[i]);
                    }
                }
            }
        }
        add_tile_sums(&acc, out, m);
    }
}

/// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`.
///
/// # Safety
/// As `GemmTile::tile`, with nr = NR and nt = NT; AVX-512 F and BW, and VNNI if `VNNI`.
#[inline(always)]
unsafe fn tile<const NR: usize, const NT: usize, const VNNI: bool>(
    ops: TileOperands,
    out: &mut [i32],
    m: usize,
) {
    let TileOperands {
        codes,
        code_stride,
        acts,
        act_stride,
        len,
        ..
    } = ops;
    // SAFETY: per the contract: rows j < NR and tokens i < NT hold len codes
    // (code rows 64-byte aligned), k + 64 <= len.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); NT]; NR];
        let mut k = 0;
        while k < len {
            ops.prefetch_at(k);
            let mut a = [_mm512_setzero_si512(); NT];
            for (i, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_si512(acts.add(i * act_stride + k).cast());
            }
            for j in 0..NR {
                let c = _mm512_load_si512(codes.add(j * code_stride + k).cast());
                for i in 0..NT {
                    acc[j][i] = step::<VNNI>(acc[j][i], c, a[i]);
                }
            }
            k += 64;
        }
        add_tile_sums(&acc, out, m);
    }
}

/// `out[j·m + i] += ` the horizontal sum of `acc[j][i]`, for every
/// accumulator of a tile. A full tile's sixteen sums come out of one
/// transposing tree as one vector, row j in lanes j·NT..(j + 1)·NT, so each
/// row is added into `out` with one vector load, add and store, where
/// element by element each sum would cost a lane extraction, a bounds check
/// and a scalar add: a fixed cost per tile that short rows (a few k-blocks)
/// do not amortize. Other tiles (partial ones) add their sums one by one.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn add_tile_sums<const NR: usize, const NT: usize>(
    acc: &[[__m512i; NT]; NR],
    out: &mut [i32], // row j's NT sums at j·m..
    m: usize,
) {
    assert!(NR >= 1 && NT >= 1 && out.len() >= (NR - 1) * m + NT);
    let o = out.as_mut_ptr();
    // SAFETY: the CPU has AVX-512 F (so AVX2) per the contract; row j's
    // NT values j·m..j·m + NT lie inside `out` (asserted above).
    unsafe {
        if NR == 2 && NT == 8 {
            let sums = full_tile_sums(acc);
            let halves = [
                _mm512_castsi512_si256(sums),
                _mm512_extracti64x4_epi64::<1>(sums),
            ];
            for (j, half) in halves.into_iter().enumerate() {
                let row = o.add(j * m).cast::<__m256i>();
                _mm256_storeu_si256(row, _mm256_add_epi32(_mm256_loadu_si256(row), half));
            }
        } else if NR == 4 && NT == 4 {
            let sums = full_tile_sums(acc);
            let quarters = [
                _mm512_castsi512_si128(sums),
                _mm512_extracti32x4_epi32::<1>(sums),
                _mm512_extracti32x4_epi32::<2>(sums),
                _mm512_extracti32x4_epi32::<3>(sums),
            ];
            for (j, quarter) in quarters.into_iter().enumerate() {
                let row = o.add(j * m).cast::<__m128i>();
                _mm_storeu_si128(row, _mm_add_epi32(_mm_loadu_si128(row), quarter));
            }
        } else {
            let sums = tile_sums(acc);
            for (j, sums) in sums.iter().enumerate() {
                for (i, &sum) in sums.iter().enumerate() {
                    *o.add(j * m + i) += sum;
                }
            }
        }
    }
}

/// A full tile's sixteen horizontal sums in one vector: lane j·NT + i is
/// the sum of `acc[j][i]` (`sum_sixteen`).
///
/// # Safety
/// The CPU must support AVX-512 F; NR · NT = 16.
#[inline(always)]
unsafe fn full_tile_sums<const NR: usize, const NT: usize>(acc: &[[__m512i; NT]; NR]) -> __m512i {
    debug_assert_eq!(NR * NT, 16);
    // SAFETY: per the contract.
    unsafe {
        let mut flat = [_mm512_setzero_si512(); 16];
        for (p, v) in flat.iter_mut().enumerate() {
            *v = acc[p / NT][p % NT];
        }
        sum_sixteen(flat)
    }
}

/// The horizontal sum of each accumulator of a tile: a full tile's sixteen
/// in one transposing tree (`sum_sixteen`), a partial tile's one by one.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
pub(crate) unsafe fn tile_sums<const NR: usize, const NT: usize>(
    acc: &[[__m512i; NT]; NR],
) -> [[i32; NT]; NR] {
    let mut sums = [[0i32; NT]; NR];
    // SAFETY: per the contract.
    unsafe {
        if NR * NT == 16 {
            let mut lanes = [0i32; 16];
            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), full_tile_sums(acc));
            for (p, &lane) in lanes.iter().enumerate() {
                sums[p / NT][p % NT] = lane;
            }
        } else {
            for (sums, acc) in sums.iter_mut().zip(acc) {
                for (sum, &v) in sums.iter_mut().zip(acc) {
                    *sum = _mm512_reduce_add_epi32(v);
                }
            }
        }
    }
    sums
}

/// Lane p of the result = the sum of the 16 lanes of `v[p]`: a transposing
/// tree of 45 instructions where 16 separate horizontal sums take about 130
/// (each tile pays it once per k-block, a fixed cost a few tokens do not
/// amortize). Exact: integer adds, in any order.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn sum_sixteen(v: [__m512i; 16]) -> __m512i {
    // Macros, not closures: a closure may be compiled as a function of its
    // own without the caller's target features, a call per use.
    // Pairs of vectors: per 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3].
    macro_rules! pair {
        ($a:expr, $b:expr) => {
            _mm512_add_epi32(_mm512_unpacklo_epi32($a, $b), _mm512_unpackhi_epi32($a, $b))
        };
    }
    // Pairs of pairs: per 128-bit lane L, the lane-L partial sums of four vectors.
    macro_rules! quad {
        ($a:expr, $b:expr) => {
            _mm512_add_epi32(_mm512_unpacklo_epi64($a, $b), _mm512_unpackhi_epi64($a, $b))
        };
    }
    // Across the 128-bit lanes: [x.L0 + x.L1, x.L2 + x.L3, y.L0 + y.L1, y.L2 + y.L3].
    macro_rules! lanes {
        ($x:expr, $y:expr) => {
            _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b10_00_10_00>($x, $y),
                _mm512_shuffle_i32x4::<0b11_01_11_01>($x, $y),
            )
        };
    }
    // SAFETY: per the contract.
    unsafe {
        let q0 = quad!(pair!(v[0], v[1]), pair!(v[2], v[3]));
        let q1 = quad!(pair!(v[4], v[5]), pair!(v[6], v[7]));
        let q2 = quad!(pair!(v[8], v[9]), pair!(v[10], v[11]));
        let q3 = quad!(pair!(v[12], v[13]), pair!(v[14], v[15]));
        let (l01, l23) = (lanes!(q0, q1), lanes!(q2, q3));
        lanes!(l01, l23)
    }
}
