//! The output head's 6-bit rows ("q6"): their layout, the quantizer, and the
//! activations their dots take. The dots themselves are `head::q6_dots`
//! (scalar definition in `scalar::head`).
//!
//! # Why this layout
//! The head is read whole for every generated token (328 MB of int8 rows for
//! 2B4T, ~40 % of a token's bytes), so its bytes are what matter; its
//! arithmetic is a few operations per byte. One scale per row at 6 bits
//! would be too coarse (a row's largest value sets the step of all 2560), so
//! each row is cut into blocks of 32 columns with an 8-bit sub-scale each,
//! under one f32 step per row: value = `step · s · (u − 32)`, 6.25 bits a
//! weight (2004 bytes for a 2560-column row against 2564 as int8).
//!
//! The dot with the int8 activation codes x stays an integer for the whole
//! row (as llama.cpp's Q6_K does for a super-block): `Σ_b s_b · Σ_{c ∈ b} (u_c
//! − 32) · x_c`, computed as `Σ_b s_b Σ u_c x_c − 32 · Σ_b s_b X_b`, where
//! `X_b = Σ_{c ∈ b} x_c` is the activation's block sum (taken once per token
//! and shared by every row). The unsigned codes u ∈ [0, 63] go straight into
//! `vpmaddubsw` (u8 × i8) and the second sum is a short dot of the row's
//! sub-scales with the block sums. One float epilogue per row, as for int8:
//! every path computes the same integer, so the same f32 logit.
//!
//! A group of 64 columns is 48 bytes of codes:
//! - `low[32]`: byte i holds the low 4 bits of column i (bits 0-3) and of
//!   column 32 + i (bits 4-7): one AND gives columns 0..31, a shift and an
//!   AND columns 32..63.
//! - `high[16]`: byte i holds the top 2 bits of columns i, 16 + i, 32 + i,
//!   48 + i in bits 0-1, 2-3, 4-5, 6-7: broadcast to every 16-byte lane, one
//!   variable shift (or rotate) per lane brings each lane's pair to bits 4-5.
//!
//! Four groups make a band (256 columns) of eight blocks of 32 columns, one
//! sub-scale each: column c (0..63) of each of the band's groups belongs to
//! block `(c >> 2) & 7`, its lane, so that every run of four columns (what
//! one 32-bit lane of `vpdpbusd` or `vpmaddubsw` + `vpmaddwd` sums) is of one
//! block, and columns c and 32 + c are of the same block (AVX2 adds the two
//! halves' `vpmaddubsw` pairs before scaling them). A tile can then sum a
//! band's codes times activations in 32-bit lanes as plain u8 · i8 dots, and
//! multiply each lane by its block's sub-scale once per band instead of once
//! per group; and the sub-scales of one band are one constant vector
//! `[s0, s0, s1, s1, …]` for `vpmaddubsw` pairs. Which columns share a scale
//! does not matter to the accuracy: a block is 32 columns of the row either
//! way (strided blocks measured as accurate as contiguous ones).
//!
//! A row is its groups' codes, then its bands' sub-scales (`[groups, 48]`
//! then `[bands, 8]`, that is `[groups, 2]`: 6.25 bits a weight), so that
//! the short dot with the block sums reads one contiguous run; rows follow
//! each other with nothing between them. A row's groups are padded to whole
//! bands.

use rayon::prelude::*;

use crate::error::{Result, TritError};
use crate::kernels::activations::clamped_code;
use crate::memory::{advise_huge_pages, try_zeroed};

/// Columns of a group.
pub const GROUP: usize = 64;
/// Code bytes of a group: 32 of low nibbles, 16 of high bit pairs.
pub const GROUP_CODE_BYTES: usize = 48;
/// Groups of a band: the groups whose blocks share sub-scales.
pub const BAND_GROUPS: usize = 4;
/// Blocks (sub-scales) of a band.
pub const BLOCKS_PER_BAND: usize = 8;
/// Bytes of a whole band, sub-scales included: 6.25 bits a weight.
const BAND_BYTES: usize = BAND_GROUPS * GROUP_CODE_BYTES + BLOCKS_PER_BAND;
const _: () = assert!(BAND_BYTES * 8 == BAND_GROUPS * GROUP * 25 / 4);
/// What a code u stands for: u − CODE_OFFSET, in [−32, 31].
pub const CODE_OFFSET: i32 = 32;
/// The largest sub-scale.
pub const MAX_SUB_SCALE: u8 = 255;
/// Half-steps a block's largest magnitude spans: it maps to ±31.5, so that
/// after rounding a positive extreme lands on 31 (clamped) and a negative
/// one on −32, each within half a step.
const HALF_RANGE: f32 = 31.5;

