//! AVX-512 kernels. The same scheme as AVX2 (codes `w + 1` times int8
//! activations, Σx subtracted at the end) on 64-byte vectors: one 64-byte
//! block masked to plane i gives the codes of 64 consecutive inputs (shifted
//! down by 2i for the GEMM; the GEMV keeps them scaled, see `gemv_row`).
//! With VNNI, `vpdpbusd` multiplies and sums four u8 × i8 products straight
//! into i32 lanes; without it, `vpmaddubsw` + `vpmaddwd` do the same in two
//! steps (each i16 pair widened at once, so nothing can overflow).

use std::arch::x86_64::*;
use std::ops::Range;

use super::packing::{PackedBlock, TernaryMatrix, BLOCK};
use super::x86_avx2::GEMV_PREFETCH;
use super::{aligned_scratch, gemm_k_block, QuantizedActivations};

/// GEMM tile: 4 rows × 4 tokens = 16 accumulators + 8 operands, of 32 registers.
const TILE: usize = 4;

// Why the kernel bodies below are `#[inline(always)]` with no
// `target_feature` of their own: a function with more features (VNNI) is
// never inlined into one with fewer, so a `vpdpbusd` helper called from an
// AVX-512 F/BW loop became a real call per instruction, its vectors passed
// through memory — 4–5× slower than AVX2 on a Sapphire Rapids (criterion
// `gemv/avx512`). Each body is instead inlined whole into one of two entry
// points, one compiled with VNNI and one without, and the intrinsics inline
// into those.

/// acc + Σ of the four u8 × i8 products in each 32-bit lane: `vpdpbusd` with
/// VNNI, else `vpmaddubsw` + `vpmaddwd`.
#[inline(always)]
unsafe fn step<const VNNI: bool>(acc: __m512i, codes: __m512i, acts: __m512i) -> __m512i {
    if VNNI {
        _mm512_dpbusd_epi32(acc, codes, acts)
    } else {
        let pairs = _mm512_maddubs_epi16(codes, acts);
        _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
    }
}

#[inline(always)]
unsafe fn planes(packed: __m512i) -> [__m512i; 4] {
    let mask = _mm512_set1_epi8(3);
    [
        _mm512_and_si512(packed, mask),
        _mm512_and_si512(_mm512_srli_epi16::<2>(packed), mask),
        _mm512_and_si512(_mm512_srli_epi16::<4>(packed), mask),
        _mm512_and_si512(_mm512_srli_epi16::<6>(packed), mask),
    ]
}

fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni")
}

