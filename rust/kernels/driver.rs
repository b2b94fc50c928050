//! The loops every SIMD path shares, written once, generic over what an
//! instruction set supplies: the ternary GEMM driver (k-blocks, row tiles,
//! token tiles, remainder tiles, the Σx correction) over a `GemmTile`, and
//! the three-stream row splitter over a `RowDots`.
//!
//! Everything here is `#[inline(always)]` with no `target_feature` of its
//! own, and so are the tile routines: each path's `#[target_feature]` entry
//! point instantiates the driver, and the whole loop nest, tiles included,
//! is compiled inside it with its features. (A routine with more features
//! than its caller is never inlined into it: a call per tile would pass the
//! accumulators through memory.)

// Targets without a SIMD path use neither the driver nor the splitter.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]

/// `$run!(R, T)` for the remainder tile of `nr` rows and `nt` tokens of a GEMM
/// whose full tile is 4 × 4 (AVX-512, NEON): each size its own const-generic
/// instantiation, so the tile's loops unroll.
macro_rules! tile_4x4 {
    ($nr:expr, $nt:expr, $run:ident) => {
        match ($nr, $nt) {
            (4, 4) => $run!(4, 4),
            (4, 3) => $run!(4, 3),
            (4, 2) => $run!(4, 2),
            (4, _) => $run!(4, 1),
            (3, 4) => $run!(3, 4),
            (3, 3) => $run!(3, 3),
            (3, 2) => $run!(3, 2),
            (3, _) => $run!(3, 1),
            (2, 4) => $run!(2, 4),
            (2, 3) => $run!(2, 3),
            (2, 2) => $run!(2, 2),
            (2, _) => $run!(2, 1),
            (_, 4) => $run!(1, 4),
            (_, 3) => $run!(1, 3),
            (_, 2) => $run!(1, 2),
            _ => $run!(1, 1),
        }
    };
}
pub(crate) use tile_4x4;

/// `$run!(R, T)` for the tile of `nr` rows and `nt` tokens of a small-batch
/// GEMM whose full tile is 2 × 8 (AVX-512, NEON): each size its own instantiation.
macro_rules! tile_2x8 {
    ($nr:expr, $nt:expr, $run:ident) => {
        match ($nr, $nt) {
            (2, 8) => $run!(2, 8),
            (2, 7) => $run!(2, 7),
            (2, 6) => $run!(2, 6),
            (2, 5) => $run!(2, 5),
            (2, 4) => $run!(2, 4),
            (2, 3) => $run!(2, 3),
            (2, 2) => $run!(2, 2),
            (2, _) => $run!(2, 1),
            (_, 8) => $run!(1, 8),
            (_, 7) => $run!(1, 7),
            (_, 6) => $run!(1, 6),
            (_, 5) => $run!(1, 5),
            (_, 4) => $run!(1, 4),
            (_, 3) => $run!(1, 3),
            (_, 2) => $run!(1, 2),
            _ => $run!(1, 1),
        }
    };
}
pub(crate) use tile_2x8;