/// Groups a SIMD path sums in 32-bit lanes before widening to i64 (8192
/// columns): every path gives each 32-bit lane at most 1/8 of the columns it
/// sums (8 lanes on AVX2, 16 on AVX-512, two accumulators of 4 on Neon),
/// 1024 here, and a column adds at most 63 · 127 · 255 = 2,040,255, so a
/// lane stays below 1024 · 2,040,255 = 2,089,221,120 < 2^31. The block-sum
/// dot of a span is smaller: 256 terms of at most 255 · 4064.
pub const SPAN_GROUPS: usize = 128;
// A span is whole bands: its blocks are `band_start(g0)..blocks_for(g1)`.
const _: () = assert!(SPAN_GROUPS.is_multiple_of(BAND_GROUPS));
const _: () =
    assert!((SPAN_GROUPS * GROUP / 8) as u64 * 63 * 127 * MAX_SUB_SCALE as u64 <= i32::MAX as u64);

/// The groups a row of `cols` columns takes (at least one, so that every
/// row has a place in memory).
pub fn groups_for(cols: usize) -> usize {
    cols.div_ceil(GROUP).max(1)
}

/// The sub-scales of a row of `groups` groups (and the block sums of a
/// token): eight for each band, the last one possibly short of groups.
pub fn blocks_for(groups: usize) -> usize {
    groups.div_ceil(BAND_GROUPS) * BLOCKS_PER_BAND
}

/// The bytes of a row of `groups` groups: its codes, then its sub-scales.
pub fn row_bytes(groups: usize) -> usize {
    groups * GROUP_CODE_BYTES + blocks_for(groups)
}

/// The 6-bit code of column `c` (0..64) of a group's 48 code bytes.
#[inline(always)]
pub fn code(group: &[u8], c: usize) -> u8 {
    let low = group[c % 32] >> (4 * (c / 32)) & 0x0F;
    let high = group[32 + c % 16] >> (2 * (c / 16)) & 0x03;
    low | high << 4
}

/// The block of its band (0..8) that column `c` (0..64) of a group belongs to.
#[inline(always)]
pub fn lane_of(c: usize) -> usize {
    (c >> 2) & 7
}

/// Where group g's band's sub-scales (or block sums) begin in a row's.
#[inline(always)]
pub fn band_start(g: usize) -> usize {
    g / BAND_GROUPS * BLOCKS_PER_BAND
}

/// The index among a row's sub-scales (and a token's block sums) of the
/// block of column `c` (0..64) of group g.
#[inline(always)]
pub fn block_index(g: usize, c: usize) -> usize {
    band_start(g) + lane_of(c)
}

/// A matrix of 6-bit rows (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct Q6Matrix {
    rows: usize,
    cols: usize,
    groups: usize,
    data: Vec<u8>,   // [rows, row_bytes(groups)]
    steps: Vec<f32>, // [rows] value of one code step at sub-scale 1
}

impl Q6Matrix {
    /// Quantizes a rows × cols matrix row by row (in parallel: a vocabulary
    /// has 128256 rows) from `fill_row(r, out)`, which writes row r as f32.
    /// An error, not an abort, if the rows do not fit in memory.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        fill_row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Q6Matrix> {
        let groups = groups_for(cols);
        let row_bytes = row_bytes(groups);
        let what = format!("the 6-bit rows of a {rows} × {cols} matrix");
        let len = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))?;
        let mut data: Vec<u8> = try_zeroed(len, &what)?;
        // Read whole for every token: in 2 MiB pages, not a TLB miss every 4
        // KiB (docs/performance.md, "Output head").
        advise_huge_pages(&data);
        let mut steps: Vec<f32> = try_zeroed(rows, &what)?;
        let quantize = |row: &mut Vec<f32>, (r, (out, step)): (usize, (&mut [u8], &mut f32))| {
            fill_row(r, &mut row[..cols]);
            *step = quantize_row(row, out);
        };
        let padded_row = || vec![0.0f32; groups * GROUP];
        // A small matrix (the start-up self-check's) stays on this thread:
        // no thread pool is started for it.
        if rows * cols < 1 << 16 {
            let mut row = padded_row();
            data.chunks_mut(row_bytes)
                .zip(steps.iter_mut())
                .enumerate()
                .for_each(|item| quantize(&mut row, item));
        } else {
            data.par_chunks_mut(row_bytes)
                .zip(steps.par_iter_mut())
                .enumerate()
                .for_each_init(padded_row, quantize);
        }
        Ok(Q6Matrix {
            rows,
            cols,
            groups,
            data,
            steps,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.steps.len() * std::mem::size_of::<f32>()
    }

    /// The step of row r: its values are `step · s · (u − 32)`.
    pub fn step(&self, r: usize) -> f32 {
        self.steps[r]
    }

    /// Rows `first..first + count`.
    pub fn rows_view(&self, first: usize, count: usize) -> Q6Rows<'_> {
        let row_bytes = row_bytes(self.groups);
        Q6Rows::new(
            &self.data[first * row_bytes..(first + count) * row_bytes],
            self.groups,
        )
    }

    /// Row `r` dequantized into `out` ([cols]): `f32(s · (u − 32)) · step`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let row = self.rows_view(r, 1);
        let (codes, scales) = (row.codes(0), row.scales(0));
        let step = self.steps[r];
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            let (g, k) = (c / GROUP, c % GROUP);
            let u = code(&codes[g * GROUP_CODE_BYTES..], k);
            let s = scales[block_index(g, k)];
            *o = (i32::from(s) * (i32::from(u) - CODE_OFFSET)) as f32 * step;
        }
    }
}