/// # Safety
/// The CPU must support AVX-512 F and BW; `xq` must hold `w.k_padded()` values.
pub unsafe fn gemv(w: &TernaryMatrix, xq: &[i8], xsum: i32, rows: Range<usize>, dots: &mut [i32]) {
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    if has_vnni() {
        gemv_vnni(w, xq, xsum, rows, dots)
    } else {
        gemv_bw(w, xq, xsum, rows, dots)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemv_vnni(w: &TernaryMatrix, xq: &[i8], xsum: i32, rows: Range<usize>, dots: &mut [i32]) {
    gemv_with::<true>(w, xq, xsum, rows, dots)
}

#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_bw(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    gemv_with::<false>(w, xq, xsum, rows, dots)
}

#[inline(always)]
unsafe fn gemv_with<const VNNI: bool>(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    for (dot, n) in dots.iter_mut().zip(rows) {
        *dot = gemv_row::<VNNI>(w.row(n), xq, xsum);
    }
}

/// One row at a time with a software prefetch. (The AVX2 GEMV reads three
/// far-apart rows at once, which streamed faster on Zen 3; not measured on
/// an AVX-512 machine yet, so this path keeps its single stream.)
///
/// The codes are not shifted down: plane i is masked in place (`packed &
/// 3 << 2i`), so it holds code · 4^i (at most 128, still a u8), and its own
/// accumulator sums 4^i times the plane's dot; an arithmetic shift by 2i at
/// the end recovers it exactly (every term is a multiple of 4^i). That saves
/// three shifts per 64 bytes. Without VNNI, a `vpmaddubsw` pair is then at
/// most 2 · 128 · 127 = 32512 and at least 2 · 128 · -128 = -32768, so it
/// still fits an i16 and is widened at once. Four accumulators also make four
/// independent chains: `vpdpbusd` takes ~5 cycles before its result can be
/// added to again, and with one accumulator a 64-byte block took ~20 cycles
/// (criterion `gemv/avx512/t1`, in cache: 9 GB/s against AVX2's 11.6 on a
/// Sapphire Rapids).
#[inline(always)]
unsafe fn gemv_row<const VNNI: bool>(row: &[PackedBlock], xq: &[i8], xsum: i32) -> i32 {
    let x = xq.as_ptr();
    let masks = [0x03, 0x0c, 0x30, 0xc0].map(|m: u8| _mm512_set1_epi8(m as i8));
    let mut acc = [_mm512_setzero_si512(); 4];
    for (b, block) in row.iter().enumerate() {
        let ahead = (block as *const PackedBlock).wrapping_add(GEMV_PREFETCH);
        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        let packed = _mm512_load_si512(block.0.as_ptr().cast());
        for i in 0..4 {
            let plane = _mm512_and_si512(packed, masks[i]); // codes · 4^i
            let acts = _mm512_loadu_si512(x.add(b * BLOCK + 64 * i).cast());
            acc[i] = step::<VNNI>(acc[i], plane, acts);
        }
    }
    let sum = _mm512_add_epi32(
        _mm512_add_epi32(acc[0], _mm512_srai_epi32::<2>(acc[1])),
        _mm512_add_epi32(
            _mm512_srai_epi32::<4>(acc[2]),
            _mm512_srai_epi32::<6>(acc[3]),
        ),
    );
    _mm512_reduce_add_epi32(sum) - xsum
}

/// # Safety
/// The CPU must support AVX-512 F and BW. `dots` is [rows.len(), x.m()].
pub unsafe fn gemm(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    let (m, kp) = (x.m(), w.k_padded());
    assert!(x.k_padded() == kp && dots.len() == rows.len() * m && rows.end <= w.n_out());
    if has_vnni() {
        gemm_vnni(w, x, rows, dots)
    } else {
        gemm_bw(w, x, rows, dots)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_vnni(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    gemm_with::<true>(w, x, rows, dots)
}

#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_bw(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    gemm_with::<false>(w, x, rows, dots)
}

#[inline(always)]
unsafe fn gemm_with<const VNNI: bool>(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    let (m, kp) = (x.m(), w.k_padded());
    dots.fill(0);
    let kb = gemm_k_block(m, kp);
    let mut scratch = aligned_scratch(TILE * kb);
    let codes = scratch.as_mut_ptr().cast::<u8>(); // [TILE, kb] unpacked codes
    let acts = x.codes().as_ptr(); // [m, kp]
    for k0 in (0..kp).step_by(kb) {
        let len = kb.min(kp - k0);
        let blocks = k0 / BLOCK..(k0 + len) / BLOCK;
        for r0 in rows.clone().step_by(TILE) {
            let nr = TILE.min(rows.end - r0);
            for j in 0..nr {
                for (b, block) in w.row(r0 + j)[blocks.clone()].iter().enumerate() {
                    let packed = _mm512_load_si512(block.0.as_ptr().cast());
                    for (i, plane) in planes(packed).into_iter().enumerate() {
                        _mm512_store_si512(codes.add(j * kb + b * BLOCK + 64 * i).cast(), plane);
                    }
                }
            }
            let out_row = (r0 - rows.start) * m;
            for t0 in (0..m).step_by(TILE) {
                let nt = TILE.min(m - t0);
                let a = acts.add(t0 * kp + k0);
                let out = &mut dots[out_row + t0..];
                macro_rules! run {
                    ($nr:literal, $nt:literal) => {
                        tile::<$nr, $nt, VNNI>(codes, kb, a, kp, len, out, m)
                    };
                }
                match (nr, nt) {
                    (4, 4) => run!(4, 4),
                    (4, 3) => run!(4, 3),
                    (4, 2) => run!(4, 2),
                    (4, _) => run!(4, 1),
                    (3, 4) => run!(3, 4),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, _) => run!(3, 1),
                    (2, 4) => run!(2, 4),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, _) => run!(2, 1),
                    (_, 4) => run!(1, 4),
                    (_, 3) => run!(1, 3),
                    (_, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
            }
        }
    }
    for row_dots in dots.chunks_exact_mut(m) {
        for (dot, &sum) in row_dots.iter_mut().zip(x.sums()) {
            *dot -= sum;
        }
    }
}

/// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const NR: usize, const NT: usize, const VNNI: bool>(
    codes: *const u8,
    code_stride: usize,
    acts: *const i8,
    act_stride: usize,
    len: usize,
    out: &mut [i32],
    m: usize,
) {
    let mut acc = [[_mm512_setzero_si512(); NT]; NR];
    let mut k = 0;
    while k < len {
        let a: [__m512i; NT] =
            std::array::from_fn(|i| _mm512_loadu_si512(acts.add(i * act_stride + k).cast()));
        for j in 0..NR {
            let c = _mm512_load_si512(codes.add(j * code_stride + k).cast());
            for i in 0..NT {
                acc[j][i] = step::<VNNI>(acc[j][i], c, a[i]);
            }
        }
        k += 64;
    }
    for j in 0..NR {
        for i in 0..NT {
            out[j * m + i] += _mm512_reduce_add_epi32(acc[j][i]);
        }
    }
}
