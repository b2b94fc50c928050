//! The engine's numeric kernels, and packed-ternary matrix multiplication:
//! `y[t, n] = (Σ_k q[t, k] · W[n, k]) / s[t] · scale`.
//!
//! One folder per instruction set (`scalar`, `x86_avx2`, `x86_avx512`,
//! `neon`), one file per routine in each (`ternary`, `head`, `attention`,
//! `half`). `scalar` defines the meaning; every SIMD version must produce
//! exactly the same integer dots (and so the same f32 bits, since the float
//! epilogue is shared). Which path runs is a `Kernel` (`cpu`), chosen once
//! per process: the best the CPU supports, or the one named by `TRIT_KERNEL`.
//! `driver` holds the loops the SIMD paths share.

pub mod activations;
pub mod attention;
pub mod counts;
pub mod cpu;
mod driver;
pub mod half;
pub mod head;
pub mod packing;
pub mod q6;
pub mod q8_0;
pub mod scalar;
pub mod tl;

#[cfg(target_arch = "aarch64")]
pub mod neon;
#[cfg(target_arch = "x86_64")]
pub mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub mod x86_avx512;

use std::ops::Range;

use rayon::ThreadPool;

pub use activations::QuantizedActivations;
pub use cpu::{Kernel, KERNEL_ENV};
pub use packing::{Packing, TernaryMatrix};

use crate::error::{Result, TritError};
use crate::threads::{run_claimed, Claims};

/// The float epilogue shared by every path: one division by the activation
/// multiplier, then one multiplication by the weight scale.
#[inline(always)]
pub fn dequantize(dot: i32, x_scale: f32, w_scale: f32) -> f32 {
    dot as f32 / x_scale * w_scale
}

