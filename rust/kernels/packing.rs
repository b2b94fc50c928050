//! The packed ternary matrix every kernel reads, in one of three packings
//! (`Packing`): 2 bits per weight (`PackedBlock`), 1.625 (`Tq1Block`), or 1.6
//! in tiles of rows read through lookup tables (`kernels::tl`).

use crate::error::{Result, TritError};
use crate::kernels::tl::{
    tl_byte, tl_groups, tl_plane_chunks, tl_plane_input, tl_tiles, tl_weights, tl_whole_chunks,
    TlLine, TL_CHUNK, TL_GROUP, TL_NEGATED, TL_ROWS, TL_ZERO,
};
use crate::memory::{try_filled, try_reserve_total};

/// Weights per block along the input dimension.
pub const BLOCK: usize = 256;
/// Bytes per block: 2 bits per weight.
pub const BLOCK_BYTES: usize = BLOCK / 4;

/// One block of 256 ternary weights of one row, 2 bits each.
///
/// Byte `j` (0..64) holds the weights `j`, `j + 64`, `j + 128` and `j + 192` of
/// the block in bits 0-1, 2-3, 4-5 and 6-7, each stored as the code `w + 1`
/// (0, 1 or 2; 3 never occurs). Why this order: shifting a vector of the
/// block's bytes right by `2i` and masking with 3 yields the codes of 16, 32 or
/// 64 *consecutive* weights (NEON, AVX2, AVX-512), which multiply a plain
/// contiguous load of activations. Why `w + 1`: the codes are unsigned, as
/// `vpmaddubsw`/`vpdpbusd` want their first operand; the kernels subtract the
/// activation sum once per row to undo the `+ 1`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C, align(64))]
pub struct PackedBlock(pub [u8; BLOCK_BYTES]);

const _: () = assert!(std::mem::size_of::<PackedBlock>() == BLOCK / 4);
const _: () = assert!(std::mem::align_of::<PackedBlock>() == 64);

/// The code of a zero weight; padding past `n_in` holds it.
const ZERO_BYTE: u8 = 0b01_01_01_01;

/// How a matrix stores its weights; every kernel path reads all three.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Packing {
    /// 2 bits per weight (`PackedBlock`): the cheapest to decode.
    #[default]
    I2,
    /// 1.625 bits per weight (`Tq1Block`), five weights per byte: 19 % fewer
    /// bytes than `I2` for a decoded token to read, for more decoding work.
    Tq1,
    /// 1.6 bits per weight, five weights per byte in tiles of 64 rows
    /// (`kernels::tl`): a decoded token looks its bytes up in tables of
    /// activation sums (AVX-512 VBMI) instead of decoding digits.
    Tl,
}

impl Packing {
    pub const ALL: [Packing; 3] = [Packing::I2, Packing::Tq1, Packing::Tl];

    /// "i2", "tq1" or "tl", the names `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            Packing::I2 => "i2",
            Packing::Tq1 => "tq1",
            Packing::Tl => "tl",
        }
    }

    pub fn parse(name: &str) -> Result<Packing> {
        Packing::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown packing {name:?}; expected \"i2\" (2 bits per weight), \"tq1\" \
                     (1.625 bits per weight) or \"tl\" (1.6 bits per weight, looked up)"
                ))
            })
    }

    /// Bytes a matrix of `n_out` rows of `n_in` weights takes in this
    /// packing, as its constructors lay it out (None where that overflows).
    pub fn matrix_bytes(self, n_out: usize, n_in: usize) -> Option<usize> {
        match self {
            Packing::I2 | Packing::Tq1 => {
                let row = blocks_for(n_in).checked_mul(self.block_bytes()?)?;
                n_out.checked_mul(row)
            }
            Packing::Tl => tl_tiles(n_out)
                .checked_mul(tl_groups(n_in))?
                .checked_mul(std::mem::size_of::<TlLine>()),
        }
    }

    /// Bytes of one block of `BLOCK` weights of a row, for the packings
    /// stored row by row (`Tl` interleaves 64 rows: none).
    pub fn block_bytes(self) -> Option<usize> {
        match self {
            Packing::I2 => Some(BLOCK_BYTES),
            Packing::Tq1 => Some(TQ1_BLOCK_BYTES),
            Packing::Tl => None,
        }
    }
}

/// Bytes of a `Tq1Block`: 1.625 bits per weight.
pub const TQ1_BLOCK_BYTES: usize = 52;
/// Bytes 0..32 of a `Tq1Block`: five weights each, the weights 0..160.
pub const TQ1_HEAD: usize = 32;
/// Bytes 32..48: five weights each, the weights 160..240.
pub const TQ1_MID: usize = 16;
/// Bytes 48..52: four 2-bit codes each, the weights 240..256.
pub const TQ1_TAIL: usize = 4;
/// Weights of the head bytes (5 each).
pub const TQ1_HEAD_WEIGHTS: usize = 5 * TQ1_HEAD;
/// The first weight of the tail bytes.
pub const TQ1_TAIL_START: usize = TQ1_HEAD_WEIGHTS + 5 * TQ1_MID;

const _: () = assert!(TQ1_HEAD + TQ1_MID + TQ1_TAIL == TQ1_BLOCK_BYTES);
const _: () = assert!(TQ1_TAIL_START + 4 * TQ1_TAIL == BLOCK);

