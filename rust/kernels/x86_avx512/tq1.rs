//! AVX-512 GEMVs of 1.625-bit ternary weights (`Tq1Block`).
//!
//! With VNNI the base-3 bytes are not decoded into digits at all. The digit
//! at the top of a byte y is `top(y) = (3y - (3y mod 256)) / 256`, so for a
//! vector of bytes y meeting activations x,
//! `Σ top(y)·x = (3 · Σ y·x - Σ (3y mod 256)·x) / 256`:
//! two `vpdpbusd` of bytes as they are, the second on the bytes tripled
//! (two byte adds), which the next digit needs anyway. Per 32 weights that is
//! two byte adds and two `vpdpbusd` where the decoding took two adds, two
//! compares, an add and an absolute value before its one `vpdpbusd`
//! (docs/performance.md, "1.6-bit packing"). The sums are exact integers, so
//! the dots equal the scalar definition's to the bit. The vectors are 32
//! bytes (AVX-512 VL), the width the block's parts are cut to. Blocks go two
//! at a time: their 16 mid bytes each make one 32-byte vector of five
//! digits, as a head does (a lone block's mid bytes take the pairing of
//! their digits that `x86_avx2::tq1::decode_block` uses), and their tails one
//! vector of 2-bit codes.
//!
//! Without VNNI the AVX2 GEMV is the faster one, and runs as this path's.
//! The GEMM unpacks with the AVX2 decoding (`Tile::unpack_tq1`).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::packing::{
    TernaryMatrix, Tq1Block, BLOCK, TQ1_HEAD, TQ1_HEAD_WEIGHTS, TQ1_MID, TQ1_TAIL_START,
};
use crate::kernels::x86_avx2::ternary::hsum_epi32;
use crate::kernels::x86_avx2::tq1::{triple, Tq1Rows, GEMV_PREFETCH_BYTES};

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]` of a `Packing::Tq1` matrix.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI; `xq` must hold at least
/// `w.k_padded()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemv_vnni(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    let rows = Tq1Rows::<Avx512Vnni>::new(w, xq, xsum, rows, dots);
    // SAFETY: this function runs with AVX-512 F, BW, VL and VNNI, and
    // `rows` covers dots.len() rows.
    unsafe { driver::three_streams(&rows, dots) }
}

/// `gemv_vnni` without VNNI: the AVX2 GEMV (`x86_avx2::tq1::gemv_body`).
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
    // SAFETY: AVX-512 BW implies AVX2; the rest is the caller's.
    unsafe { crate::kernels::x86_avx2::tq1::gemv_body(w, xq, xsum, rows, dots) }
}

/// The AVX-512 VNNI path's `Tq1Rows`.
struct Avx512Vnni;

impl RowDots for Tq1Rows<'_, Avx512Vnni> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let blocks: [&[Tq1Block]; R] = std::array::from_fn(|j| self.row(rows[j]));
        // SAFETY: the caller runs this path (AVX-512 F, BW, VL and VNNI);
        // `Tq1Rows::new` checked that xq holds the rows' padded length.
        unsafe { gemv_rows::<R>(&blocks, self.xq, self.xsum) }
    }
}

/// Blocks summed before the carry sums are reduced: `3A - B` of a run is
/// 256 times its dot, at most 256 · 2 · 128 per weight in magnitude, which
/// for 64 blocks (16384 weights) is 2^30, inside an i32. The sums are
/// exact modulo 2^32 however far A and B alone wrap.
const CARRY_RUN_BLOCKS: usize = 64;

/// A row's sums over a run of blocks: `A = Σ y·x` and `B = Σ (3y mod 256)·x`
/// over the base-3 bytes y, two accumulators each (independent chains:
/// `vpdpbusd` must wait several cycles before adding to its result again),
/// and `C = Σ code·x` over the tail's 2-bit codes.
#[derive(Clone, Copy)]
struct CarrySums {
    a: [__m256i; 2],
    b: [__m256i; 2],
    c: __m256i,
}