/// Quantizes one row, `values` padded with zeros to whole groups, into
/// `out` ([row_bytes(groups)]); returns the row's step.
///
/// The step is `max(absmax, 1e-5) / (31.5 · 255)`; a block whose largest
/// magnitude is a gets the smallest sub-scale s with `a <= 31.5 · s · step`
/// (s = ⌈255 · a / absmax⌉: a block step at most one row step, 1/255 of the
/// largest block's, coarser than `a / 31.5`), and each value the code `clamp(round_half_even(w / (s · step)), −32,
/// 31) + 32`; an all-zero block has s = 0 and codes 32.
fn quantize_row(values: &[f32], out: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let step = absmax.max(1e-5) / (HALF_RANGE * f32::from(MAX_SUB_SCALE));
    let groups = values.len() / GROUP;
    let (codes, scales) = out.split_at_mut(groups * GROUP_CODE_BYTES);
    let band_columns = BAND_GROUPS * GROUP;
    for ((band, band_codes), band_scales) in values
        .chunks(band_columns)
        .zip(codes.chunks_mut(BAND_GROUPS * GROUP_CODE_BYTES))
        .zip(scales.chunks_exact_mut(BLOCKS_PER_BAND))
    {
        let mut block_max = [0.0f32; BLOCKS_PER_BAND];
        for (k, v) in band.iter().enumerate() {
            let b = lane_of(k % GROUP);
            block_max[b] = block_max[b].max(v.abs());
        }
        let mut inverse = [0.0f32; BLOCKS_PER_BAND]; // 1 / (s · step), 0 when s = 0
        for (b, &a) in block_max.iter().enumerate() {
            let s = (a / (HALF_RANGE * step))
                .ceil()
                .clamp(0.0, f32::from(MAX_SUB_SCALE)) as u8;
            band_scales[b] = s;
            if s > 0 {
                inverse[b] = 1.0 / (f32::from(s) * step);
            }
        }
        for (group, bytes) in band
            .chunks_exact(GROUP)
            .zip(band_codes.chunks_exact_mut(GROUP_CODE_BYTES))
        {
            bytes.fill(0);
            for (c, &v) in group.iter().enumerate() {
                let q = six_bit_code(v * inverse[lane_of(c)]);
                let u = (q + CODE_OFFSET) as u8;
                bytes[c % 32] |= (u & 0x0F) << (4 * (c / 32));
                bytes[32 + c % 16] |= (u >> 4) << (2 * (c / 16));
            }
        }
    }
    step
}

/// `clamp(round_half_even(v), -32, 31)`, 0 for NaN.
#[inline(always)]
fn six_bit_code(v: f32) -> i32 {
    i32::from(clamped_code(v, -32, 31))
}

/// Consecutive q6 rows: `[len, row_bytes(groups)]`, each row its codes
/// then its sub-scales.
#[derive(Clone, Copy)]
pub struct Q6Rows<'a> {
    data: &'a [u8],
    groups: usize,
}

impl<'a> Q6Rows<'a> {
    /// `data` must hold whole rows of `groups` groups.
    pub fn new(data: &'a [u8], groups: usize) -> Self {
        assert!(groups > 0 && data.len().is_multiple_of(row_bytes(groups)));
        Q6Rows { data, groups }
    }