/// One block of 256 ternary weights of one row in 52 bytes, five weights per
/// byte in base 3 (the scheme of llama.cpp's TQ1_0, in our own order).
///
/// The codes `c = w + 1` (0, 1, 2) of five weights make the number
/// `v = Σ_i c_i · 3^(4 - i)` (0..243), stored as `q = ceil(v · 256 / 243)`,
/// with its top bit flipped (`q ^ 0x80`). Why: `q / 256` is just above `v /
/// 243`, so `(q · 3^i) mod 256` puts digit `c_i` at the top of the byte, where
/// `c_i = [p >= 86] + [p >= 171]` reads it (`tq1_digit`): byte multiplies by
/// 3 are two adds, and the compares are one instruction each. The flipped top
/// bit lets SIMD compare signed bytes (the instruction x86 has): it survives
/// the multiplications, since 128 · 3^i ≡ 128 (mod 256).
///
/// Order: head byte `j` (0..32) holds the weights `j + 32i` (digit i); mid
/// byte `32 + j` (j in 0..16) holds `160 + j + 16i`; the last 4 bytes hold
/// the weights 240..256 as 2-bit codes, byte `48 + j` bits `2i..2i + 1` for
/// weight `240 + j + 4i` (four base-3 digits would take the same 4 bytes).
/// Why this order: each digit of the head bytes is the codes of 32
/// consecutive weights, which multiply one contiguous load of activations
/// (as AVX2 and NEON vectors read it), and the mid bytes' digits pair up into
/// 32 consecutive weights (160..192, 192..224) with the last digit plus the
/// tail codes filling 224..256: a block is eight 32-code vectors, as in
/// `PackedBlock`. Blocks are not aligned (52 bytes apart): the kernels load
/// them unaligned, which costs nothing on the CPUs measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct Tq1Block(pub [u8; TQ1_BLOCK_BYTES]);

const _: () = assert!(std::mem::size_of::<Tq1Block>() == TQ1_BLOCK_BYTES);
const _: () = assert!(std::mem::align_of::<Tq1Block>() == 1);

/// Digit `i` (0..5) of a base-3 byte of a `Tq1Block`: the code of one weight.
#[inline(always)]
pub fn tq1_digit(byte: u8, i: u32) -> u8 {
    let p = (byte ^ 0x80).wrapping_mul(3u8.pow(i));
    u8::from(p >= 86) + u8::from(p >= 171)
}

/// The base-3 byte holding the codes `c` (each 0, 1 or 2).
fn tq1_byte(c: [u8; 5]) -> u8 {
    let v = c.iter().fold(0u32, |v, &d| v * 3 + u32::from(d));
    // v <= 242, so q <= 255.
    let q = (v * 256).div_ceil(243);
    q as u8 ^ 0x80
}

/// Where weight `k` (0..256) of a `Tq1Block` lives: (byte, digit) for a
/// base-3 byte, or (byte, bit shift) past `TQ1_TAIL_START`.
#[inline]
fn tq1_position(k: usize) -> (usize, u32) {
    if k < TQ1_HEAD_WEIGHTS {
        (k % TQ1_HEAD, (k / TQ1_HEAD) as u32)
    } else if k < TQ1_TAIL_START {
        let k = k - TQ1_HEAD_WEIGHTS;
        (TQ1_HEAD + k % TQ1_MID, (k / TQ1_MID) as u32)
    } else {
        let k = k - TQ1_TAIL_START;
        (TQ1_HEAD + TQ1_MID + k % TQ1_TAIL, 2 * (k / TQ1_TAIL) as u32)
    }
}

impl Tq1Block {
    /// The block holding `codes` (`w + 1`, in weight order).
    pub fn encode(codes: &[u8; BLOCK]) -> Tq1Block {
        let mut out = [0u8; TQ1_BLOCK_BYTES];
        for (j, byte) in out[..TQ1_HEAD].iter_mut().enumerate() {
            *byte = tq1_byte(std::array::from_fn(|i| codes[j + TQ1_HEAD * i]));
        }
        for (j, byte) in out[TQ1_HEAD..TQ1_HEAD + TQ1_MID].iter_mut().enumerate() {
            *byte = tq1_byte(std::array::from_fn(|i| {
                codes[TQ1_HEAD_WEIGHTS + j + TQ1_MID * i]
            }));
        }
        for (j, byte) in out[TQ1_HEAD + TQ1_MID..].iter_mut().enumerate() {
            *byte = (0..4).fold(0, |b, i| {
                b | codes[TQ1_TAIL_START + j + TQ1_TAIL * i] << (2 * i)
            });
        }
        Tq1Block(out)
    }

    /// The code (`w + 1`) of weight `k` (0..256).
    #[inline]
    pub fn code(&self, k: usize) -> u8 {
        let (byte, at) = tq1_position(k);
        if k < TQ1_TAIL_START {
            tq1_digit(self.0[byte], at)
        } else {
            (self.0[byte] >> at) & 3
        }
    }

    /// The codes of the block's weights, in weight order.
    pub fn decode(&self) -> [u8; BLOCK] {
        std::array::from_fn(|k| self.code(k))
    }
}

impl PackedBlock {
    /// The code (`w + 1`) of weight `k` (0..256).
    #[inline]
    pub fn code(&self, k: usize) -> u8 {
        (self.0[k % BLOCK_BYTES] >> (2 * (k / BLOCK_BYTES))) & 3
    }

