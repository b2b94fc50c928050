//! The CPU-features value: which instruction-set path runs every SIMD
//! routine of the crate (ternary matmuls, output-head dots, attention, the
//! KV cache's half conversions). This file is the only place that asks the
//! CPU what it can do; it asks once per process. Every routine is handed a
//! `Kernel` and runs that path's version, or, where the path has none of its
//! own, the best version its features allow (AVX-512 uses the AVX2 head and
//! attention). `Scalar` runs no SIMD routine at all.

use std::fmt;
use std::sync::OnceLock;

use super::attention::{self, HeadGroup, Partial, Strided};
use super::packing::{self, Packing, TernaryMatrix};
use super::{gemm_dots, gemv_dots, half, head, q6, q8_0, QuantizedActivations, SMALL_BATCH};
use crate::error::{Result, TritError};

/// Environment variable that forces a kernel path.
pub const KERNEL_ENV: &str = "TRIT_KERNEL";

/// The alias `TRIT_KERNEL=avx512` stands for: the best AVX-512 path this CPU
/// runs (with VNNI where it has it, as `avx512` always meant).
const AVX512_ALIAS: &str = "avx512";

/// A kernel path: the instruction sets every SIMD routine may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable Rust, no SIMD routine; the definition the others are tested against.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C (the three come together on every
    /// x86-64-v3 CPU): `vpmaddubsw` matmuls, FMA head dots and attention,
    /// `vcvtps2ph` half conversions.
    Avx2,
    /// x86-64 AVX-512 F, BW and VL without VNNI (Skylake-SP and the like):
    /// `vpmaddubsw` + `vpmaddwd` on 64-byte vectors for the matmuls and
    /// float attention, the AVX2 routines for the rest.
    Avx512Bw,
    /// As `Avx512Bw`, with VNNI's `vpdpbusd` in the matmuls.
    Avx512Vnni,
    /// aarch64 Advanced SIMD matmuls; the rest is scalar (no Neon version yet).
    Neon,
}

/// CPU features, read once per process: [scalar, avx2, avx512bw, avx512vnni, neon].
fn detected() -> &'static [bool; 5] {
    static DETECTED: OnceLock<[bool; 5]> = OnceLock::new();
    DETECTED.get_or_init(|| {
        #[allow(unused_mut)] // only one architecture sets any of them
        let mut found = [true, false, false, false, false];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            // Every CPU with BW has VL too (Skylake-SP on); the AVX-512
            // routines use it for 32-byte vectors in registers 16..32, and
            // the VNNI path for its 32-byte `vpdpbusd`.
            let bw = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            found[1] = avx2;
            found[2] = bw;
            found[3] = bw && is_x86_feature_detected!("avx512vnni");
        }
        #[cfg(target_arch = "aarch64")]
        {
            found[4] = std::arch::is_aarch64_feature_detected!("neon");
        }
        found
    })
}