    pub fn len(&self) -> usize {
        self.data.len() / (row_bytes(self.groups))
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Row r: [row_bytes(groups)].
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let row_bytes = row_bytes(self.groups);
        &self.data[r * row_bytes..(r + 1) * row_bytes]
    }

    /// Row r's codes: [groups, GROUP_CODE_BYTES].
    #[inline(always)]
    pub fn codes(&self, r: usize) -> &'a [u8] {
        &self.row(r)[..self.groups * GROUP_CODE_BYTES]
    }

    /// Row r's sub-scales: [bands, BLOCKS_PER_BAND].
    #[inline(always)]
    pub fn scales(&self, r: usize) -> &'a [u8] {
        &self.row(r)[self.groups * GROUP_CODE_BYTES..]
    }

    /// Rows `first..first + count`.
    pub fn slice(&self, first: usize, count: usize) -> Q6Rows<'a> {
        let row_bytes = row_bytes(self.groups);
        Q6Rows::new(
            &self.data[first * row_bytes..(first + count) * row_bytes],
            self.groups,
        )
    }
}

/// Int8 activation codes of tokens, laid out for q6 rows: each token's codes
/// padded with zeros to whole groups, and its block sums.
#[derive(Clone, Copy)]
pub struct Q6Tokens<'a> {
    codes: &'a [i8], // [tokens, groups · GROUP]
    sums: &'a [i16], // [tokens, blocks_for(groups)]
    groups: usize,
}

impl<'a> Q6Tokens<'a> {
    pub fn len(&self) -> usize {
        self.codes.len() / (self.groups * GROUP)
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Token i's codes: [groups · GROUP].
    #[inline(always)]
    pub fn codes(&self, i: usize) -> &'a [i8] {
        let n = self.groups * GROUP;
        &self.codes[i * n..(i + 1) * n]
    }

    /// Token i's block sums: [blocks_for(groups)] (a row's sub-scales'
    /// layout), `X_b = Σ_{c ∈ b} x_c`.
    #[inline(always)]
    pub fn sums(&self, i: usize) -> &'a [i16] {
        let n = blocks_for(self.groups);
        &self.sums[i * n..(i + 1) * n]
    }

    /// Token i alone.
    pub fn token(&self, i: usize) -> Q6Tokens<'a> {
        Q6Tokens {
            codes: self.codes(i),
            sums: self.sums(i),
            groups: self.groups,
        }
    }
}

/// Owned `Q6Tokens`: codes written by the caller (`code_rows_mut`), block
/// sums taken by `finish`.
#[derive(Clone, Debug, Default)]
pub struct Q6Activations {
    codes: Vec<i8>, // [tokens, groups · GROUP]
    sums: Vec<i16>, // [tokens, blocks_for(groups)]
    groups: usize,
}

impl Q6Activations {
    /// Zeroed codes for `tokens` tokens of `groups` groups.
    pub fn new(tokens: usize, groups: usize) -> Self {
        Q6Activations {
            codes: vec![0; tokens * groups * GROUP],
            sums: vec![0; tokens * blocks_for(groups)],
            groups,
        }
    }

    /// Each token's codes, [groups · GROUP] (the columns past the matrix's
    /// must stay 0).
    pub fn code_rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, i8> {
        self.codes.chunks_exact_mut(self.groups * GROUP)
    }

    /// Takes the block sums of the codes as written, and returns the view.
    /// A sum is at most 32 · 128 = 4096 in magnitude: an i16.
    pub fn finish(&mut self) -> Q6Tokens<'_> {
        let groups = self.groups;
        let band_sums = self.sums.chunks_exact_mut(BLOCKS_PER_BAND);
        // Each token's groups, band by band (its last band possibly short).
        let token_bands = self
            .codes
            .chunks_exact(groups * GROUP)
            .flat_map(|token| token.chunks(BAND_GROUPS * GROUP));
        for (band, sums) in token_bands.zip(band_sums) {
            sums.fill(0);
            for (k, &x) in band.iter().enumerate() {
                sums[lane_of(k % GROUP)] += i16::from(x);
            }
        }
        Q6Tokens {
            codes: &self.codes,
            sums: &self.sums,
            groups: self.groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Every value comes back within half its block's step (`s · step`),
    /// and that step is at most one row step coarser than the block's own
    /// `a / 31.5`: on rows of several shapes and spreads (a wide column
    /// every 97, a zero block, a constant row), which a misplaced bit, a
    /// block mixed up with the other or a wrong sub-scale would break.
    #[test]
    fn six_bit_codes_round_half_even_and_clamp() {
        let want = |v: f32| v.round_ties_even().clamp(-32.0, 31.0) as i32;
        let mut v = -40.0f32;
        while v <= 40.0 {
            assert_eq!(six_bit_code(v), want(v), "{v}");
            v += 0.125;
        }
        for v in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            31.5,
            -32.5,
            0.49999997,
            -1e9,
        ] {
            assert_eq!(six_bit_code(v), want(v), "{v}");
        }
    }