impl CarrySums {
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: per the contract.
        let z = unsafe { _mm256_setzero_si256() };
        CarrySums {
            a: [z; 2],
            b: [z; 2],
            c: z,
        }
    }

    /// Adds `Σ top(y)·x` of the bytes `y` (their tripled bytes `y3`) into
    /// the chains CHAIN.
    ///
    /// # Safety
    /// AVX-512 VL and VNNI.
    #[inline(always)]
    unsafe fn add<const CHAIN: usize>(&mut self, y: __m256i, y3: __m256i, x: __m256i) {
        // SAFETY: per the contract.
        unsafe {
            self.a[CHAIN] = _mm256_dpbusd_epi32(self.a[CHAIN], y, x);
            self.b[CHAIN] = _mm256_dpbusd_epi32(self.b[CHAIN], y3, x);
        }
    }

    /// `Σ code·x` of the run: `(3A - B) / 256 + C`.
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    unsafe fn dot(&self) -> i32 {
        // SAFETY: per the contract.
        unsafe {
            let a = _mm256_add_epi32(self.a[0], self.a[1]);
            let b = _mm256_add_epi32(self.b[0], self.b[1]);
            let carries = _mm256_sub_epi32(_mm256_add_epi32(a, _mm256_add_epi32(a, a)), b);
            (hsum_epi32(carries) >> 8).wrapping_add(hsum_epi32(self.c))
        }
    }
}