/// `$run!(1, T)` for the tile of `nt` tokens of a small-batch GEMM whose
/// full tile is one row × 8 tokens (AVX2): each size its own instantiation.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! tile_1x8 {
    ($nt:expr, $run:ident) => {
        match $nt {
            8 => $run!(1, 8),
            7 => $run!(1, 7),
            6 => $run!(1, 6),
            5 => $run!(1, 5),
            4 => $run!(1, 4),
            3 => $run!(1, 3),
            2 => $run!(1, 2),
            _ => $run!(1, 1),
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use tile_1x8;

use std::ops::Range;

use super::packing::{PackedBlock, Packing, TernaryMatrix, Tq1Block, BLOCK};
use super::tl::{tl_groups, TL_ROWS};
use super::{gemm_k_block, CacheLine, QuantizedActivations};

/// The operands of one GEMM tile.
#[derive(Clone, Copy)]
pub(crate) struct TileOperands {
    /// [ROWS, code_stride] unpacked weight codes of the row tile, 64-byte aligned.
    pub codes: *const u8,
    pub code_stride: usize,
    /// [TOKENS, act_stride] activation codes, at the k-block's first input.
    pub acts: *const i8,
    pub act_stride: usize,
    /// Inputs of the k-block: a multiple of `BLOCK`.
    pub len: usize,
    /// Packed weights to prefetch while the tile runs, a cache line per 64
    /// inputs (`ahead_lines` of them from `ahead`); none when 0.
    pub ahead: *const u8,
    pub ahead_lines: usize,
}

impl TileOperands {
    /// The tile's share of the prefetching at input k (a multiple of the
    /// tile's step): one line every 64 inputs, so that the loads spread
    /// over the tile instead of queueing up at once.
    #[inline(always)]
    pub fn prefetch_at(&self, k: usize) {
        if k.is_multiple_of(64) && k / 64 < self.ahead_lines {
            prefetch(self.ahead.wrapping_add(k));
        }
    }
}

/// One instruction set's GEMM tile.
pub(crate) trait GemmTile {
    /// Weight rows per tile.
    const ROWS: usize;
    /// Tokens per tile.
    const TOKENS: usize;

    /// Writes the codes (`w + 1`) of `blocks` in input order to `out`.
    ///
    /// # Safety
    /// The CPU runs the implementing path; `out` is 64-byte aligned and
    /// takes `blocks.len() * BLOCK` bytes.
    unsafe fn unpack(blocks: &[PackedBlock], out: *mut u8);

    /// `unpack` of 1.625-bit blocks.
    ///
    /// # Safety
    /// As `unpack`.
    unsafe fn unpack_tq1(blocks: &[Tq1Block], out: *mut u8);

    /// The codes of rows `r0..r0 + nr` of a `Packing::Tl` matrix at
    /// positions `k0..k0 + len` of its plane order (`kernels::tl`), row j's
    /// at `out + j·stride` (`unpack_tl_rows` unless the path has faster).
    ///
    /// # Safety
    /// The CPU runs the implementing path; the rows exist; `out` takes
    /// `(nr - 1)·stride + len` bytes, `len <= stride`.
    unsafe fn unpack_tl(
        w: &TernaryMatrix,
        r0: usize,
        nr: usize,
        k0: usize,
        len: usize,
        out: *mut u8,
        stride: usize,
    ) {
        // SAFETY: per the contract.
        unsafe { unpack_tl_rows(w, r0, nr, k0, len, out, stride) }
    }

    /// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`
    /// for `nr` rows j and `nt` tokens i.
    ///
    /// # Safety
    /// The CPU runs the implementing path; 1 <= nr <= ROWS and 1 <= nt <=
    /// TOKENS; the operands hold nr rows and nt tokens of `len` codes; `out`
    /// holds `(nr - 1)·m + nt` values.
    unsafe fn tile(nr: usize, nt: usize, ops: TileOperands, out: &mut [i32], m: usize);
}

/// `GemmTile::unpack_tl` row by row (`TernaryMatrix::tl_plane_codes`).
///
/// # Safety
/// As `GemmTile::unpack_tl`.
pub(crate) unsafe fn unpack_tl_rows(
    w: &TernaryMatrix,
    r0: usize,
    nr: usize,
    k0: usize,
    len: usize,
    out: *mut u8,
    stride: usize,
) {
    for j in 0..nr {
        // SAFETY: row j's len bytes at j·stride are inside `out` (the
        // contract), and no other reference to them is live.
        let codes = unsafe { std::slice::from_raw_parts_mut(out.add(j * stride), len) };
        w.tl_plane_codes(r0 + j, k0, codes);
    }
}

/// `dots[i, t] = Σ_k x[t, k] · W[rows.start + i, k]`, dots is [rows.len(), m]:
/// over k-blocks (`gemm_k_block`), each row tile's codes unpacked once into
/// `scratch` (the caller's, kept from call to call) and multiplied with every
/// token tile; then Σx subtracted to undo the `+ 1` of the codes. Every
/// packing unpacks to the same codes, so the tiles are the same; a tl
/// matrix's in its plane order, multiplied with the activations in that
/// order (`QuantizedActivations::tl_planes`), the same dots.
///
/// # Safety
/// The CPU runs the path `T` belongs to.
///
/// # Panics
/// For a `Packing::Tl` matrix, if there is no memory for `x.tl_planes()`
/// (`gemm_dots` asks first, and takes the definition then).
#[inline(always)]
pub(crate) unsafe fn gemm<T: GemmTile>(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    let (m, kp) = (x.m(), w.k_padded());
    assert!(x.k_padded() == kp && dots.len() == rows.len() * m && rows.end <= w.n_out());
    dots.fill(0);
    let packing = w.packing();
    let kb = gemm_k_block(m, kp);
    let lines = (T::ROWS * kb).div_ceil(64);
    if scratch.len() < lines {
        scratch.resize(lines, CacheLine([0; 64]));
    }
    let codes = scratch.as_mut_ptr().cast::<u8>(); // [ROWS, kb] unpacked codes
    let acts = match packing {
        Packing::Tl => x.tl_planes().expect("gemm_dots made them"),
        _ => x.codes(),
    }
    .as_ptr(); // [m, kp]
    for k0 in (0..kp).step_by(kb) {
        let len = kb.min(kp - k0);
        let blocks = k0 / BLOCK..(k0 + len) / BLOCK;
        for r0 in rows.clone().step_by(T::ROWS) {
            let nr = T::ROWS.min(rows.end - r0);
            // SAFETY: the caller runs T's path; row j of the scratch starts
            // at j·kb (a multiple of 64 bytes, as kb is of BLOCK) and takes
            // the len = blocks.len()·BLOCK <= kb codes; rows r0..r0 + nr exist.
            unsafe {
                match packing {
                    Packing::I2 => {
                        for j in 0..nr {
                            T::unpack(&w.row(r0 + j)[blocks.clone()], codes.add(j * kb));
                        }
                    }
                    Packing::Tq1 => {
                        for j in 0..nr {
                            T::unpack_tq1(&w.tq1_row(r0 + j)[blocks.clone()], codes.add(j * kb));
                        }
                    }
                    Packing::Tl => T::unpack_tl(w, r0, nr, k0, len, codes, kb),
                }
            }
            let out_row = (r0 - rows.start) * m;
            // The packed weights PREFETCH_TILES row tiles on, fetched while the
            // first token tile runs: a few tokens' compute per row tile does
            // not cover fetching the next one on demand. When the k-block is
            // a whole row, those row tiles are contiguous bytes.
            let ahead_rows = r0 + PREFETCH_TILES * T::ROWS;
            let next_tile = (r0 / TL_ROWS + 1) * TL_ROWS;
            let (ahead, ahead_lines) = match packing.block_bytes() {
                Some(bytes) if len == kp && ahead_rows + T::ROWS <= w.n_out() => (
                    w.row_start(ahead_rows),
                    (T::ROWS * blocks.len() * bytes).div_ceil(64),
                ),
                // A tl tile interleaves its 64 rows, so every row tile of it
                // reads all its lines: each takes its share of the next
                // tile's lines, which then come from cache.
                None if len == kp && next_tile < w.n_out() => {
                    let tile_lines = tl_groups(w.n_in());
                    let share = tile_lines.div_ceil(TL_ROWS / T::ROWS);
                    let first = ((r0 % TL_ROWS) / T::ROWS * share).min(tile_lines);
                    (
                        w.row_start(next_tile).wrapping_add(64 * first),
                        share.min(tile_lines - first),
                    )
                }
                _ => (std::ptr::null(), 0),
            };
            for t0 in (0..m).step_by(T::TOKENS) {
                let nt = T::TOKENS.min(m - t0);
                let ops = TileOperands {
                    codes,
                    code_stride: kb,
                    // SAFETY: t0 < m and k0 < kp: inside the [m, kp] codes.
                    acts: unsafe { acts.add(t0 * kp + k0) },
                    act_stride: kp,
                    len,
                    ahead,
                    ahead_lines: if t0 == 0 { ahead_lines } else { 0 },
                };
                // SAFETY: nr rows of len codes were unpacked above; tokens
                // t0..t0 + nt exist, each with kp - k0 >= len codes from k0;
                // the rest of the row tile's dots from t0 are (nr - 1)·m + nt
                // values at least.
                unsafe { T::tile(nr, nt, ops, &mut dots[out_row + t0..], m) };
            }
        }
    }
    for row_dots in dots.chunks_exact_mut(m) {
        for (dot, &sum) in row_dots.iter_mut().zip(x.sums()) {
            *dot -= sum;
        }
    }
}

/// How many row tiles ahead of the one being multiplied the GEMM prefetches
/// its weights.
const PREFETCH_TILES: usize = 2;

/// Asks for the cache line at `p` to be brought into the cache: a hint that
/// never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` (SSE, in every x86-64 CPU) only hints; it reads
    // nothing architecturally and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` (base AArch64) only hints; it never faults.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// The operands of one small-batch tile.
#[derive(Clone, Copy)]
pub(crate) struct SmallTileOperands {
    /// The first block the tile reads of its first row; the other rows'
    /// follow it, `row_stride` blocks apart.
    pub rows: *const PackedBlock,
    pub row_stride: usize,
    /// Blocks of each row the tile reads (a K chunk: all of a row, or part).
    pub blocks: usize,
    /// [TOKENS, act_stride] activation codes of the tile's first token, from
    /// the chunk's first input.
    pub acts: *const i8,
    pub act_stride: usize,
    /// Blocks ahead of each block read to prefetch (the weights a later tile
    /// reads), or 0 for none: only the first token tile of a row tile reads
    /// its weights from memory.
    pub prefetch_ahead: usize,
}

/// One instruction set's tile for a GEMM of a few tokens (a batched decode
/// step): the packed codes decoded in registers and multiplied at once with
/// every token of the tile, so each weight byte is read and decoded once per
/// tile rather than unpacked to memory and read back.
pub(crate) trait SmallGemmTile {
    const ROWS: usize;
    const TOKENS: usize;

    /// `out[j·m + i] += Σ_k code(row j, k) · acts[i·act_stride + k]` over the
    /// `blocks` blocks from `rows` of each row (the codes `w + 1`), for `nr`
    /// rows and `nt` tokens.
    ///
    /// # Safety
    /// The CPU runs the implementing path; 1 <= nr <= ROWS, 1 <= nt <=
    /// TOKENS; row j's blocks are `rows + j·row_stride ..` `+ blocks`, token
    /// i's codes `acts + i·act_stride ..` `+ blocks · BLOCK`; `out` holds
    /// `(nr - 1)·m + nt` values.
    unsafe fn tile(nr: usize, nt: usize, ops: SmallTileOperands, out: &mut [i32], m: usize);
}

/// Row tiles of the small-batch GEMM that run each token tile in turn.
const SMALL_ROW_GROUP_TILES: usize = 8;

/// Bytes of one token tile's activations a K chunk of the small-batch GEMM
/// may take: the chunk's activations stay in L1 (32 KiB or more on the
/// CPUs the paths target) beside the weights streaming through it, where a
/// whole row of 6912 inputs for 8 tokens (54 KiB) would come from L2 for
/// every row tile.
const SMALL_CHUNK_ACT_BYTES: usize = 28 * 1024;

/// Blocks ahead of the one being read that an unchunked small tile
/// prefetches (4 KiB: the rows of a row tile and the next are contiguous).
const SMALL_PREFETCH_BLOCKS: usize = 64;

/// Row tiles ahead whose blocks a chunked small tile prefetches (the same
/// chunk of later rows: the next blocks in memory belong to the next chunk).
const SMALL_PREFETCH_ROW_TILES: usize = 2;

/// The K chunk of the small-batch GEMM, in blocks: a row in equal parts of at
/// most `SMALL_CHUNK_ACT_BYTES` of `tokens` tokens' activations each.
fn small_chunk_blocks(tokens: usize, row_blocks: usize) -> usize {
    let most = (SMALL_CHUNK_ACT_BYTES / (tokens.max(1) * BLOCK)).max(1);
    let chunks = row_blocks.div_ceil(most).max(1);
    row_blocks.div_ceil(chunks).max(1)
}

/// `gemm` for a few tokens, over a `SmallGemmTile`: K in chunks whose
/// activations stay in L1, groups of row tiles each multiplied with every
/// token tile; then Σx subtracted.
///
/// # Safety
/// The CPU runs the path `T` belongs to.
#[inline(always)]
pub(crate) unsafe fn gemm_small<T: SmallGemmTile>(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    let (m, kp) = (x.m(), w.k_padded());
    assert!(x.k_padded() == kp && dots.len() == rows.len() * m && rows.end <= w.n_out());
    assert!(
        w.packing() == Packing::I2,
        "the small tiles decode 2-bit blocks"
    );
    let acts = x.codes().as_ptr(); // [m, kp]
    let row_blocks = w.blocks_per_row();
    let chunk_blocks = small_chunk_blocks(T::TOKENS.min(m), row_blocks);
    let chunked = chunk_blocks < row_blocks;
    // More tokens than a tile takes: a group of row tiles runs one token
    // tile after the other, so that a token tile's activations stay in L1
    // over the group's rows (and the rows, read from memory by the first
    // token tile, come from cache for the others), rather than each row tile
    // cycling through every token's activations, more than L1 holds.
    let group_rows = if m > T::TOKENS {
        SMALL_ROW_GROUP_TILES * T::ROWS
    } else {
        rows.len().max(1)
    };
    let prefetch_ahead = if chunked {
        SMALL_PREFETCH_ROW_TILES * T::ROWS * row_blocks
    } else {
        SMALL_PREFETCH_BLOCKS
    };
    dots.fill(0);
    for g0 in rows.clone().step_by(group_rows) {
        let g_end = (g0 + group_rows).min(rows.end);
        for c0 in (0..row_blocks).step_by(chunk_blocks) {
            let blocks = chunk_blocks.min(row_blocks - c0);
            for t0 in (0..m).step_by(T::TOKENS) {
                let nt = T::TOKENS.min(m - t0);
                for r0 in (g0..g_end).step_by(T::ROWS) {
                    let nr = T::ROWS.min(g_end - r0);
                    let out_row = (r0 - rows.start) * m;
                    let ops = SmallTileOperands {
                        rows: w.row(r0)[c0..].as_ptr(),
                        row_stride: row_blocks,
                        blocks,
                        // SAFETY: t0 < m and c0·BLOCK < kp: inside the [m, kp] codes.
                        acts: unsafe { acts.add(t0 * kp + c0 * BLOCK) },
                        act_stride: kp,
                        prefetch_ahead: if t0 == 0 { prefetch_ahead } else { 0 },
                    };
                    // SAFETY: rows r0..r0 + nr exist (rows.end <= n_out) with
                    // row_blocks >= c0 + blocks blocks each, tokens t0..t0 + nt
                    // exist with kp >= (c0 + blocks)·BLOCK codes each; the row
                    // tile's dots from t0 are (nr - 1)·m + nt values at least.
                    unsafe { T::tile(nr, nt, ops, &mut dots[out_row + t0..], m) };
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

/// Rows read at once by the three-stream splitter.
pub(crate) const STREAMS: usize = 3;

/// Dot products of rows with one vector, R rows at a time sharing the
/// vector's loads: what a path supplies to `three_streams`.
pub(crate) trait RowDots {
    type Dot: Copy + Default;

    /// The dots of the rows `rows` (indices below the row count the caller
    /// gave `three_streams`).
    ///
    /// # Safety
    /// The CPU runs the implementing path; every index is in range.
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [Self::Dot; R];
}

/// `out[r]` = the dot of row r, for r in 0..out.len(), read as three streams
/// far apart: row i of each third of the rows together, then the rows left
/// over one by one. A single sequential stream does not reach the memory's
/// read bandwidth on the machines measured, three do (docs/performance.md,
/// "Three streams").
///
/// # Safety
/// The CPU runs the path `D` belongs to, and `D` covers `out.len()` rows.
#[inline(always)]
pub(crate) unsafe fn three_streams<D: RowDots>(rows: &D, out: &mut [D::Dot]) {
    let stretch = out.len() / STREAMS;
    // Plain loops, no closures: a closure may be compiled as a call per row
    // without the caller's target features.
    for i in 0..stretch {
        let mut index = [0usize; STREAMS];
        for (s, r) in index.iter_mut().enumerate() {
            *r = i + s * stretch;
        }
        // SAFETY: the caller runs D's path; i + s·stretch < 3·stretch <= out.len().
        let dots = unsafe { rows.dots(index) };
        for (s, &dot) in dots.iter().enumerate() {
            out[i + s * stretch] = dot;
        }
    }
    for r in STREAMS * stretch..out.len() {
        // SAFETY: as above, r < out.len().
        out[r] = unsafe { rows.dots([r]) }[0];
    }
}
