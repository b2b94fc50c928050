//! q8_0, the 8-bit KV cache's element: GGML's `block_q8_0`, 32 values as
//! one f16 scale and 32 int8 codes, and the quantization of whole rows,
//! dispatched by `Kernel`.

use std::marker::PhantomData;

use super::half::F16;
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::x86_avx2;
use super::Kernel;

/// Values per q8_0 block.
pub const Q8_0_VALUES: usize = 32;

/// 32 values x_i ≈ d · qs[i]: d = max|x| / 127 (in half precision), the codes
/// round(x_i / d), half away from zero, in [-127, 127]. 34 bytes: 8.5 bits
/// per value, as GGML's `block_q8_0` (d first, then the codes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: F16,
    pub qs: [i8; Q8_0_VALUES],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);

// SAFETY: all-zero bits are d = +0.0 (F16 is a transparent u16) and codes 0;
// the type is not zero-sized.
unsafe impl crate::memory::ZeroBits for BlockQ8_0 {}

impl BlockQ8_0 {
    /// The values the block stands for: d · qs[i] (f32, exact: an f16 times
    /// an integer below 2^7).
    pub fn dequantize(&self) -> [f32; Q8_0_VALUES] {
        let d = self.d.to_f32();
        self.qs.map(|q| d * f32::from(q))
    }
}

/// Positions per tile, of keys or of values.
pub const TILE_POSITIONS: usize = 16;

/// Where the codes of a tile's positions lie in its `qs`: the arrangement a
/// kernel's loads want.
pub trait TileLanes: Copy + Eq + std::fmt::Debug + Send + Sync + 'static {
    /// The byte of code i of position u.
    fn at(u: usize, i: usize) -> usize;
}

/// Keys: [8 groups, 16 keys, 4 codes], `qs[64 g + 4 u + i]` is code 4 g + i
/// of key u. One 64-byte load is codes 4g..4g + 4 of all 16 keys, the
/// operand of one `vpdpbusd` against four query codes broadcast (and a
/// 32-byte half, of eight keys, one AVX2 operand): 16 scores at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLanes;

impl TileLanes for KeyLanes {
    #[inline(always)]
    fn at(u: usize, i: usize) -> usize {
        64 * (i / 4) + 4 * u + i % 4
    }
}

/// Values: [4 quads of positions, 32 codes, 4 positions],
/// `qs[128 (u / 4) + 4 i + u % 4]` is code i of position u. One 64-byte load
/// is codes 16h..16h + 16 of four positions, the operand of one `vpdpbusd`
/// against the four positions' weights broadcast: 16 outputs at once (a
/// 32-byte half, eight outputs, on AVX2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueLanes;

impl TileLanes for ValueLanes {
    #[inline(always)]
    fn at(u: usize, i: usize) -> usize {
        128 * (u / 4) + 4 * i + u % 4
    }
}

/// Block b of a tile of 16 q8_0 positions (16t..16t + 16 of one KV head):
/// their 16 scales, then their codes in the order `L` gives. `vpdpbusd`
/// multiplies unsigned by signed bytes, so a code c is stored as c + 128 (in
/// [1, 255]: codes lie in [-127, 127]); the kernels take the excess back
/// once per block. The same 34 bytes per block of 32 values as `BlockQ8_0`;
/// a tile of hd values per position is hd / 32 of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(32))]
pub struct TileBlock<L> {
    pub d: [F16; TILE_POSITIONS],
    /// Code i of position u, plus 128, at `L::at(u, i)`.
    pub qs: [u8; TILE_POSITIONS * Q8_0_VALUES],
    lanes: PhantomData<L>,
}

/// Tiles of q8_0 keys.
pub type KeyTileBlock = TileBlock<KeyLanes>;
/// Tiles of q8_0 values.
pub type ValueTileBlock = TileBlock<ValueLanes>;

// The scales fill one 32-byte line and the codes sixteen more: each
// 64-byte load of codes is 32-byte aligned (never split within a half).
const _: () = assert!(std::mem::size_of::<KeyTileBlock>() == TILE_POSITIONS * 34);
const _: () = assert!(std::mem::size_of::<ValueTileBlock>() == TILE_POSITIONS * 34);
const _: () = assert!(std::mem::align_of::<ValueTileBlock>() == 32);