/// The dots of R rows (of equal length) with one token, by carry sums (see
/// the module's documentation).
///
/// # Safety
/// AVX-512 F, BW, VL and VNNI; `xq` holds the rows' padded length.
#[inline(always)]
unsafe fn gemv_rows<const R: usize>(rows: &[&[Tq1Block]; R], xq: &[i8], xsum: i32) -> [i32; R] {
    let x = xq.as_ptr();
    let n_blocks = rows[0].len();
    debug_assert!(rows.iter().all(|row| row.len() == n_blocks));
    let mut dots = [-xsum; R];
    // SAFETY: the CPU has AVX-512 F, BW, VL and VNNI (so AVX2) per the
    // contract; every block read, b and (for a pair) b + 1, is below `end` <=
    // n_blocks, so a Tq1Block of each row (52 bytes: the loads read 0..32,
    // 32..48 and 48..52) whose activations b·BLOCK..+256 lie inside xq; a
    // prefetch never faults.
    unsafe {
        let flip = _mm256_set1_epi8(-128);
        // The upper half of a lone block's last mid vector is its tail's.
        let low_half = _mm256_setr_epi64x(-1, -1, 0, 0);
        // Dword 4 + i: the tail's codes of bits 2i..2i + 1; the lower half 0.
        let tail_shifts = _mm256_setr_epi32(32, 32, 32, 32, 0, 2, 4, 6);
        // Two blocks' tails side by side: dword i of each half, bits 2i..2i + 1.
        let pair_tail_shifts = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        let three = _mm256_set1_epi8(3);
        // 16 activations of each of two blocks, side by side.
        let halves = |lo: *const i8, hi: *const i8| {
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(lo.cast())),
                _mm_loadu_si128(hi.cast()),
            )
        };
        // The activations x meet the bytes y of each row, whose tops are
        // their codes, in the chains CHAIN; then y becomes 3y (TIMES = 3),
        // or 9y to skip a digit the other half of y holds. Each activation
        // vector is loaded once for the R rows: the loops over rows are
        // short and unrolled, and the sums stay in registers.
        macro_rules! step {
            ($sums:ident, $y:ident, $x:expr, $chain:literal, $times:literal) => {
                let xg = $x;
                for (sums, y) in $sums.iter_mut().zip(&mut $y) {
                    let y3 = triple(*y);
                    sums.add::<$chain>(*y, y3, xg);
                    *y = if $times == 9 { triple(y3) } else { y3 };
                }
            };
        }
        // Head byte j of a block, times 3^g, has at its top the code of weight
        // j + 32g: five digits against the activations 32g..32g + 32.
        macro_rules! heads {
            ($sums:ident, $blocks:ident, $xb:ident, $c0:literal, $c1:literal) => {
                let mut y =
                    $blocks.map(|block| _mm256_xor_si256(_mm256_loadu_si256(block.cast()), flip));
                let xs = |g: usize| _mm256_loadu_si256($xb.add(32 * g).cast());
                step!($sums, y, xs(0), $c0, 3);
                step!($sums, y, xs(1), $c1, 3);
                step!($sums, y, xs(2), $c0, 3);
                step!($sums, y, xs(3), $c1, 3);
                step!($sums, y, xs(4), $c0, 3);
            };
        }
        for b0 in (0..n_blocks).step_by(CARRY_RUN_BLOCKS) {
            let mut sums = [CarrySums::zero(); R];
            let end = (b0 + CARRY_RUN_BLOCKS).min(n_blocks);
            let mut b = b0;
            while b < end {
                let blocks: [*const u8; R] = std::array::from_fn(|j| rows[j][b].0.as_ptr());
                for block in blocks {
                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                }
                let xb = x.add(b * BLOCK);
                heads!(sums, blocks, xb, 0, 1);
                if b + 1 < end {
                    // Two blocks: their mid bytes make one 32-byte vector of
                    // five digits, as a head does, and their tails one vector
                    // of 2-bit codes.
                    let next: [*const u8; R] = std::array::from_fn(|j| rows[j][b + 1].0.as_ptr());
                    for block in next {
                        _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                    }
                    let xn = x.add((b + 1) * BLOCK);
                    heads!(sums, next, xn, 1, 0);
                    // Mid byte j of either block, times 3^i: weight 160 + j + 16i.
                    let mut y: [__m256i; R] = std::array::from_fn(|j| {
                        let mid = blocks[j].add(TQ1_HEAD).cast::<i8>();
                        let next_mid = next[j].add(TQ1_HEAD).cast::<i8>();
                        _mm256_xor_si256(halves(mid, next_mid), flip)
                    });
                    let xm = |i: usize| {
                        let at = TQ1_HEAD_WEIGHTS + TQ1_MID * i;
                        halves(xb.add(at), xn.add(at))
                    };
                    step!(sums, y, xm(0), 0, 3);
                    step!(sums, y, xm(1), 1, 3);
                    step!(sums, y, xm(2), 0, 3);
                    step!(sums, y, xm(3), 1, 3);
                    step!(sums, y, xm(4), 0, 3);
                    let xt = halves(xb.add(TQ1_TAIL_START), xn.add(TQ1_TAIL_START));
                    for ((sums, block), next) in sums.iter_mut().zip(blocks).zip(next) {
                        let tail = |block: *const u8| {
                            block.add(TQ1_HEAD + TQ1_MID).cast::<i32>().read_unaligned()
                        };
                        let (t0, t1) = (tail(block), tail(next));
                        let tails = _mm256_setr_epi32(t0, t0, t0, t0, t1, t1, t1, t1);
                        let codes =
                            _mm256_and_si256(_mm256_srlv_epi32(tails, pair_tail_shifts), three);
                        sums.c = _mm256_dpbusd_epi32(sums.c, codes, xt);
                    }
                    b += 2;
                    continue;
                }
                // A lone block. Mid byte j: [y | 3y] holds the weights 160 + j
                // and 176 + j at its tops, times 9 the next two, times 81
                // (lower half) the last.
                let xs = |g: usize| _mm256_loadu_si256(xb.add(32 * g).cast());
                let mut y = blocks.map(|block| {
                    let mid = _mm_loadu_si128(block.add(TQ1_HEAD).cast());
                    let mid = _mm256_xor_si256(_mm256_broadcastsi128_si256(mid), flip);
                    _mm256_blend_epi32::<0xf0>(mid, triple(mid))
                });
                step!(sums, y, xs(5), 1, 9);
                step!(sums, y, xs(6), 0, 9);
                let x7 = xs(7);
                for ((sums, y), block) in sums.iter_mut().zip(y).zip(blocks) {
                    let y4 = _mm256_and_si256(y, low_half);
                    sums.add::<1>(y4, triple(y4), x7);
                    let tail = block.add(TQ1_HEAD + TQ1_MID).cast::<i32>().read_unaligned();
                    let codes = _mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_set1_epi32(tail), tail_shifts),
                        three,
                    );
                    sums.c = _mm256_dpbusd_epi32(sums.c, codes, x7);
                }
                b += 1;
            }
            for (dot, sums) in dots.iter_mut().zip(&sums) {
                *dot = dot.wrapping_add(sums.dot());
            }
        }
        dots
    }
}