    /// The block holding `codes` (`w + 1`, in weight order).
    pub fn encode(codes: &[u8; BLOCK]) -> PackedBlock {
        PackedBlock(std::array::from_fn(|j| {
            (0..4).fold(0, |b, i| b | codes[j + BLOCK_BYTES * i] << (2 * i))
        }))
    }
}

/// The blocks of a matrix, in its packing.
#[derive(Clone, Debug, PartialEq)]
enum Blocks {
    /// [n_out, blocks_per_row]
    I2(Vec<PackedBlock>),
    /// [n_out, blocks_per_row]
    Tq1(Vec<Tq1Block>),
    Tl {
        /// [tiles, groups]: line g of tile t holds group g of its 64 rows.
        lines: Vec<TlLine>,
        /// [n_out]: the row's bytes with their top bit set (negated groups),
        /// which the lookup kernels count as one short each.
        negated: Vec<u32>,
    },
}

/// A ternary weight matrix `W[n_out, n_in]` with one f32 scale:
/// the real weight is `W[n, k] * scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    n_out: usize,
    n_in: usize,
    scale: f32,
    /// Rows padded with zero weights to a whole block.
    blocks: Blocks,
}

/// One output row from one Hugging Face packed row: the codes in bits
/// `shift..shift + 2` of `source` ([n_in] bytes), laid out as blocks.
fn repack_row(source: &[u8], shift: u32, row: &mut [PackedBlock]) {
    let n_in = source.len();
    let code = |k: usize| {
        if k < n_in {
            (source[k] >> shift) & 3
        } else {
            1
        }
    };
    for (b, block) in row.iter_mut().enumerate() {
        let k0 = b * BLOCK;
        if k0 + BLOCK <= n_in {
            let src = &source[k0..k0 + BLOCK];
            for (j, byte) in block.0.iter_mut().enumerate() {
                *byte = ((src[j] >> shift) & 3)
                    | ((src[j + 64] >> shift) & 3) << 2
                    | ((src[j + 128] >> shift) & 3) << 4
                    | ((src[j + 192] >> shift) & 3) << 6;
            }
        } else {
            for (j, byte) in block.0.iter_mut().enumerate() {
                let k = k0 + j;
                *byte = code(k) | code(k + 64) << 2 | code(k + 128) << 4 | code(k + 192) << 6;
            }
        }
    }
}

/// Number of 256-weight blocks needed for `n_in` weights.
pub fn blocks_for(n_in: usize) -> usize {
    n_in.div_ceil(BLOCK)
}

impl TernaryMatrix {
    /// Packs `weights` ([n_out, n_in] row-major, values in {-1, 0, 1}).
    pub fn pack(weights: &[i8], n_out: usize, n_in: usize, scale: f32) -> Result<Self> {
        check_dims(n_out, n_in)?;
        if n_out.checked_mul(n_in) != Some(weights.len()) {
            return Err(TritError::invalid(format!(
                "weights hold {} values, not n_out * n_in = {n_out} * {n_in}",
                weights.len()
            )));
        }
        if let Some(pos) = weights.iter().position(|w| !(-1..=1).contains(w)) {
            return Err(TritError::invalid(format!(
                "weight [{}, {}] is {}; ternary weights must be -1, 0 or 1",
                pos / n_in,
                pos % n_in,
                weights[pos]
            )));
        }
        Self::from_fn(n_out, n_in, scale, |n, k| weights[n * n_in + k])
    }

    /// Packs the weight matrix whose element `[n, k]` is `weight(n, k)` (in {-1, 0, 1}).
    pub fn from_fn(
        n_out: usize,
        n_in: usize,
        scale: f32,
        mut weight: impl FnMut(usize, usize) -> i8,
    ) -> Result<Self> {
        check_dims(n_out, n_in)?;
        check_scale(scale)?;
        let per_row = blocks_for(n_in);
        let mut blocks = zero_blocks(n_out, n_in)?;
        // A row's codes first, then whole blocks encoded from them: a
        // read-modify-write of a byte per weight took most of a load of
        // float masters. Codes past n_in stay 1 (zero weights).
        let mut codes = try_filled(per_row * BLOCK, 1u8, "a row of codes")?;
        for (n, row) in blocks.chunks_exact_mut(per_row).enumerate() {
            for (k, code) in codes[..n_in].iter_mut().enumerate() {
                let w = weight(n, k);
                debug_assert!((-1..=1).contains(&w));
                *code = (w + 1) as u8;
            }
            for (block, c) in row.iter_mut().zip(codes.chunks_exact(BLOCK)) {
                *block = PackedBlock::encode(as_block(c));
            }
        }
        Ok(TernaryMatrix {
            n_out,
            n_in,
            scale,
            blocks: Blocks::I2(blocks),
        })
    }