    #[test]
    fn every_value_is_within_half_its_blocks_step() {
        let mut seed = 7u64;
        for cols in [1usize, 31, 64, 100, 2579] {
            let rows = 6;
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (r, c) = (i / cols, i % cols);
                    let v = (xorshift(&mut seed) % 20001) as f32 / 10000.0 - 1.0;
                    match r {
                        0 => 0.0,
                        1 => -0.25,
                        2 if c < 64 => 0.0, // a zero group beside others
                        3 => v * 1e-3 * (1.0 + 30.0 * f32::from(u8::from(c % 97 == 5))),
                        _ => v * if c % 97 == 5 { 8.0 } else { 1.0 },
                    }
                })
                .collect();
            let m = Q6Matrix::from_rows(rows, cols, |r, out| {
                out.copy_from_slice(&values[r * cols..(r + 1) * cols])
            })
            .unwrap();
            assert_eq!(m.nbytes(), rows * (row_bytes(groups_for(cols)) + 4));
            let mut back = vec![0.0f32; cols];
            for r in 0..rows {
                m.row_into(r, &mut back);
                let scales = m.rows_view(r, 1).scales(0);
                let row = &values[r * cols..(r + 1) * cols];
                for (c, (&w, &v)) in row.iter().zip(&back).enumerate() {
                    let b = block_index(c / GROUP, c % GROUP);
                    let s = f32::from(scales[b]);
                    let block_max = row
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| block_index(k / GROUP, k % GROUP) == b)
                        .fold(0.0f32, |a, (_, w)| a.max(w.abs()));
                    let block_step = s * m.step(r);
                    let tol = 1e-5 * block_max;
                    assert!(
                        (w - v).abs() <= 0.5 * block_step + tol,
                        "{cols} cols, row {r}, col {c}: {w} -> {v} (step {block_step})"
                    );
                    if block_max > 0.0 {
                        let own = block_max / HALF_RANGE;
                        assert!(block_step <= own + m.step(r) + tol, "{r} {c}");
                        assert!(block_step >= own * (1.0 - 1e-5), "{r} {c}");
                    } else {
                        assert_eq!((s, v), (0.0, 0.0));
                    }
                }
            }
        }
    }

    /// The block sums are those of the codes as written, block by block
    /// (a block: four columns in every eight of each group of a band), and
    /// padding columns stay zero.
    #[test]
    fn block_sums_follow_the_banded_blocks() {
        // Five groups: a whole band and a band of one group.
        let groups = groups_for(300);
        assert_eq!((groups, blocks_for(groups)), (5, 16));
        let mut acts = Q6Activations::new(2, groups);
        for (i, codes) in acts.code_rows_mut().enumerate() {
            for (c, x) in codes.iter_mut().enumerate().take(300) {
                *x = if i == 0 { (c % 100) as i8 } else { -128 };
            }
        }
        let xs = acts.finish();
        // Token 0, band 0 (columns 0..256): block 0 holds columns 0-3, 32-35,
        // 64-67, … (c / 4 % 8 == 0), block 5 columns 20-23, 52-55, ….
        for b in [0usize, 5, 7] {
            let want: i16 = (0..256)
                .filter(|c| c / 4 % 8 == b)
                .map(|c| (c % 100) as i16)
                .sum();
            assert_eq!(xs.sums(0)[b], want, "block {b}");
        }
        // Band 1 holds columns 256..300 only: block 1 has 256 + (4..8, 36..40).
        let want: i16 = (256..300)
            .filter(|c| c / 4 % 8 == 1)
            .map(|c| (c % 100) as i16)
            .sum();
        assert_eq!(xs.sums(0)[BLOCKS_PER_BAND + 1], want);
        // Token 1: every block of band 0 is 32 columns of -128; band 1's
        // 44 columns: blocks 0-2 hold 8 (two runs of 4 below 300), 3-7 hold 4 or 8.
        assert!(xs.sums(1)[..8].iter().all(|&s| s == -4096));
        let band1: Vec<i16> = (0..8)
            .map(|b| -128 * (256..300).filter(|c| c / 4 % 8 == b).count() as i16)
            .collect();
        assert_eq!(&xs.sums(1)[8..16], &band1[..]);
    }
}