// SAFETY: all-zero bits are scales +0.0 (F16 is a transparent u16) and
// bytes 0 (`PhantomData` has no bytes); the type is not zero-sized.
unsafe impl<L: TileLanes> crate::memory::ZeroBits for TileBlock<L> {}

/// The offset between a code and the byte that stores it in a tile.
pub const TILE_CODE_OFFSET: i32 = 128;

impl<L: TileLanes> TileBlock<L> {
    /// Scales 0 and every byte 0.
    pub fn zeroed() -> Self {
        TileBlock {
            d: [F16(0); TILE_POSITIONS],
            qs: [0; TILE_POSITIONS * Q8_0_VALUES],
            lanes: PhantomData,
        }
    }

    /// Position u's block.
    #[inline]
    pub fn get(&self, u: usize) -> BlockQ8_0 {
        BlockQ8_0 {
            d: self.d[u],
            qs: std::array::from_fn(|i| self.code(u, i)),
        }
    }

    /// Makes position u's block `block`.
    #[inline]
    pub fn set(&mut self, u: usize, block: &BlockQ8_0) {
        self.d[u] = block.d;
        for (i, &q) in block.qs.iter().enumerate() {
            // Codes lie in [-127, 127], so c + 128 is in [1, 255].
            self.qs[Self::at(u, i)] = (i32::from(q) + TILE_CODE_OFFSET) as u8;
        }
    }

    /// Code i of position u.
    #[inline(always)]
    pub fn code(&self, u: usize, i: usize) -> i8 {
        (i32::from(self.qs[Self::at(u, i)]) - TILE_CODE_OFFSET) as i8
    }

    #[inline(always)]
    fn at(u: usize, i: usize) -> usize {
        debug_assert!(u < TILE_POSITIONS && i < Q8_0_VALUES);
        L::at(u, i)
    }
}