    /// Repacks a Hugging Face packed weight: `packed` is U8 [n_out / 4, n_in]
    /// whose packed row `r` holds output row `i * n_out / 4 + r` in bits
    /// `2i..2i+1` as the code `w + 1` (docs/formats.md "Packing"). The codes are the same
    /// as ours, only placed differently, so bytes are assembled directly.
    /// The caller checks that no code is 3 and that n_out is a multiple of 4.
    pub fn from_hf_packed(packed: &[u8], n_out: usize, n_in: usize, scale: f32) -> Result<Self> {
        check_dims(n_out, n_in)?;
        check_scale(scale)?;
        if !n_out.is_multiple_of(4) || (n_out / 4).checked_mul(n_in) != Some(packed.len()) {
            return Err(TritError::invalid(format!(
                "a packed weight of [{n_out}, {n_in}] must hold [{}, {n_in}] bytes, got {}",
                n_out / 4,
                packed.len()
            )));
        }
        let per_row = blocks_for(n_in);
        let rows = n_out / 4;
        let mut blocks = zero_blocks(n_out, n_in)?;
        // Packed row r feeds output rows r, r + R, r + 2R and r + 3R: fill
        // all four from one read of it (the source is read once, not four times).
        let (quarter0, rest) = blocks.split_at_mut(rows * per_row);
        let (quarter1, rest) = rest.split_at_mut(rows * per_row);
        let (quarter2, quarter3) = rest.split_at_mut(rows * per_row);
        let quarters = [quarter0, quarter1, quarter2, quarter3];
        let mut outs: Vec<_> = quarters
            .into_iter()
            .map(|q| q.chunks_exact_mut(per_row))
            .collect();
        for source in packed.chunks_exact(n_in) {
            for (i, out) in outs.iter_mut().enumerate() {
                let row = out.next().expect("one output row per packed row");
                repack_row(source, 2 * i as u32, row);
            }
        }
        Ok(TernaryMatrix {
            n_out,
            n_in,
            scale,
            blocks: Blocks::I2(blocks),
        })
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Blocks per row: `n_in` rounded up to a whole block, over 256.
    pub fn blocks_per_row(&self) -> usize {
        blocks_for(self.n_in)
    }

    /// `n_in` rounded up to a whole block.
    pub fn k_padded(&self) -> usize {
        self.blocks_per_row() * BLOCK
    }

    pub fn packing(&self) -> Packing {
        match self.blocks {
            Blocks::I2(_) => Packing::I2,
            Blocks::Tq1(_) => Packing::Tq1,
            Blocks::Tl { .. } => Packing::Tl,
        }
    }

    /// The 2-bit blocks of row `n`.
    ///
    /// # Panics
    /// If the matrix is packed as `Packing::Tq1` (kernels check the packing first).
    pub fn row(&self, n: usize) -> &[PackedBlock] {
        let per_row = self.blocks_per_row();
        match &self.blocks {
            Blocks::I2(blocks) => &blocks[n * per_row..(n + 1) * per_row],
            _ => panic!("row() of a matrix packed as {}", self.packing().name()),
        }
    }

    /// The 1.625-bit blocks of row `n`.
    ///
    /// # Panics
    /// If the matrix is packed as `Packing::I2` (kernels check the packing first).
    pub fn tq1_row(&self, n: usize) -> &[Tq1Block] {
        let per_row = self.blocks_per_row();
        match &self.blocks {
            Blocks::Tq1(blocks) => &blocks[n * per_row..(n + 1) * per_row],
            _ => panic!("tq1_row() of a matrix packed as {}", self.packing().name()),
        }
    }

    /// The lines of a `Packing::Tl` matrix ([tiles, groups]) and the count of
    /// negated groups of each row ([n_out]).
    ///
    /// # Panics
    /// If the matrix is packed otherwise (kernels check the packing first).
    pub fn tl_parts(&self) -> (&[TlLine], &[u32]) {
        match &self.blocks {
            Blocks::Tl { lines, negated } => (lines, negated),
            _ => panic!("tl_parts() of a matrix packed as {}", self.packing().name()),
        }
    }

    /// The byte of group `g` of row `n` of a `Packing::Tl` matrix.
    fn tl_byte_at(&self, n: usize, g: usize) -> u8 {
        let (lines, _) = self.tl_parts();
        lines[(n / TL_ROWS) * tl_groups(self.n_in) + g].0[n % TL_ROWS]
    }

    /// The codes (`w + 1`) of row `n`'s weights `k0..k0 + out.len()` into
    /// `out` (1, a zero weight, past `n_in`): how the GEMM reads a `Tl` row.
    ///
    /// # Panics
    /// If the matrix is not packed as `Packing::Tl`.
    pub fn tl_row_codes(&self, n: usize, k0: usize, out: &mut [u8]) {
        let (lines, _) = self.tl_parts();
        let groups = tl_groups(self.n_in);
        let row_lines = &lines[(n / TL_ROWS) * groups..][..groups];
        let lane = n % TL_ROWS;
        let codes = |g: usize| TL_CODE_WORDS[usize::from(row_lines[g].0[lane])].to_le_bytes();
        let code = |k: usize| {
            let g = k / TL_GROUP;
            if g < groups {
                codes(g)[k % TL_GROUP]
            } else {
                1
            }
        };
        let end = k0 + out.len();
        // The groups wholly inside k0..end and the row: their codes five at
        // a time; the ends (parts of groups, padding) one by one.
        let g0 = k0.div_ceil(TL_GROUP);
        let g1 = (end / TL_GROUP).min(groups);
        if g0 >= g1 {
            for (k, c) in (k0..end).zip(out.iter_mut()) {
                *c = code(k);
            }
            return;
        }
        let (head, rest) = out.split_at_mut(TL_GROUP * g0 - k0);
        let (whole, tail) = rest.split_at_mut(TL_GROUP * (g1 - g0));
        for (k, c) in (k0..).zip(head.iter_mut()) {
            *c = code(k);
        }
        for (dst, line) in whole.chunks_exact_mut(TL_GROUP).zip(&row_lines[g0..g1]) {
            dst.copy_from_slice(
                &TL_CODE_WORDS[usize::from(line.0[lane])].to_le_bytes()[..TL_GROUP],
            );
        }
        for (k, c) in (TL_GROUP * g1..).zip(tail.iter_mut()) {
            *c = code(k);
        }
    }

    /// `tl_row_codes` in the GEMM's order of a tl matrix's inputs: position
    /// `p` of `k0..k0 + out.len()` gets the code of input `tl_plane_input(p)`
    /// (`kernels::tl`, "digit planes"). What every GEMM path unpacks.
    ///
    /// # Panics
    /// If the matrix is not packed as `Packing::Tl`.
    pub fn tl_plane_codes(&self, n: usize, k0: usize, out: &mut [u8]) {
        let (lines, _) = self.tl_parts();
        let groups = tl_groups(self.n_in);
        let row_lines = &lines[(n / TL_ROWS) * groups..][..groups];
        let lane = n % TL_ROWS;
        let chunks = tl_plane_chunks(self.n_in, self.k_padded());
        let planes_end = chunks * TL_CHUNK;
        let end = k0 + out.len();
        if end > planes_end {
            // Past the planes the inputs keep their order.
            let from = k0.max(planes_end);
            self.tl_row_codes(n, from, &mut out[from - k0..]);
        }
        // Whole chunks five planes at a time; the positions around them one by one.
        let whole = tl_whole_chunks(k0, end, chunks);
        let planes_stop = end.min(planes_end);
        let (w0, w1) = if whole.is_empty() {
            (planes_stop, planes_stop)
        } else {
            (TL_CHUNK * whole.start, TL_CHUNK * whole.end)
        };
        for p in (k0..w0).chain(w1..planes_stop) {
            let k = tl_plane_input(p, chunks);
            out[p - k0] = TL_CODE_WORDS[usize::from(row_lines[k / TL_GROUP].0[lane])].to_le_bytes()
                [k % TL_GROUP];
        }
        for c in whole {
            let dst = &mut out[TL_CHUNK * c - k0..][..TL_CHUNK];
            for (g, line) in row_lines[64 * c..64 * (c + 1)].iter().enumerate() {
                let codes = TL_CODE_WORDS[usize::from(line.0[lane])].to_le_bytes();
                for (i, &code) in codes[..TL_GROUP].iter().enumerate() {
                    dst[64 * i + g] = code;
                }
            }
        }
    }

    /// The first byte of row `n`'s blocks, whatever the packing (for prefetching).
    pub(crate) fn row_start(&self, n: usize) -> *const u8 {
        match self.packing() {
            Packing::I2 => self.row(n).as_ptr().cast(),
            Packing::Tq1 => self.tq1_row(n).as_ptr().cast(),
            Packing::Tl => self.tl_parts().0[(n / TL_ROWS) * tl_groups(self.n_in)..]
                .as_ptr()
                .cast(),
        }
    }

    /// Bytes of packed weights (what one matmul streams).
    pub fn packed_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::I2(blocks) => blocks.len() * BLOCK_BYTES,
            Blocks::Tq1(blocks) => blocks.len() * TQ1_BLOCK_BYTES,
            Blocks::Tl { lines, .. } => std::mem::size_of_val(lines.as_slice()),
        }
    }

    /// The weight `[n, k]` in {-1, 0, 1}.
    pub fn get(&self, n: usize, k: usize) -> i8 {
        match self.packing() {
            Packing::I2 => self.row(n)[k / BLOCK].code(k % BLOCK) as i8 - 1,
            Packing::Tq1 => self.tq1_row(n)[k / BLOCK].code(k % BLOCK) as i8 - 1,
            Packing::Tl => tl_weights(self.tl_byte_at(n, k / TL_GROUP))[k % TL_GROUP],
        }
    }

    /// The same weights in `packing`: a copy, allocated fallibly (models
    /// are large), converted block by block where the packings differ.
    pub fn repacked(&self, packing: Packing) -> Result<TernaryMatrix> {
        let blocks = match (&self.blocks, packing) {
            (Blocks::I2(from), Packing::I2) => Blocks::I2(convert(from, |&b| b)?),
            (Blocks::Tq1(from), Packing::Tq1) => Blocks::Tq1(convert(from, |&b| b)?),
            (Blocks::I2(from), Packing::Tq1) => {
                Blocks::Tq1(convert(from, |b| Tq1Block::encode(&decode_i2(b)))?)
            }
            (Blocks::Tq1(from), Packing::I2) => {
                Blocks::I2(convert(from, |b| PackedBlock::encode(&b.decode()))?)
            }
            (_, Packing::Tl) => self.to_tl()?,
            (Blocks::Tl { .. }, _) => self.tl_to_rows(packing)?,
        };
        Ok(TernaryMatrix {
            n_out: self.n_out,
            n_in: self.n_in,
            scale: self.scale,
            blocks,
        })
    }

    /// The codes (`w + 1`) of row `n`, padded with 1 to whole blocks.
    fn row_codes(&self, n: usize, out: &mut [u8]) {
        debug_assert_eq!(out.len(), self.k_padded());
        match &self.blocks {
            Blocks::I2(_) => {
                for (block, codes) in self.row(n).iter().zip(out.chunks_exact_mut(BLOCK)) {
                    codes.copy_from_slice(&decode_i2(block));
                }
            }
            Blocks::Tq1(_) => {
                for (block, codes) in self.tq1_row(n).iter().zip(out.chunks_exact_mut(BLOCK)) {
                    codes.copy_from_slice(&block.decode());
                }
            }
            Blocks::Tl { .. } => self.tl_row_codes(n, 0, out),
        }
    }

    /// The `Blocks::Tl` of this matrix's weights, allocated fallibly.
    fn to_tl(&self) -> Result<Blocks> {
        let groups = tl_groups(self.n_in);
        // tiles · groups · 64 < n_out · n_in + 64 · groups: both exist as
        // blocks already, so the product cannot overflow.
        let mut lines = try_filled(
            tl_tiles(self.n_out) * groups,
            TlLine([TL_ZERO; TL_ROWS]),
            "a tl-packed ternary matrix",
        )?;
        let mut negated = try_filled(self.n_out, 0u32, "a tl-packed ternary matrix")?;
        let mut codes = try_filled(self.k_padded(), 1u8, "a row of codes")?;
        let whole = self.n_in / TL_GROUP; // groups with no input past n_in
        for n in 0..self.n_out {
            self.row_codes(n, &mut codes);
            let tile = &mut lines[(n / TL_ROWS) * groups..][..groups];
            let lane = n % TL_ROWS;
            let mut count = 0u32;
            let mut put = |line: &mut TlLine, group: [u8; TL_GROUP]| {
                let byte = tl_byte(group);
                line.0[lane] = byte;
                count += u32::from(byte & TL_NEGATED != 0);
            };
            let (full, last) = tile.split_at_mut(whole);
            for (line, group) in full.iter_mut().zip(codes.chunks_exact(TL_GROUP)) {
                put(line, [group[0], group[1], group[2], group[3], group[4]]);
            }
            if let Some(line) = last.first_mut() {
                // Past n_in: zero weights (code 1).
                put(
                    line,
                    std::array::from_fn(|i| {
                        let k = whole * TL_GROUP + i;
                        if k < self.n_in {
                            codes[k]
                        } else {
                            1
                        }
                    }),
                );
            }
            negated[n] = count;
        }
        Ok(Blocks::Tl { lines, negated })
    }

    /// The blocks in `packing` of a `Packing::Tl` matrix.
    fn tl_to_rows(&self, packing: Packing) -> Result<Blocks> {
        Ok(match packing {
            Packing::I2 => Blocks::I2(self.encode_rows(PackedBlock::encode)?),
            Packing::Tq1 => Blocks::Tq1(self.encode_rows(Tq1Block::encode)?),
            Packing::Tl => self.to_tl()?,
        })
    }

    /// Every row's blocks as `encode` makes them from their codes, allocated fallibly.
    fn encode_rows<B>(&self, encode: impl Fn(&[u8; BLOCK]) -> B) -> Result<Vec<B>> {
        let mut out = Vec::new();
        // As many blocks as the matrix's own bytes cover: no overflow.
        let len = self.n_out * self.blocks_per_row();
        try_reserve_total(&mut out, len, "a repacked ternary matrix")?;
        let mut codes = try_filled(self.k_padded(), 1u8, "a row of codes")?;
        for n in 0..self.n_out {
            self.row_codes(n, &mut codes);
            out.extend(codes.chunks_exact(BLOCK).map(|c| encode(as_block(c))));
        }
        Ok(out)
    }

    /// The weights as [n_out, n_in] row-major values in {-1, 0, 1}.
    pub fn unpack(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.n_out * self.n_in);
        self.unpack_into(&mut out);
        out
    }

    /// As `unpack`, an error instead of an abort if there is no memory for
    /// the values (4x the packed bytes).
    pub fn try_unpack(&self) -> Result<Vec<i8>> {
        let mut out = Vec::new();
        // The product is below 4 * packed_bytes, which exist: no overflow.
        let len = self.n_out * self.n_in;
        try_reserve_total(&mut out, len, "the unpacked ternary matrix")?;
        self.unpack_into(&mut out);
        Ok(out)
    }

    fn unpack_into(&self, out: &mut Vec<i8>) {
        for n in 0..self.n_out {
            out.extend((0..self.n_in).map(|k| self.get(n, k)));
        }
    }
}