/// Raw dots of one token against `rows`: `dots[i] = Σ_k xq[k] · W[rows.start + i, k]`.
/// `xq` is [k_padded] (zero past n_in) and `xsum` its sum.
fn gemv_dots(
    kernel: Kernel,
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    kernel.assert_supported();
    if w.packing() == Packing::Tl && kernel != Kernel::Scalar {
        let groups = tl::tl_groups(w.n_in());
        let looked_up = tl::with_thread_tables(kernel, xq, groups, |tables| {
            gemv_dots_tl(kernel, w, tables, rows.clone(), dots)
        });
        if looked_up.is_none() {
            // No memory for the tables: the definition needs none.
            scalar::ternary::gemv(w, xq, xsum, rows, dots);
        }
        return;
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    use Packing::{Tq1, I2};
    match (kernel, w.packing()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path runs on this CPU (asserted above).
        (Kernel::Avx2, I2) => unsafe { x86_avx2::ternary::gemv(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx2, Tq1) => unsafe { x86_avx2::tq1::gemv(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx512Bw, I2) => unsafe { x86_avx512::ternary::gemv_bw(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx512Bw, Tq1) => unsafe { x86_avx512::tq1::gemv_bw(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx512Vnni, I2) => unsafe {
            x86_avx512::ternary::gemv_vnni(w, xq, xsum, rows, dots)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx512Vnni, Tq1) => unsafe { x86_avx512::tq1::gemv_vnni(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::Neon, I2) => unsafe { neon::ternary::gemv(w, xq, xsum, rows, dots) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::Neon, Tq1) => unsafe { neon::tq1::gemv(w, xq, xsum, rows, dots) },
        _ => scalar::ternary::gemv(w, xq, xsum, rows, dots),
    }
}

/// `gemv_dots` of a `Packing::Tl` matrix, given the token's tables.
fn gemv_dots_tl(
    kernel: Kernel,
    w: &TernaryMatrix,
    tables: &[tl::TlTable],
    rows: Range<usize>,
    dots: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    if kernel.has_vbmi() {
        let isa = counts::Isa::avx512_of(kernel);
        // SAFETY: the path runs on this CPU, with AVX-512 VBMI (has_vbmi).
        return unsafe { x86_avx512::tl::gemv(isa, w, tables, rows, dots) };
    }
    let _ = kernel;
    scalar::tl::gemv_tables(w, tables, rows, dots)
}

/// Most tokens a GEMM multiplies with the small-batch tile (every SIMD path
/// has one): below this, decoding the packed weights in registers for every
/// token tile costs less than unpacking them once to memory.
const SMALL_BATCH: usize = 16;
/// `SMALL_BATCH` for AVX2: one token tile of its small tile. Past it, the
/// small tile measured slower than the GEMM tile (docs/performance.md,
/// "Small batches"), likely as each row's token tiles take turns over more
/// activations than L1 holds (16 tokens of 2560 inputs: 40 KB).
#[cfg(target_arch = "x86_64")]
const SMALL_BATCH_AVX2: usize = 8;
/// Raw dots of every token of `x` against `rows`: `dots` is [rows.len(), m].
/// `scratch` holds the SIMD paths' unpacked weight codes from call to call.
///
/// A `Packing::Tq1` matrix always takes the unpacking GEMM: its rows are
/// decoded once per call into the 2-bit tiles' codes, whatever the batch
/// (the small tiles decode 2-bit blocks in registers only).
fn gemm_dots(
    kernel: Kernel,
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    kernel.assert_supported();
    if w.packing() == Packing::Tl && kernel != Kernel::Scalar && x.tl_planes().is_none() {
        // No memory for the activations in the order the tl tiles read:
        // the definition, slower, gives the same dots.
        return scalar::ternary::gemm(w, x, rows, dots);
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    let small = |limit: usize| x.m() <= limit && w.packing() == Packing::I2;
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path runs on this CPU (asserted above).
        Kernel::Avx2 if small(SMALL_BATCH_AVX2) => unsafe {
            x86_avx2::ternary::gemm_small(w, x, rows, dots)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { x86_avx2::ternary::gemm(w, x, rows, dots, scratch) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Bw if small(SMALL_BATCH) => unsafe {
            x86_avx512::ternary::gemm_small_bw(w, x, rows, dots)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Bw => unsafe { x86_avx512::ternary::gemm_bw(w, x, rows, dots, scratch) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Vnni if small(SMALL_BATCH) => unsafe {
            x86_avx512::ternary::gemm_small_vnni(w, x, rows, dots)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Vnni => unsafe { x86_avx512::ternary::gemm_vnni(w, x, rows, dots, scratch) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Kernel::Neon if small(SMALL_BATCH) => unsafe {
            neon::ternary::gemm_small(w, x, rows, dots)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Kernel::Neon => unsafe { neon::ternary::gemm(w, x, rows, dots, scratch) },
        _ => {
            let _ = scratch;
            scalar::ternary::gemm(w, x, rows, dots)
        }
    }
}

/// The (rows, tokens) GEMM tiles of the SIMD paths this build has.
#[cfg(target_arch = "x86_64")]
const GEMM_TILES: &[(usize, usize)] = {
    use driver::GemmTile;
    &[
        (
            x86_avx2::ternary::Tile::ROWS,
            x86_avx2::ternary::Tile::TOKENS,
        ),
        (
            x86_avx512::ternary::Tile::<true>::ROWS,
            x86_avx512::ternary::Tile::<true>::TOKENS,
        ),
        (
            x86_avx512::ternary::Tile::<false>::ROWS,
            x86_avx512::ternary::Tile::<false>::TOKENS,
        ),
    ]
};
#[cfg(target_arch = "aarch64")]
const GEMM_TILES: &[(usize, usize)] = {
    use driver::GemmTile;
    &[(neon::ternary::Tile::ROWS, neon::ternary::Tile::TOKENS)]
};
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const GEMM_TILES: &[(usize, usize)] = &[];

const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The least common multiple of the rows (`tokens == false`) or tokens of every tile.
const fn tiles_lcm(tokens: bool) -> usize {
    let mut lcm = 1;
    let mut i = 0;
    while i < GEMM_TILES.len() {
        let n = if tokens {
            GEMM_TILES[i].1
        } else {
            GEMM_TILES[i].0
        };
        lcm = lcm / gcd(lcm, n) * n;
        i += 1;
    }
    lcm
}

/// Row tile every kernel divides evenly: tasks start at multiples of it, so
/// that only a task's last row tile can be partial.
const ROW_ALIGN: usize = tiles_lcm(false);

/// Token tile every GEMM kernel divides evenly: token blocks are multiples of it.
const TOKEN_ALIGN: usize = tiles_lcm(true);

const _: () = {
    let mut i = 0;
    while i < GEMM_TILES.len() {
        assert!(ROW_ALIGN.is_multiple_of(GEMM_TILES[i].0));
        assert!(TOKEN_ALIGN.is_multiple_of(GEMM_TILES[i].1));
        i += 1;
    }
    assert!(GEMM_ROW_PIECE.is_multiple_of(ROW_ALIGN));
};

/// Bytes of activation codes one GEMM token block may take (half a 512 KiB L2).
const GEMM_L2_ACTIVATIONS: usize = 256 << 10;

/// `y[t, n] = (Σ_k x[t, k] · W[n, k]) / s[t] · W.scale`, y is [m, n_out].
pub fn matmul_into(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    y: &mut [f32],
    kernel: Kernel,
    pool: &ThreadPool,
) -> Result<()> {
    matmul_many_into(&[w], x, &mut [y], kernel, pool)
}

/// `matmul_into` of several matrices that take the same input (q, k and v;
/// gate and up), in one parallel pass: their rows are split into tasks as
/// one list, so a call pays one pool wake-up and the small matrices (k and v
/// have a quarter of q's rows) leave no thread idle. `ys[i]` is [m, n_out_i].
pub fn matmul_many_into(
    ws: &[&TernaryMatrix],
    x: &QuantizedActivations,
    ys: &mut [&mut [f32]],
    kernel: Kernel,
    pool: &ThreadPool,
) -> Result<()> {
    let kernel = kernel.require()?;
    if ws.len() != ys.len() {
        return Err(TritError::invalid(format!(
            "{} matrices but {} outputs",
            ws.len(),
            ys.len()
        )));
    }
    let m = x.m();
    for (w, y) in ws.iter().zip(ys.iter()) {
        check_operands(w, x, y.len())?;
    }
    let total: usize = ws.iter().map(|w| w.n_out()).sum();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let blocks = TokenBlocks::new(x);
    // Rows `rows` of matrix `w`, written through `out` ([m, n_out]).
    let run_rows = |w: &TernaryMatrix, rows: Range<usize>, out: OutPtr| {
        let n_out = w.n_out();
        blocks.for_each_piece(kernel, &[w], rows, |t0, piece, mb, values| {
            write_tokens(out, n_out, t0, piece, mb, |t, row| {
                for (y, &v) in row.iter_mut().zip(token_values(values[0], t, mb)) {
                    *y = v;
                }
            });
        });
    };
    // A task covers rows first..last of the matrices' rows listed one after another.
    let task = |rows: Range<usize>| {
        let (first, last) = (rows.start, rows.end);
        let mut base = 0;
        for (w, &out) in ws.iter().zip(&outs) {
            let (lo, hi) = (first.max(base), last.min(base + w.n_out()));
            if lo < hi {
                run_rows(w, lo - base..hi - base, out);
            }
            base += w.n_out();
        }
    };
    run_row_tasks(total, m, row_align(ws, m), task, pool);
    Ok(())
}

/// BitNet's MLP input in one pass: `h = relu(x·Wgateᵀ)² · (x·Wupᵀ)`, h is
/// [m, n_out]. Each task multiplies the same rows of both matrices and writes
/// only their product, so neither gate nor up is stored (for a 128-token
/// prompt of 2B4T, two [128, 6912] f32 buffers per layer written and read
/// back). The floats are exactly those of `matmul_many_into` followed by the
/// elementwise `relu(g)² · u`.
pub fn matmul_glu_into(
    gate: &TernaryMatrix,
    up: &TernaryMatrix,
    x: &QuantizedActivations,
    h: &mut [f32],
    kernel: Kernel,
    pool: &ThreadPool,
) -> Result<()> {
    let kernel = kernel.require()?;
    if (gate.n_out(), gate.n_in()) != (up.n_out(), up.n_in()) {
        return Err(TritError::invalid(format!(
            "gate [{}, {}] and up [{}, {}] differ in shape",
            gate.n_out(),
            gate.n_in(),
            up.n_out(),
            up.n_in()
        )));
    }
    check_operands(gate, x, h.len())?;
    let (m, n_out) = (x.m(), gate.n_out());
    let out = OutPtr(h.as_mut_ptr());
    let blocks = TokenBlocks::new(x);
    let task = |rows: Range<usize>| {
        blocks.for_each_piece(kernel, &[gate, up], rows, |t0, piece, mb, values| {
            write_tokens(out, n_out, t0, piece, mb, |t, row| {
                let gates = token_values(values[0], t, mb);
                let ups = token_values(values[1], t, mb);
                for ((y, &gate), &up) in row.iter_mut().zip(gates).zip(ups) {
                    let r = gate.max(0.0);
                    *y = (r * r) * up;
                }
            });
        });
    };
    run_row_tasks(n_out, m, row_align(&[gate, up], m), task, pool);
    Ok(())
}

/// What the rows of a matmul's tasks start at multiples of: a tile of a
/// `Packing::Tl` matrix for one token (whose GEMV multiplies whole tiles),
/// else `ROW_ALIGN`.
fn row_align(ws: &[&TernaryMatrix], m: usize) -> usize {
    if m == 1 && ws.iter().any(|w| w.packing() == Packing::Tl) {
        tl::TL_ROWS
    } else {
        ROW_ALIGN
    }
}

/// Whether `w` takes the features of `x`, and `y_len` values hold their
/// [m, n_out] product.
fn check_operands(w: &TernaryMatrix, x: &QuantizedActivations, y_len: usize) -> Result<()> {
    if x.k() != w.n_in() {
        return Err(TritError::invalid(format!(
            "activations have {} features but the matrix takes {} inputs",
            x.k(),
            w.n_in()
        )));
    }
    if y_len != x.m() * w.n_out() {
        return Err(TritError::invalid(format!(
            "output holds {y_len} values, not m * n_out = {} * {}",
            x.m(),
            w.n_out()
        )));
    }
    Ok(())
}

/// Runs `task` over rows 0..total of a matmul of `m` tokens on the pool, in
/// pieces the threads claim as they come free (see `threads::run_claimed`).
fn run_row_tasks(
    total: usize,
    m: usize,
    align: usize,
    task: impl Fn(Range<usize>) + Sync,
    pool: &ThreadPool,
) {
    let claims = if m == 1 {
        // A decoded token's rows are read once from memory: its first
        // claims are 1 / threads of the rows, long streams for the GEMV.
        Claims {
            share: 1,
            min: 48,
            align,
        }
    } else {
        // A prompt is compute-bound: claims half as long end it more evenly
        // (docs/performance.md, "Row claims").
        Claims {
            share: 2,
            min: 24,
            align,
        }
    };
    run_claimed(pool, total, claims, task);
}

/// A task's raw dots, dequantized values (per matrix) and unpacked weight
/// codes, kept per thread: they grow to the largest task once, then no call
/// allocates. Decoding holds a task's rows ([rows] each), a batch one piece
/// ([piece, block]) and a row tile's codes ([tile rows, k-block]).
#[derive(Default)]
struct PieceScratch {
    dots: Vec<i32>,
    values: [Vec<f32>; MAX_PAIRED],
    codes: Vec<CacheLine>,
    /// The token block's activation multipliers repeated for every row of a
    /// piece ([piece, block]), so that the epilogue is one flat loop the
    /// compiler vectorizes (a division per output otherwise dominates it).
    row_scales: Vec<f32>,
}

thread_local! {
    static PIECE_SCRATCH: std::cell::RefCell<PieceScratch> = Default::default();
}

/// Rows of a GEMM task multiplied and written out together (a multiple of ROW_ALIGN).
const GEMM_ROW_PIECE: usize = 48;

/// Most matrices `for_each_piece` multiplies at once.
const MAX_PAIRED: usize = 2;

/// The tokens of a batch in blocks whose codes fit in L2 beside the
/// unpacked weight rows: a row tile then reads its activations from L2, not
/// L3, which two cores would share (docs/performance.md, "Token blocks").
/// The blocks are copied once per call.
struct TokenBlocks<'a> {
    x: &'a QuantizedActivations,
    /// (first token, its block); empty when the batch is one block.
    blocks: Vec<(usize, QuantizedActivations)>,
    /// Tokens of the largest block.
    largest: usize,
}

impl<'a> TokenBlocks<'a> {
    fn new(x: &'a QuantizedActivations) -> Self {
        let m = x.m();
        let per_block =
            (GEMM_L2_ACTIVATIONS / x.k_padded()).max(TOKEN_ALIGN) / TOKEN_ALIGN * TOKEN_ALIGN;
        let blocks = if m > per_block {
            (0..m)
                .step_by(per_block)
                .map(|t0| (t0, x.tokens(t0..(t0 + per_block).min(m))))
                .collect()
        } else {
            Vec::new()
        };
        TokenBlocks {
            x,
            blocks,
            largest: m.min(per_block),
        }
    }

    /// For each token block and each piece of `rows`, the dequantized
    /// products of the piece's rows of every matrix in `ws` (all of one
    /// shape) with the block's tokens: `emit(t0, piece, mb, values)`,
    /// `values[i]` being [piece.len(), mb] for `ws[i]` (rows, then tokens).
    ///
    /// A few rows at a time, so that the dots are still in cache when they
    /// are written out (a task's whole [rows, block] did not stay in L2
    /// beside the activations). Dequantized along tokens, a loop that
    /// vectorizes (down the columns each division waited on the last).
    /// See docs/performance.md, "GEMM pieces".
    fn for_each_piece(
        &self,
        kernel: Kernel,
        ws: &[&TernaryMatrix],
        rows: Range<usize>,
        emit: impl FnMut(usize, Range<usize>, usize, [&[f32]; MAX_PAIRED]),
    ) {
        assert!(!ws.is_empty() && ws.len() <= MAX_PAIRED);
        PIECE_SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            if self.x.m() == 1 {
                self.gemv_task(kernel, ws, rows, scratch, emit);
            } else {
                self.gemm_pieces(kernel, ws, rows, scratch, emit);
            }
        });
    }

    /// `for_each_piece` of one token: all the rows in one kernel call, so
    /// that the AVX2 GEMV's streams (`driver::three_streams`) span the task.
    fn gemv_task(
        &self,
        kernel: Kernel,
        ws: &[&TernaryMatrix],
        rows: Range<usize>,
        scratch: &mut PieceScratch,
        mut emit: impl FnMut(usize, Range<usize>, usize, [&[f32]; MAX_PAIRED]),
    ) {
        let x = self.x;
        let (xq, xsum, xs) = (x.token(0), x.sums()[0], x.scales()[0]);
        let PieceScratch { dots, values, .. } = scratch;
        let n = rows.len();
        dots.resize(n, 0);
        for (w, values) in ws.iter().zip(values.iter_mut()) {
            values.resize(n, 0.0);
            gemv_dots(kernel, w, xq, xsum, rows.clone(), dots);
            for (v, &d) in values.iter_mut().zip(dots.iter()) {
                *v = dequantize(d, xs, w.scale());
            }
        }
        let [a, b] = &*values;
        let paired = if ws.len() > 1 { n } else { 0 };
        emit(0, rows, 1, [&a[..n], &b[..paired]]);
    }

    /// `for_each_piece` of a batch: block by block, piece by piece.
    fn gemm_pieces(
        &self,
        kernel: Kernel,
        ws: &[&TernaryMatrix],
        rows: Range<usize>,
        scratch: &mut PieceScratch,
        mut emit: impl FnMut(usize, Range<usize>, usize, [&[f32]; MAX_PAIRED]),
    ) {
        let piece_max = GEMM_ROW_PIECE.min(rows.len()) * self.largest;
        let PieceScratch {
            dots,
            values,
            codes,
            row_scales,
        } = scratch;
        dots.resize(piece_max, 0); // [piece, block]
        for values in values.iter_mut() {
            values.resize(piece_max, 0.0); // [piece, block] of one matrix
        }
        let mut run = |t0: usize, xb: &QuantizedActivations| {
            let mb = xb.m();
            row_scales.clear(); // [piece, block]
            for _ in 0..GEMM_ROW_PIECE.min(rows.len()) {
                row_scales.extend_from_slice(xb.scales());
            }
            for p0 in rows.clone().step_by(GEMM_ROW_PIECE) {
                let piece = p0..(p0 + GEMM_ROW_PIECE).min(rows.end);
                let len = piece.len() * mb;
                for (w, values) in ws.iter().zip(values.iter_mut()) {
                    gemm_dots(kernel, w, xb, piece.clone(), &mut dots[..len], codes);
                    let w_scale = w.scale();
                    for ((v, &d), &xs) in values[..len]
                        .iter_mut()
                        .zip(&dots[..len])
                        .zip(&row_scales[..len])
                    {
                        *v = dequantize(d, xs, w_scale);
                    }
                }
                let [a, b] = &*values;
                emit(t0, piece, mb, [&a[..len], &b[..len]]);
            }
        };
        if self.blocks.is_empty() {
            run(0, self.x);
        } else {
            for (t0, xb) in &self.blocks {
                run(*t0, xb);
            }
        }
    }
}

/// Fills `y[t0 + t, piece]` for each token t of a block of mb: y is [m,
/// n_out], `fill(t, row)` writes the piece's columns of token t0 + t (from
/// values laid out [piece, mb]: token t's are every mb-th from t).
fn write_tokens(
    y: OutPtr,
    n_out: usize,
    t0: usize,
    piece: Range<usize>,
    mb: usize,
    fill: impl Fn(usize, &mut [f32]),
) {
    let y = y.get();
    for t in 0..mb {
        // SAFETY: t0 + t < m and piece.end <= n_out, so the row's columns lie
        // inside y ([m, n_out]); tasks own disjoint sets of columns, so no
        // other task reads or writes these elements while the slice lives.
        let row = unsafe {
            std::slice::from_raw_parts_mut(y.add((t0 + t) * n_out + piece.start), piece.len())
        };
        fill(t, row);
    }
}

/// The values of token t of a [piece, mb] block: every mb-th from t.
fn token_values(values: &[f32], t: usize, mb: usize) -> impl Iterator<Item = &f32> {
    values[t..].iter().step_by(mb)
}

/// The output pointer shared by GEMM tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see matmul_into).
unsafe impl Send for OutPtr {}
// SAFETY: as for Send: no two tasks touch one element through it.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method (not field access) so closures capture the Send wrapper, not the raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Convenience: allocates y.
pub fn matmul(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    kernel: Kernel,
    pool: &ThreadPool,
) -> Result<Vec<f32>> {
    let mut y = vec![0.0f32; x.m() * w.n_out()];
    matmul_into(w, x, &mut y, kernel, pool)?;
    Ok(y)
}

/// 64 bytes on a cache-line boundary: the unit of SIMD-friendly buffers.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct CacheLine(pub(crate) [u8; 64]);

/// A zeroed buffer of at least `bytes` bytes, 64-byte aligned.
pub(crate) fn aligned_scratch(bytes: usize) -> Vec<CacheLine> {
    vec![CacheLine([0; 64]); bytes.div_ceil(64)]
}

/// Inputs per k-block of the GEMMs. Each (row tile, token tile) pass over a
/// k-block pays a fixed cost (horizontal sums, output updates), so blocks are
/// as long as possible: the hardware prefetcher keeps up with the
/// activations from L3 (docs/performance.md, "K-blocks"). Only past 4 MiB of
/// activations is k split, into near-equal blocks (a short tail block would
/// pay the fixed cost for little work).
pub(crate) fn gemm_k_block(m: usize, k_padded: usize) -> usize {
    const MAX_ACTIVATION_BYTES: usize = 4 << 20;
    let blocks = (m * k_padded).div_ceil(MAX_ACTIVATION_BYTES).max(1);
    let per_block = k_padded.div_ceil(blocks).div_ceil(packing::BLOCK) * packing::BLOCK;
    per_block.clamp(packing::BLOCK, k_padded)
}

#[cfg(test)]
mod tests;