/// `dst[b] = quantize(src[32 b..32 b + 32])` (`scalar::q8_0::quantize_block`
/// on every path, bit for bit). `src` is [32 · dst.len()].
pub fn quantize_q8_0(kernel: Kernel, dst: &mut [BlockQ8_0], src: &[f32]) {
    assert_eq!(src.len(), dst.len() * Q8_0_VALUES);
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2 and F16C.
        unsafe { x86_avx2::q8_0::quantize(dst, src) };
        return;
    }
    let _ = kernel;
    scalar::q8_0::quantize(dst, src);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any f32 bit patterns (NaNs, infinities, subnormals included),
        /// scaled into every range of magnitudes: the paths agree.
        #[test]
        fn any_values_quantize_alike(bits in prop::collection::vec(any::<u32>(), 32..=96), shift in 0u32..8) {
            let blocks = bits.len() / Q8_0_VALUES;
            let src: Vec<f32> = bits[..blocks * Q8_0_VALUES]
                .iter()
                .map(|&b| {
                    // Raw bit patterns (shift 0), or the exponents moved into
                    // one of seven ranges of 8 octaves (2^-19 to 2^44), so
                    // whole blocks of ordinary values come up too.
                    let raw = (b >> 23) & 0xff;
                    let exp = if shift == 0 { raw } else { 100 + 8 * shift + (raw & 7) };
                    f32::from_bits((b & 0x807f_ffff) | (exp << 23))
                })
                .collect();
            let want = quantized(Kernel::Scalar, &src);
            for kernel in Kernel::supported() {
                prop_assert_eq!(quantized(kernel, &src), want.clone(), "{}", kernel);
            }
        }
    }

    /// Each position's block comes back from its lane; its bytes lie where
    /// the kernels load them, offset by 128: four codes of each key per 4
    /// bytes (16 keys per 64), or each code of four positions per 4 bytes
    /// (16 codes of a quad per 64).
    fn tile_lanes_hold_their_blocks<L: TileLanes>(byte_of: impl Fn(usize, usize) -> usize) {
        let mut tile = TileBlock::<L>::zeroed();
        let block = |u: usize| BlockQ8_0 {
            d: F16(0x3c00 + u as u16),
            qs: std::array::from_fn(|i| (((u * 37 + i * 11) % 255) as i32 - 127) as i8),
        };
        for u in 0..TILE_POSITIONS {
            tile.set(u, &block(u));
        }
        for u in 0..TILE_POSITIONS {
            assert_eq!(tile.get(u), block(u));
            for (i, &q) in block(u).qs.iter().enumerate() {
                let byte = tile.qs[byte_of(u, i)];
                assert_eq!(i32::from(byte), i32::from(q) + 128, "position {u} code {i}");
            }
        }
        let extremes = BlockQ8_0 {
            d: F16(0x7bff),
            qs: std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -127 }),
        };
        tile.set(5, &extremes);
        assert_eq!(tile.get(5), extremes);
        assert_eq!(tile.get(4), block(4));
    }

    #[test]
    fn key_tile_lanes_hold_their_blocks() {
        tile_lanes_hold_their_blocks::<KeyLanes>(|u, i| 64 * (i / 4) + 4 * u + i % 4);
    }

    #[test]
    fn value_tile_lanes_hold_their_blocks() {
        tile_lanes_hold_their_blocks::<ValueLanes>(|u, i| {
            128 * (u / 4) + 64 * (i / 16) + 4 * (i % 16) + u % 4
        });
    }

    fn quantized(kernel: Kernel, src: &[f32]) -> Vec<BlockQ8_0> {
        let mut dst = vec![BlockQ8_0::default(); src.len() / Q8_0_VALUES];
        quantize_q8_0(kernel, &mut dst, src);
        dst
    }

    /// Blocks of every magnitude, with ties (x / d = k + 0.5), zeros,
    /// subnormal and overflowing scales, infinities and NaNs.
    fn awkward_blocks() -> Vec<f32> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut src = Vec::new();
        for b in 0..400 {
            let scale = f32::powi(2.0, b % 60 - 40) * if b % 2 == 0 { 1.0 } else { 3.7 };
            for i in 0..Q8_0_VALUES {
                let r = next();
                let uniform = ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                src.push(match b % 8 {
                    // Half-integer multiples of d = 1: every tie rounds away from zero.
                    0 => {
                        if i == 0 {
                            127.0
                        } else {
                            (r % 255) as f32 - 127.0 + 0.5
                        }
                    }
                    1 => 0.0,
                    2 if i == 5 => f32::NAN,
                    3 if i == 7 => f32::INFINITY,
                    4 => f32::from_bits(r as u32 & 0x80ff_ffff), // subnormal to tiny
                    _ => uniform * scale,
                });
            }
        }
        src
    }

    #[test]
    fn every_path_quantizes_as_scalar_does() {
        let src = awkward_blocks();
        let want = quantized(Kernel::Scalar, &src);
        for kernel in Kernel::supported() {
            let got = quantized(kernel, &src);
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{kernel} block {b}: {:?}", &src[b * 32..b * 32 + 32]);
            }
        }
    }

    #[test]
    fn codes_round_half_away_from_zero_within_half_a_step() {
        let src = awkward_blocks();
        for (block, x) in quantized(Kernel::Scalar, &src)
            .iter()
            .zip(src.chunks_exact(Q8_0_VALUES))
        {
            if x.iter().any(|v| !v.is_finite()) {
                continue;
            }
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(block.d, F16::from_f32(amax / 127.0));
            assert!(block.qs.iter().all(|&q| q > i8::MIN));
            let d = f64::from(amax) / 127.0;
            if block.d.to_f32() == 0.0 {
                assert_eq!(block.qs, [0; 32], "{x:?}");
                continue;
            }
            for (&q, &v) in block.qs.iter().zip(x) {
                let exact = f64::from(v) / d;
                assert!(
                    (exact - f64::from(q)).abs() <= 0.5 + 1e-4,
                    "{v} / {d} -> {q}"
                );
            }
        }
        // Ties: d = 1 exactly, so x = k + 0.5 goes to k + 1 (or -k - 1).
        let mut tie = [0.0f32; 32];
        tie[0] = 127.0;
        tie[1] = 2.5;
        tie[2] = -2.5;
        tie[3] = 0.5;
        tie[4] = -0.5;
        let block = quantized(Kernel::Scalar, &tie)[0];
        assert_eq!(block.d.to_f32(), 1.0);
        assert_eq!(&block.qs[..5], &[127, 3, -3, 1, -1]);
        assert_eq!(block.dequantize()[1], 3.0);
    }
}