/// The codes of each `Tl` byte's group in the low five bytes of a word (one
/// store writes a group's codes).
static TL_CODE_WORDS: [u64; 256] = {
    let mut words = [0u64; 256];
    let mut byte = 0;
    while byte < 256 {
        // As `tl_codes`, in a const context.
        let negated = byte & TL_NEGATED as usize != 0;
        let mut m = byte & !(TL_NEGATED as usize);
        let mut word = 0u64;
        let mut i = 0;
        while i < TL_GROUP {
            let digit = (m % 3) as u64;
            m /= 3;
            let code = if negated { 2 - digit } else { digit };
            word |= code << (8 * i);
            i += 1;
        }
        words[byte] = word;
        byte += 1;
    }
    words
};

/// A chunk of `BLOCK` codes as an array.
fn as_block(codes: &[u8]) -> &[u8; BLOCK] {
    codes.try_into().expect("chunks of BLOCK codes")
}

/// The codes of a 2-bit block, in weight order.
fn decode_i2(block: &PackedBlock) -> [u8; BLOCK] {
    // Plane by plane (weight k = 64 · plane + byte, as `PackedBlock::code`
    // reads it): shifts and masks of whole byte runs, which vectorize.
    let mut codes = [0u8; BLOCK];
    for (plane, out) in codes.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        for (code, &byte) in out.iter_mut().zip(&block.0) {
            *code = (byte >> (2 * plane)) & 3;
        }
    }
    codes
}