/// Whether the CPU has AVX-512 VBMI (read once per process): the AVX-512
/// paths' byte permutes of `Packing::Tl` (`Kernel::has_vbmi`, and the
/// AVX-512 GEMM tiles' unpacking of its rows).
pub(crate) fn vbmi_detected() -> bool {
    static VBMI: OnceLock<bool> = OnceLock::new();
    *VBMI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512vbmi")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

impl Kernel {
    /// Every path, from the most portable to the fastest.
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Neon,
        Kernel::Avx2,
        Kernel::Avx512Bw,
        Kernel::Avx512Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Bw => "avx512bw",
            Kernel::Avx512Vnni => "avx512vnni",
            Kernel::Neon => "neon",
        }
    }

    /// The path named `name` (as `name()` spells it, any case). `avx512`
    /// names the best AVX-512 path this CPU runs: `avx512vnni` where the CPU
    /// has VNNI, else `avx512bw`.
    pub fn from_name(name: &str) -> Option<Kernel> {
        let name = name.trim().to_ascii_lowercase();
        if name == AVX512_ALIAS {
            return Some(if Kernel::Avx512Vnni.is_supported() {
                Kernel::Avx512Vnni
            } else {
                Kernel::Avx512Bw
            });
        }
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU (and this build's target) can run the path.
    pub fn is_supported(self) -> bool {
        let found = detected();
        match self {
            Kernel::Scalar => found[0],
            Kernel::Avx2 => found[1],
            Kernel::Avx512Bw => found[2],
            Kernel::Avx512Vnni => found[3],
            Kernel::Neon => found[4],
        }
    }

    /// Whether the path has AVX-512 VBMI's byte permutes beside it (an
    /// AVX-512 path on a CPU with VBMI): the lookups of `Packing::Tl`.
    pub fn has_vbmi(self) -> bool {
        vbmi_detected()
            && matches!(self, Kernel::Avx512Bw | Kernel::Avx512Vnni)
            && self.is_supported()
    }

    /// Whether the x86-64 AVX2 routines (head dots, attention, half
    /// conversions) run under this path: AVX2 and every AVX-512 path.
    pub fn uses_avx2_routines(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Avx512Bw | Kernel::Avx512Vnni)
    }

    /// The paths this CPU can run, most portable first.
    pub fn supported() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// The fastest path this CPU can run that passes `self_check`.
    pub fn best() -> Kernel {
        Kernel::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_supported() && k.self_check())
            .unwrap_or(Kernel::Scalar)
    }

    /// Whether this path computes small awkward cases exactly as the scalar
    /// path does (the ternary matmul, the int8 and q6 head dots, the half
    /// and q8_0 conversions and attention over f16 and q8_0 caches, whose
    /// results are meant to be identical). The default path
    /// is chosen only among those that pass, so a path that could not be
    /// exercised where it was built (CI machines lack some instruction sets)
    /// never silently gives wrong answers; a path forced by name is not
    /// checked, so tests see its real behaviour.
    pub(crate) fn self_check(self) -> bool {
        if self == Kernel::Scalar {
            return true;
        }
        let ok = self.ternary_agrees()
            && self.head_agrees()
            && self.halves_agree()
            && self.q8_0_agrees()
            && self.attention_agrees();
        if !ok {
            eprintln!(
                "trit: kernel {self} failed its self-check on this CPU and is not used by default"
            );
        }
        ok
    }

    fn ternary_agrees(self) -> bool {
        // Ragged shapes: a partial block, partial row and token tiles, codes
        // at both extremes; a batch for the small-batch tile and one for the GEMM tile.
        let (n_out, n_in) = (13, 2 * packing::BLOCK + 77);
        let Ok(w) =
            TernaryMatrix::from_fn(n_out, n_in, 0.5, |n, k| ((n * 7 + k * 13) % 3) as i8 - 1)
        else {
            return false;
        };
        let (Ok(tq1), Ok(tl)) = (w.repacked(Packing::Tq1), w.repacked(Packing::Tl)) else {
            return false;
        };
        [w, tq1, tl].iter().all(|w| self.ternary_agrees_on(w))
    }

    /// `ternary_agrees` for one matrix, in its packing.
    fn ternary_agrees_on(self, w: &TernaryMatrix) -> bool {
        let (n_out, n_in) = (w.n_out(), w.n_in());
        [5, SMALL_BATCH + 3].into_iter().all(|m| {
            let codes: Vec<i8> = (0..m * n_in).map(|i| (i * 37 % 256) as u8 as i8).collect();
            let Ok(x) = QuantizedActivations::from_codes(&codes, m, n_in, &vec![1.0; m]) else {
                return false;
            };
            let mut scratch = Vec::new();
            let mut expected = vec![0i32; n_out * m]; // [n_out, m]
            let mut got = vec![0i32; n_out * m];
            gemm_dots(Kernel::Scalar, w, &x, 0..n_out, &mut expected, &mut scratch);
            gemm_dots(self, w, &x, 0..n_out, &mut got, &mut scratch);
            let gemm_ok = got == expected;
            let mut got = vec![0i32; n_out];
            gemv_dots(self, w, x.token(1), x.sums()[1], 0..n_out, &mut got);
            let gemv_ok = got
                .iter()
                .zip(expected.chunks_exact(m))
                .all(|(&g, row)| g == row[1]);
            gemm_ok && gemv_ok
        })
    }

    fn head_agrees(self) -> bool {
        // 7 rows of 97: every stream, a leftover row, a partial vector.
        let (rows, n) = (7, 97);
        let a: Vec<i8> = (0..rows * n)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect();
        let x: Vec<i8> = (0..n)
            .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
            .collect();
        let (mut want, mut got) = (vec![0i32; rows], vec![0i32; rows]);
        head::int8_dots(Kernel::Scalar, &a, &x, &mut want);
        head::int8_dots(self, &a, &x, &mut got);
        // Several tokens at once: a partial token tile.
        let tokens = 5;
        let xs: Vec<i8> = (0..tokens * n)
            .map(|i| ((i * 53 % 255) as i32 - 127) as i8)
            .collect();
        let mut want_tokens = vec![0i32; tokens * rows];
        let mut got_tokens = vec![0i32; tokens * rows];
        head::int8_dots_tokens(Kernel::Scalar, &a, &xs, tokens, &mut want_tokens);
        head::int8_dots_tokens(self, &a, &xs, tokens, &mut got_tokens);
        got == want && got_tokens == want_tokens && self.q6_head_agrees()
    }

    fn q6_head_agrees(self) -> bool {
        // 7 rows of 2 groups and a partial one, the last two rows at the
        // extreme codes (all 63, all 0); 5 tokens, the last two at -128 and 127.
        let (rows, cols, tokens) = (7, 2 * q6::GROUP + 13, 5);
        let Ok(m) = q6::Q6Matrix::from_rows(rows, cols, |r, out| {
            for (c, v) in out.iter_mut().enumerate() {
                *v = match r {
                    5 => 1.0,
                    6 => -1.0,
                    _ => ((r * 31 + c * 17) % 23) as f32 - 11.0,
                };
            }
        }) else {
            return false; // a few hundred bytes: only when memory is exhausted
        };
        let mut acts = q6::Q6Activations::new(tokens, m.groups());
        for (i, x) in acts.code_rows_mut().enumerate() {
            for (c, x) in x[..cols].iter_mut().enumerate() {
                *x = match i {
                    3 => -128,
                    4 => 127,
                    _ => ((i * 53 + c * 91) % 255) as i32 as i8,
                };
            }
        }
        let xs = acts.finish();
        let view = m.rows_view(0, rows);
        let mut want = vec![0i64; tokens * rows];
        let mut got = vec![0i64; tokens * rows];
        head::q6_dots_tokens(Kernel::Scalar, view, xs, &mut want);
        head::q6_dots_tokens(self, view, xs, &mut got);
        let mut one = vec![0i64; rows];
        head::q6_dots(self, view, xs.token(4), &mut one);
        got == want && one[..] == want[4 * rows..]
    }

    fn halves_agree(self) -> bool {
        // Normal, subnormal, overflowing and tied values, and a tail.
        let src: Vec<f32> = (0..19)
            .map(|i| {
                f32::from_bits(0x3380_0000 + i * 0x0211_1111) * if i % 2 == 0 { 1.0 } else { -1.0 }
            })
            .collect();
        let (mut want, mut got) = (vec![half::F16(0); 19], vec![half::F16(0); 19]);
        half::halves_from_f32(Kernel::Scalar, &mut want, &src);
        half::halves_from_f32(self, &mut got, &src);
        got == want
    }

    fn q8_0_agrees(self) -> bool {
        // Two blocks: values of every sign with ties (d = 1), and small ones.
        let src: Vec<f32> = (0..64)
            .map(|i| match i {
                0 => 127.0,
                1..32 => (i as f32 - 16.0) * 4.5,
                _ => (i as f32 - 40.0) * 1e-3,
            })
            .collect();
        let zero = q8_0::BlockQ8_0::default();
        let (mut want, mut got) = ([zero; 2], [zero; 2]);
        q8_0::quantize_q8_0(Kernel::Scalar, &mut want, &src);
        q8_0::quantize_q8_0(self, &mut got, &src);
        got == want
    }

    fn attention_agrees(self) -> bool {
        // A GQA group of four heads of 64 over 21 positions (a partial tile
        // of 16), scores of both signs and a spread of weights.
        const HEADS: usize = 4;
        const HD: usize = 64;
        const N: usize = 21;
        let value = |i: usize, scale: f32| ((i * 37 % 101) as f32 - 50.0) * scale;
        let q: Vec<f32> = (0..HEADS * HD).map(|i| value(i, 0.02)).collect();
        let k: Vec<f32> = (0..N * HD).map(|i| value(i + 7, 0.03)).collect();
        let v: Vec<f32> = (0..N * HD).map(|i| value(i + 11, 0.05)).collect();
        // One run of a kernel: (outputs, stats).
        type Run = (Vec<f32>, Vec<Partial>);
        let run = |go: &dyn Fn(Strided<'_>, Strided<'_>, &mut [Partial])| -> Run {
            let (mut scores, mut out) = (vec![0.0; HEADS * N], vec![0.0; HEADS * HD]);
            let mut stats = vec![Partial::default(); HEADS];
            let scores = Strided {
                data: &mut scores,
                stride: N,
            };
            let outs = Strided {
                data: &mut out,
                stride: HD,
            };
            go(scores, outs, &mut stats);
            (out, stats)
        };

        let (mut k16, mut v16) = (vec![half::F16(0); N * HD], vec![half::F16(0); N * HD]);
        half::halves_from_f32(Kernel::Scalar, &mut k16, &k);
        half::halves_from_f32(Kernel::Scalar, &mut v16, &v);
        let f16 = |kernel: Kernel| {
            run(&|scores, out, stats| {
                let kv = (&k16[..], &v16[..]);
                let mut group = HeadGroup::new(&q, HD, N, kv, 0.125, scores, out, stats);
                attention::attend_chunk(kernel, &mut group);
            })
        };

        let blocks = |x: &[f32]| {
            let mut b = vec![q8_0::BlockQ8_0::default(); x.len() / q8_0::Q8_0_VALUES];
            q8_0::quantize_q8_0(Kernel::Scalar, &mut b, x);
            b
        };
        fn tiles<L: q8_0::TileLanes>(rows: &[q8_0::BlockQ8_0]) -> Vec<q8_0::TileBlock<L>> {
            let per = HD / q8_0::Q8_0_VALUES;
            let mut t = vec![q8_0::TileBlock::zeroed(); N.div_ceil(q8_0::TILE_POSITIONS) * per];
            for (j, row) in rows.chunks_exact(per).enumerate() {
                for (b, block) in row.iter().enumerate() {
                    t[j / q8_0::TILE_POSITIONS * per + b].set(j % q8_0::TILE_POSITIONS, block);
                }
            }
            t
        }
        let q8 = blocks(&q);
        let (k8, v8) = (
            tiles::<q8_0::KeyLanes>(&blocks(&k)),
            tiles::<q8_0::ValueLanes>(&blocks(&v)),
        );
        let quantized = |kernel: Kernel| {
            run(&|scores, out, stats| {
                let kv = (&k8[..], &v8[..]);
                let mut group = HeadGroup::new(&q8, HD, N, kv, 0.125, scores, out, stats);
                attention::attend_chunk_q8_0(kernel, &mut group);
            })
        };
        f16(self) == f16(Kernel::Scalar) && quantized(self) == quantized(Kernel::Scalar)
    }

    /// This path, or an error saying why it cannot run here.
    pub fn require(self) -> Result<Kernel> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(TritError::KernelUnavailable(format!(
                "kernel '{}' cannot run on this CPU; it supports {}",
                self.name(),
                names(&Kernel::supported())
            )))
        }
    }

    /// The path in use: `TRIT_KERNEL` if set, else the best. Decided once per process.
    pub fn active() -> Result<Kernel> {
        static ACTIVE: OnceLock<Result<Kernel>> = OnceLock::new();
        ACTIVE
            .get_or_init(|| match std::env::var(KERNEL_ENV) {
                Ok(name) if !name.trim().is_empty() => Kernel::parse(&name)?.require(),
                _ => Ok(Kernel::best()),
            })
            .clone()
    }

    /// The path named `name`, or an error listing the valid names.
    pub fn parse(name: &str) -> Result<Kernel> {
        Kernel::from_name(name).ok_or_else(|| {
            TritError::invalid(format!(
                "unknown kernel '{name}'; expected one of {}, or {AVX512_ALIAS}",
                names(&Kernel::ALL)
            ))
        })
    }

    /// Panics unless this CPU runs the path: every dispatcher checks before
    /// it enters SIMD code, since a `Kernel` is a plain value anyone can
    /// name. One load of the cached detection, once per call of a routine
    /// over many rows, never per element.
    #[inline]
    pub(crate) fn assert_supported(self) {
        assert!(self.is_supported(), "kernel {self} cannot run on this CPU");
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn names(kernels: &[Kernel]) -> String {
    kernels
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}