/// `from` block by block through `f`, into a vector allocated fallibly.
fn convert<A, B: Clone>(from: &[A], f: impl Fn(&A) -> B) -> Result<Vec<B>> {
    let mut out = Vec::new();
    try_reserve_total(&mut out, from.len(), "a repacked ternary matrix")?;
    out.extend(from.iter().map(f));
    Ok(out)
}

fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(TritError::invalid(format!(
            "scale must be finite, got {scale}"
        )));
    }
    Ok(())
}

/// The blocks of an [n_out, n_in] matrix of zero weights, allocated
/// fallibly: the dimensions may come from input.
fn zero_blocks(n_out: usize, n_in: usize) -> Result<Vec<PackedBlock>> {
    let len = n_out.checked_mul(blocks_for(n_in)).ok_or_else(|| {
        TritError::invalid(format!(
            "a ternary matrix of [{n_out}, {n_in}] is too large to address"
        ))
    })?;
    try_filled(
        len,
        PackedBlock([ZERO_BYTE; BLOCK_BYTES]),
        &format!("a packed ternary matrix of [{n_out}, {n_in}]"),
    )
}

fn check_dims(n_out: usize, n_in: usize) -> Result<()> {
    if n_out == 0 || n_in == 0 {
        return Err(TritError::invalid(format!(
            "a ternary matrix needs n_out >= 1 and n_in >= 1, got [{n_out}, {n_in}]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_matches_the_documented_bit_positions() {
        // Weight 64*i + j of a block sits in byte j, bits 2i..2i+1.
        let n_in = 300;
        let w: Vec<i8> = (0..n_in)
            .map(|k| {
                if k == 70 {
                    1
                } else if k == 260 {
                    -1
                } else {
                    0
                }
            })
            .collect();
        let m = TernaryMatrix::pack(&w, 1, n_in, 1.0).unwrap();
        let row = m.row(0);
        assert_eq!(row.len(), 2);
        // k = 70 = 64*1 + 6: byte 6, bits 2..3, code 2.
        assert_eq!((row[0].0[6] >> 2) & 3, 2);
        assert_eq!(row[0].0[5], ZERO_BYTE);
        // k = 260 = 256 + 4: block 1, byte 4, bits 0..1, code 0.
        assert_eq!(row[1].0[4] & 3, 0);
        // Padding past n_in is zero weight.
        assert_eq!(row[1].0[63], ZERO_BYTE);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(TernaryMatrix::pack(&[], 0, 3, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 2], 1, 2, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 1, 0], 1, 2, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 1], 1, 2, f32::NAN).is_err());
        // Sizes that overflow or cannot be allocated are errors, not aborts.
        let err = TernaryMatrix::pack(&[0], usize::MAX, 2, 1.0).unwrap_err();
        assert!(err.to_string().contains("not n_out * n_in"), "{err}");
        let err = TernaryMatrix::from_fn(usize::MAX, 300, 1.0, |_, _| 0).unwrap_err();
        assert!(err.to_string().contains("too large to address"), "{err}");
        let err = TernaryMatrix::from_fn(1 << 40, 1 << 20, 1.0, |_, _| 0).unwrap_err();
        assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
        let err = TernaryMatrix::from_hf_packed(&[0; 4], usize::MAX - 3, 2, 1.0).unwrap_err();
        assert!(err.to_string().contains("must hold"), "{err}");
    }

    #[test]
    fn tq1_bytes_decode_every_five_codes() {
        for v in 0..243u32 {
            let c: [u8; 5] = std::array::from_fn(|i| (v / 3u32.pow(4 - i as u32) % 3) as u8);
            let byte = tq1_byte(c);
            for (i, &d) in c.iter().enumerate() {
                assert_eq!(tq1_digit(byte, i as u32), d, "v = {v}, digit {i}");
                // The SIMD paths' signed-byte form of the same compares.
                let p = byte.wrapping_mul(3u8.pow(i as u32)) as i8;
                assert_eq!(
                    u8::from(p > -43) + u8::from(p > 42),
                    d,
                    "v = {v}, digit {i}"
                );
            }
        }
    }

    #[test]
    fn tq1_layout_matches_the_documented_positions() {
        // Weight k holds code k % 3; check each region's byte and digit.
        let codes: [u8; BLOCK] = std::array::from_fn(|k| (k % 3) as u8);
        let block = Tq1Block::encode(&codes);
        assert_eq!(block.decode(), codes);
        // Head byte 5, digit 2: weight 5 + 64.
        assert_eq!(tq1_digit(block.0[5], 2), codes[69]);
        // Mid byte 32 + 3, digit 4: weight 160 + 3 + 64.
        assert_eq!(tq1_digit(block.0[35], 4), codes[227]);
        // Tail byte 48 + 1, bits 4..5: weight 240 + 1 + 8.
        assert_eq!((block.0[49] >> 4) & 3, codes[249]);
    }

    #[test]
    fn packing_names_parse_back() {
        for p in Packing::ALL {
            assert_eq!(Packing::parse(p.name()).unwrap(), p);
        }
        let err = Packing::parse("i3").unwrap_err();
        assert!(err.to_string().contains("unknown packing \"i3\""), "{err}");
    }

    /// `len` weights in {-1, 0, 1} from `seed`.
    fn random_weights(len: usize, seed: u64) -> Vec<i8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 3) as i8 - 1
            })
            .collect()
    }

    proptest! {
        #[test]
        fn tq1_pack_unpack_round_trips(n_out in 1usize..9, n_in in 1usize..700, seed in any::<u64>()) {
            let w = random_weights(n_out * n_in, seed);
            let i2 = TernaryMatrix::pack(&w, n_out, n_in, 0.5).unwrap();
            let tq1 = i2.repacked(Packing::Tq1).unwrap();
            prop_assert_eq!(tq1.packing(), Packing::Tq1);
            prop_assert_eq!(tq1.try_unpack().unwrap(), w);
            prop_assert_eq!(tq1.packed_bytes(), n_out * n_in.div_ceil(256) * 52);
            // Padding past n_in stays zero weights (code 1) in both packings.
            let last = tq1.tq1_row(n_out - 1).last().unwrap().decode();
            for k in (n_in - 1) % 256 + 1..256 {
                prop_assert_eq!(last[k], 1);
            }
            prop_assert_eq!(tq1.repacked(Packing::I2).unwrap(), i2);
        }

        #[test]
        fn tl_pack_unpack_round_trips(
            n_out in 1usize..140,
            n_in in 1usize..700,
            k0 in 0usize..800,
            len in 0usize..800,
            seed in any::<u64>(),
        ) {
            let w = random_weights(n_out * n_in, seed);
            let i2 = TernaryMatrix::pack(&w, n_out, n_in, 0.5).unwrap();
            let tl = i2.repacked(Packing::Tl).unwrap();
            prop_assert_eq!(tl.packing(), Packing::Tl);
            prop_assert_eq!(&tl.try_unpack().unwrap(), &w);
            prop_assert_eq!(tl.packed_bytes(), n_out.div_ceil(64) * n_in.div_ceil(5) * 64);
            prop_assert_eq!(tl.repacked(Packing::I2).unwrap(), i2.clone());
            prop_assert_eq!(tl.repacked(Packing::Tq1).unwrap(), i2.repacked(Packing::Tq1).unwrap());
            // Each row's negated groups, as the lookup kernels count them.
            let (_, negated) = tl.tl_parts();
            for n in 0..n_out {
                let count = (0..n_in.div_ceil(5)).filter(|&g| tl.tl_byte_at(n, g) & TL_NEGATED != 0).count();
                prop_assert_eq!(negated[n] as usize, count);
            }
            // Any range of a row's codes, past n_in too (zero weights, code 1).
            let n = (seed as usize) % n_out;
            let mut codes = vec![0u8; len];
            tl.tl_row_codes(n, k0, &mut codes);
            for (i, &c) in codes.iter().enumerate() {
                let k = k0 + i;
                let want = if k < n_in { (w[n * n_in + k] + 1) as u8 } else { 1 };
                prop_assert_eq!(c, want, "row {} weight {}", n, k);
            }
            // The same range in the GEMM's plane order.
            let chunks = tl_plane_chunks(n_in, tl.k_padded());
            tl.tl_plane_codes(n, k0, &mut codes);
            for (i, &c) in codes.iter().enumerate() {
                let k = tl_plane_input(k0 + i, chunks);
                let want = if k < n_in { (w[n * n_in + k] + 1) as u8 } else { 1 };
                prop_assert_eq!(c, want, "row {} position {}", n, k0 + i);
            }
        }

        #[test]
        fn hf_packed_matches_its_definition(rows in 1usize..5, n_in in 1usize..600, seed in any::<u64>()) {
            let n_out = 4 * rows;
            let mut state = seed | 1;
            let packed: Vec<u8> = (0..rows * n_in).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                let c = |s: u64| (s % 3) as u8;
                c(state) | c(state >> 8) << 2 | c(state >> 16) << 4 | c(state >> 24) << 6
            }).collect();
            let fast = TernaryMatrix::from_hf_packed(&packed, n_out, n_in, 0.5).unwrap();
            let slow = TernaryMatrix::from_fn(n_out, n_in, 0.5, |n, k| {
                ((packed[(n % rows) * n_in + k] >> (2 * (n / rows))) & 3) as i8 - 1
            }).unwrap();
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn pack_unpack_round_trips(n_out in 1usize..9, n_in in 1usize..700, seed in any::<u64>()) {
            let w = random_weights(n_out * n_in, seed);
            let m = TernaryMatrix::pack(&w, n_out, n_in, 0.5).unwrap();
            prop_assert_eq!(m.try_unpack().unwrap(), w);
            prop_assert_eq!(m.packed_bytes(), n_out * n_in.div_ceil(256) * 64);
        }
    }
}
