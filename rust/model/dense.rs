//! Float matrices kept in memory (the embedding and the output head): their
//! storage in on-disk precision or requantized to int8 or 6-bit rows, and
//! the output head's matrix-vector product. The dot kernels are
//! `kernels::head`'s; the 6-bit layout is `kernels::q6`'s.

use rayon::prelude::*;

use crate::checkpoint::{bf16_to_f32, DType, RawTensor};
use crate::error::{Result, TritError};
use crate::kernels::activations::{abs_max, int8_code};
use crate::kernels::head;
use crate::kernels::q6::{Q6Activations, Q6Matrix, Q6Tokens};
use crate::kernels::scalar::head::dot_lanes;
use crate::kernels::Kernel;
use crate::memory::{advise_huge_pages, try_zeroed};

/// A row-major float matrix (the embedding and the output head) kept in its
/// on-disk precision, so a 128256×2560 bf16 embedding costs 656 MB rather than
/// 1.3 GB as f32 — or requantized to int8 rows (`to_int8`), 328 MB, or to
/// 6-bit rows (`to_q6`), 257 MB.
#[derive(Clone, Debug)]
pub enum DenseMatrix {
    /// bfloat16 bits, [rows, cols].
    Bf16 {
        rows: usize,
        cols: usize,
        bits: Vec<u16>,
    },
    /// f32 values, [rows, cols] (F16 and F32 checkpoints; F16 is widened once).
    F32 {
        rows: usize,
        cols: usize,
        values: Vec<f32>,
    },
    /// Symmetric int8 rows: row r is `codes[r] / scales[r]`, codes in [-127, 127].
    Int8 {
        rows: usize,
        cols: usize,
        codes: Vec<i8>,   // [rows, cols]
        scales: Vec<f32>, // [rows] multipliers, 127 / absmax of the row
    },
    /// 6-bit codes in blocks of 32 columns with 8-bit sub-scales under an
    /// f32 step per row (`kernels::q6`): 6.25 bits a weight.
    Q6(Q6Matrix),
}

impl DenseMatrix {
    /// Copies a 2-D float tensor, into memory allocated fallibly (a matrix
    /// too large is an error naming `what`).
    pub fn from_raw(t: &RawTensor<'_>, what: &str) -> Result<Self> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        Ok(match t.dtype {
            DType::BF16 => {
                let mut bits = try_zeroed::<u16>(t.data.len() / 2, what)?; // [rows, cols]
                for (bits, b) in bits.iter_mut().zip(t.data.chunks_exact(2)) {
                    *bits = u16::from_le_bytes([b[0], b[1]]);
                }
                DenseMatrix::Bf16 { rows, cols, bits }
            }
            _ => DenseMatrix::F32 {
                rows,
                cols,
                values: t.to_f32(what)?,
            },
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { rows, .. }
            | DenseMatrix::F32 { rows, .. }
            | DenseMatrix::Int8 { rows, .. } => *rows,
            DenseMatrix::Q6(m) => m.rows(),
        }
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { bits, .. } => bits.len() * 2,
            DenseMatrix::F32 { values, .. } => values.len() * 4,
            DenseMatrix::Int8 { codes, scales, .. } => codes.len() + scales.len() * 4,
            DenseMatrix::Q6(m) => m.nbytes(),
        }
    }

    /// The matrix requantized to symmetric int8 rows (the activation formula
    /// of BitNet, per row, with -128 excluded so that |code| <= 127).
    pub fn to_int8(&self) -> Result<DenseMatrix> {
        int8_rows(self.rows(), self.cols(), |r, row| self.row_into(r, row))
    }

    /// A 2-D float tensor quantized straight to int8 rows, as `to_int8` would
    /// from `from_raw`, without the half-precision copy in between (656 MB for
    /// the 2B4T embedding): peak memory at load stays at the int8 size.
    pub fn int8_from_raw(t: &RawTensor<'_>) -> Result<DenseMatrix> {
        int8_rows(t.shape[0], t.shape[1], |r, row| t.row_into(r, row))
    }

    /// The matrix requantized to 6-bit rows (`kernels::q6`).
    pub fn to_q6(&self) -> Result<DenseMatrix> {
        Q6Matrix::from_rows(self.rows(), self.cols(), |r, row| self.row_into(r, row))
            .map(DenseMatrix::Q6)
    }

    /// A 2-D float tensor quantized straight to 6-bit rows, as `to_q6`
    /// would from `from_raw`, without the half-precision copy in between.
    pub fn q6_from_raw(t: &RawTensor<'_>) -> Result<DenseMatrix> {
        Q6Matrix::from_rows(t.shape[0], t.shape[1], |r, row| t.row_into(r, row))
            .map(DenseMatrix::Q6)
    }

    pub fn cols(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { cols, .. }
            | DenseMatrix::F32 { cols, .. }
            | DenseMatrix::Int8 { cols, .. } => *cols,
            DenseMatrix::Q6(m) => m.cols(),
        }
    }

    /// Row `r` widened to f32 into `out` ([cols]).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            DenseMatrix::Bf16 { cols, bits, .. } => {
                for (o, &b) in out.iter_mut().zip(&bits[r * cols..(r + 1) * cols]) {
                    *o = bf16_to_f32(b);
                }
            }
            DenseMatrix::F32 { cols, values, .. } => {
                out.copy_from_slice(&values[r * cols..(r + 1) * cols]);
            }
            DenseMatrix::Int8 {
                cols,
                codes,
                scales,
                ..
            } => {
                for (o, &q) in out.iter_mut().zip(&codes[r * cols..(r + 1) * cols]) {
                    *o = f32::from(q) / scales[r];
                }
            }
            DenseMatrix::Q6(m) => m.row_into(r, out),
        }
    }

    /// Σ_j row_r[j] · x[j] in f32, on the scalar path (the definition).
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        match self {
            DenseMatrix::Bf16 { cols, bits, .. } => {
                dot_lanes(&bits[r * cols..(r + 1) * cols], x, |b| bf16_to_f32(*b))
            }
            DenseMatrix::F32 { cols, values, .. } => {
                dot_lanes(&values[r * cols..(r + 1) * cols], x, |v| *v)
            }
            DenseMatrix::Int8 { .. } | DenseMatrix::Q6(_) => {
                let mut out = [0.0f32];
                self.dot_rows(Kernel::Scalar, r, x, &mut out);
                out[0]
            }
        }
    }
}

impl DenseMatrix {
    /// `out[i] = row_i · x` for every row, in parallel chunks: the logits.
    /// An int8 or q6 matrix quantizes x once here (see `dot_rows`).
    pub fn matvec(&self, kernel: Kernel, x: &[f32], out: &mut [f32]) {
        // 512 rows of 2560 columns: 1.0 MB (q6), 1.3 MB (int8) or 2.6 MB (bf16) a task.
        const ROWS_PER_TASK: usize = 512;
        if let DenseMatrix::Q6(m) = self {
            let (mut acts, sxs) = q6_activations(m, x, 1);
            let xs = acts.finish();
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(c, ys)| q6_dot_rows(m, kernel, c * ROWS_PER_TASK, xs, sxs[0], ys));
            return;
        }
        if let DenseMatrix::Int8 { cols, .. } = self {
            let mut qx = vec![0i8; *cols];
            let sx = quantize_row_symmetric(x, &mut qx);
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(c, ys)| self.int8_dot_rows(kernel, c * ROWS_PER_TASK, &qx, sx, ys));
            return;
        }
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, ys)| self.dot_rows(kernel, c * ROWS_PER_TASK, x, ys));
    }

    /// `outs[i] = self · x_i` for each row x_i of `xs` ([n, cols]; `outs`
    /// holds n [rows] buffers): the logits of several sequences, each exactly
    /// what `matvec(x_i)` gives, with the matrix read from memory once for
    /// all of them. Int8 and q6 rows multiply every token while they are in
    /// registers (`head::int8_dots_tokens`, `head::q6_dots_tokens`) or in
    /// cache; float rows serve each x in turn, a task's rows staying in cache.
    pub fn matvecs(&self, kernel: Kernel, xs: &[f32], outs: &mut [&mut [f32]]) {
        let (rows, cols) = (self.rows(), self.cols());
        let n = outs.len();
        assert!(xs.len() == n * cols && outs.iter().all(|o| o.len() == rows));
        if n == 0 {
            return;
        }
        // Rows per task: the int8 rows of a task (320 KB at 2560 columns,
        // q6 250 KB) stay in a 512 KiB L2 while each token's dots are taken;
        // bf16 rows twice that, read from L2 or L3 for every token after the first.
        const ROWS_PER_TASK: usize = 128;
        let mut pieces: Vec<Vec<&mut [f32]>> = Vec::new(); // [tasks][n] of [≤ ROWS_PER_TASK]
        for out in outs.iter_mut() {
            for (c, piece) in out.chunks_mut(ROWS_PER_TASK).enumerate() {
                if pieces.len() <= c {
                    pieces.push(Vec::with_capacity(n));
                }
                pieces[c].push(piece);
            }
        }
        if let DenseMatrix::Q6(m) = self {
            let (mut acts, sxs) = q6_activations(m, xs, n);
            let q6_xs = acts.finish();
            pieces.into_par_iter().enumerate().for_each_init(
                Vec::new,
                |dots: &mut Vec<i64>, (c, mut task)| {
                    let r0 = c * ROWS_PER_TASK;
                    let len = task[0].len();
                    dots.resize(n * len, 0); // [n, len]
                    head::q6_dots_tokens(kernel, m.rows_view(r0, len), q6_xs, dots);
                    for ((ys, ds), &sx) in task.iter_mut().zip(dots.chunks_exact(len)).zip(&sxs) {
                        for (i, (y, &d)) in ys.iter_mut().zip(ds).enumerate() {
                            *y = q6_logit(d, sx, m.step(r0 + i));
                        }
                    }
                },
            );
            return;
        }
        if let DenseMatrix::Int8 { codes, scales, .. } = self {
            let mut qxs = vec![0i8; n * cols]; // [n, cols]
            let sxs: Vec<f32> = xs
                .chunks_exact(cols)
                .zip(qxs.chunks_exact_mut(cols))
                .map(|(x, q)| quantize_row_symmetric(x, q))
                .collect();
            pieces.into_par_iter().enumerate().for_each_init(
                Vec::new,
                |dots: &mut Vec<i32>, (c, mut task)| {
                    let r0 = c * ROWS_PER_TASK;
                    let len = task[0].len();
                    dots.resize(n * len, 0); // [n, len]
                    let head = &codes[r0 * cols..(r0 + len) * cols];
                    head::int8_dots_tokens(kernel, head, &qxs, n, dots);
                    let row_scales = &scales[r0..r0 + len];
                    for ((ys, ds), &sx) in task.iter_mut().zip(dots.chunks_exact(len)).zip(&sxs) {
                        // Zipped, not indexed: the divisions vectorize.
                        for ((y, &d), &scale) in ys.iter_mut().zip(ds).zip(row_scales) {
                            *y = d as f32 / sx / scale;
                        }
                    }
                },
            );
            return;
        }
        pieces.into_par_iter().enumerate().for_each(|(c, task)| {
            for (x, piece) in xs.chunks_exact(cols).zip(task) {
                self.dot_rows(kernel, c * ROWS_PER_TASK, x, piece);
            }
        });
    }

    /// Rows of an int8 matrix times quantized activations `qx` (scale `sx`):
    /// `out[i] = (Σ qx · q_r) / sx / s_r`, r = first + i.
    fn int8_dot_rows(&self, kernel: Kernel, first: usize, qx: &[i8], sx: f32, out: &mut [f32]) {
        let DenseMatrix::Int8 {
            cols,
            codes,
            scales,
            ..
        } = self
        else {
            unreachable!("int8_dot_rows is called on int8 matrices");
        };
        // Dots in pieces through a stack buffer: no allocation per call. A
        // piece is a whole `matvec` task, so that the AVX2 path's three
        // streams are as long as they can be.
        const PIECE: usize = 512;
        let mut dots = [0i32; PIECE];
        for (c, ys) in out.chunks_mut(PIECE).enumerate() {
            let r0 = first + c * PIECE;
            let dots = &mut dots[..ys.len()];
            head::int8_dots(kernel, &codes[r0 * cols..(r0 + ys.len()) * cols], qx, dots);
            // Zipped with the rows' scales rather than indexed: no bounds
            // check per element, so the divisions vectorize.
            let row_scales = &scales[r0..r0 + ys.len()];
            for ((y, &d), &scale) in ys.iter_mut().zip(dots.iter()).zip(row_scales) {
                *y = d as f32 / sx / scale;
            }
        }
    }

    /// `out[i] = row_{first + i} · x` for each i: the output head, on
    /// `kernel`'s head dots. bf16 rows sum in f32 on every path, which
    /// differ only in the order of the additions (a relative difference of
    /// about 1e-6); f32 rows use `dot_row`.
    ///
    /// An int8 matrix quantizes x the same way (per call) and multiplies in
    /// integers: `out[i] = (Σ qx · q_r) / sx / s_r`; a q6 matrix likewise,
    /// `out[i] = q6_dot / sx · step_r`.
    pub fn dot_rows(&self, kernel: Kernel, first: usize, x: &[f32], out: &mut [f32]) {
        match self {
            DenseMatrix::Q6(m) => {
                let (mut acts, sxs) = q6_activations(m, x, 1);
                q6_dot_rows(m, kernel, first, acts.finish(), sxs[0], out);
            }
            DenseMatrix::Int8 { cols, .. } => {
                let mut qx = vec![0i8; *cols];
                let sx = quantize_row_symmetric(x, &mut qx);
                self.int8_dot_rows(kernel, first, &qx, sx, out);
            }
            DenseMatrix::Bf16 { cols, bits, .. } => {
                head::bf16_dots(
                    kernel,
                    &bits[first * cols..(first + out.len()) * cols],
                    x,
                    out,
                );
            }
            DenseMatrix::F32 { .. } => {
                for (i, y) in out.iter_mut().enumerate() {
                    *y = self.dot_row(first + i, x);
                }
            }
        }
    }
}

/// The activations `xs` ([tokens, cols]) quantized for the q6 rows of `m`
/// as for int8 rows (`quantize_row_symmetric`), and their scales.
fn q6_activations(m: &Q6Matrix, xs: &[f32], tokens: usize) -> (Q6Activations, Vec<f32>) {
    let cols = m.cols();
    let mut acts = Q6Activations::new(tokens, m.groups());
    let sxs = acts
        .code_rows_mut()
        .zip(xs.chunks_exact(cols.max(1)))
        .map(|(q, x)| quantize_row_symmetric(x, &mut q[..cols]))
        .collect();
    (acts, sxs)
}

/// Rows `first..first + out.len()` of a q6 matrix times the quantized
/// token `x` (scale `sx`): `out[i] = q6_logit(dot, sx, step_r)`, through a
/// stack buffer (no allocation per call). A piece is a whole `matvec` task,
/// so that the three streams are as long as they can be.
fn q6_dot_rows(
    m: &Q6Matrix,
    kernel: Kernel,
    first: usize,
    x: Q6Tokens<'_>,
    sx: f32,
    out: &mut [f32],
) {
    const PIECE: usize = 512;
    let mut dots = [0i64; PIECE];
    for (c, ys) in out.chunks_mut(PIECE).enumerate() {
        let r0 = first + c * PIECE;
        let dots = &mut dots[..ys.len()];
        head::q6_dots(kernel, m.rows_view(r0, ys.len()), x, dots);
        for (i, (y, &d)) in ys.iter_mut().zip(dots.iter()).enumerate() {
            *y = q6_logit(d, sx, m.step(r0 + i));
        }
    }
}

/// The float epilogue of a q6 dot, shared by every path: the integer dot
/// (exact on every path) over the activation scale, times the row's step.
#[inline]
fn q6_logit(dot: i64, sx: f32, step: f32) -> f32 {
    dot as f32 / sx * step
}

/// Builds an int8 matrix row by row (in parallel: a real vocabulary has
/// 128256 rows) from `fill_row(r, out)`, which writes row r as f32.
/// An error, not an abort, if the rows do not fit in memory.
fn int8_rows(
    rows: usize,
    cols: usize,
    fill_row: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<DenseMatrix> {
    let what = format!("the int8 rows of a {rows} × {cols} matrix");
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))?;
    // Zeroed pages not yet touched: the advice takes effect as they are filled.
    let mut codes: Vec<i8> = try_zeroed(len, &what)?;
    // The output head is read whole for every token: in 4 KiB pages that is
    // a TLB miss every 4 KiB of the stream (docs/performance.md, "Output head").
    advise_huge_pages(&codes);
    let mut scales: Vec<f32> = try_zeroed(rows, &what)?;
    codes
        .par_chunks_mut(cols.max(1))
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0.0f32; cols],
            |row, (r, (out, scale))| {
                fill_row(r, row);
                *scale = quantize_row_symmetric(row, out);
            },
        );
    Ok(DenseMatrix::Int8 {
        rows,
        cols,
        codes,
        scales,
    })
}

/// Per-row symmetric int8: `s = 127 / max(absmax, 1e-5)`,
/// `q = clamp(round_half_even(x · s), -127, 127)`; returns s.
fn quantize_row_symmetric(x: &[f32], q: &mut [i8]) -> f32 {
    let s = 127.0f32 / abs_max(x).max(1e-5);
    for (qi, &xi) in q.iter_mut().zip(x) {
        // |x · s| <= 127 up to rounding, so only -128 needs excluding.
        *qi = int8_code(xi * s).max(-127);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How far a SIMD path's bf16 dot may be from the scalar one, relative
    /// to Σ |w · x|: the same products in f32, added in another order.
    const BF16_DOT_REL_TOL: f32 = 1e-5;

    #[test]
    fn int8_head_is_close_to_bf16() {
        let (rows, cols) = (9, 300);
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 9) as u16 & 0xBFFF)
            .collect();
        let m = DenseMatrix::Bf16 { rows, cols, bits };
        let q = m.to_int8().unwrap();
        assert_eq!(q.nbytes(), rows * cols + rows * 4);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        for kernel in Kernel::supported() {
            let (mut exact, mut approx) = (vec![0.0; rows], vec![0.0; rows]);
            m.dot_rows(kernel, 0, &x, &mut exact);
            q.dot_rows(kernel, 0, &x, &mut approx);
            for r in 0..rows {
                let mut row = vec![0.0; cols];
                m.row_into(r, &mut row);
                let magnitude: f32 = row.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
                // Two roundings of at most half a step (absmax / 254) per product.
                assert!(
                    (exact[r] - approx[r]).abs() <= 0.01 * magnitude,
                    "{kernel} row {r}"
                );
            }
        }
    }

    /// Logits of heads shaped like a real one (2560 columns of bf16 values
    /// spread as a normal distribution's; then with a column eight times
    /// wider every 97, outliers that make a row's largest value far from its
    /// typical one), int8 and q6, against the bf16 head's: the RMS of the
    /// logit errors over the RMS of the logits, and the cosine. Both include
    /// the int8 rounding of the activations. Measured: int8 0.0135 and q6
    /// 0.0254 (cosines 0.99991 and 0.99968) on the normal rows, 0.0336 and
    /// 0.0382 (0.99944 and 0.99928) with the outliers; the bounds are 1.3
    /// times that. A misplaced bit, block or sub-scale gives errors of order 1.
    #[test]
    fn q6_head_logits_stay_close_to_bf16() {
        // (outlier width, measured (error, cosine) of int8, of q6)
        let measured = [
            (1.0, (0.0135, 0.99991), (0.0254, 0.99968)),
            (8.0, (0.0336, 0.99944), (0.0382, 0.99928)),
        ];
        for (wide, int8_measured, q6_measured) in measured {
            let (int8, q6) = logit_errors(wide);
            for (got, (error, cosine)) in [(int8, int8_measured), (q6, q6_measured)] {
                assert!(
                    got.0 < 1.3 * error && 1.0 - got.1 < 1.3 * (1.0 - cosine),
                    "outliers {wide}: {got:?} against {error}, {cosine}"
                );
            }
        }
    }

    /// (relative RMS error, cosine) of the int8 and the q6 head's logits
    /// against the bf16 head's, on 200 rows whose every 97th column is
    /// `wide` times wider than the others.
    fn logit_errors(wide: f32) -> ((f32, f32), (f32, f32)) {
        let (rows, cols) = (200, 2560);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        // Normal by Box-Muller.
        let mut normal = move || {
            let (u, v) = (uniform().max(1e-7), uniform());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        };
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| {
                let width = if i % cols % 97 == 5 { wide } else { 1.0 };
                ((0.02 * width * normal()).to_bits() >> 16) as u16
            })
            .collect();
        let m = DenseMatrix::Bf16 { rows, cols, bits };
        let x: Vec<f32> = (0..cols).map(|_| normal()).collect();
        let mut exact = vec![0.0; rows];
        m.matvec(Kernel::Scalar, &x, &mut exact);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let error = |matrix: &DenseMatrix| {
            let mut got = vec![0.0; rows];
            matrix.matvec(Kernel::Scalar, &x, &mut got);
            let diff: Vec<f32> = exact.iter().zip(&got).map(|(a, b)| a - b).collect();
            let dot: f32 = exact.iter().zip(&got).map(|(a, b)| a * b).sum();
            (
                norm(&diff) / norm(&exact),
                dot / (norm(&exact) * norm(&got)),
            )
        };
        let q6 = m.to_q6().unwrap();
        assert!(q6.nbytes() * 100 < m.to_int8().unwrap().nbytes() * 79);
        (error(&m.to_int8().unwrap()), error(&q6))
    }

    /// Rows 2.. of bf16, int8 and q6 matrices of 3 to 12 rows (fewer than,
    /// as many as and more than the three streams, with rows left over) on
    /// every path: int8 and q6 bit for bit with the scalar path, bf16 within
    /// `BF16_DOT_REL_TOL` of `dot_row`; and the matvec of each path equals
    /// its own dot_rows.
    #[test]
    fn every_path_agrees_with_the_scalar_rows() {
        let cols = 2560 + 19;
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        for rows in [3, 4, 5, 7, 12] {
            let bits: Vec<u16> = (0..rows * cols)
                .map(|i| ((i * 2654435761) >> 7) as u16 & 0xBFFF)
                .collect();
            let m = DenseMatrix::Bf16 { rows, cols, bits };
            let q = m.to_int8().unwrap();
            let q6 = m.to_q6().unwrap();
            let mut want_int8 = vec![0.0; rows - 2];
            q.dot_rows(Kernel::Scalar, 2, &x, &mut want_int8);
            let mut want_q6 = vec![0.0; rows - 2];
            q6.dot_rows(Kernel::Scalar, 2, &x, &mut want_q6);
            for kernel in Kernel::supported() {
                let mut fast = vec![0.0; rows - 2];
                m.dot_rows(kernel, 2, &x, &mut fast);
                for (i, &f) in fast.iter().enumerate() {
                    let slow = m.dot_row(2 + i, &x);
                    let mut row = vec![0.0; cols];
                    m.row_into(2 + i, &mut row);
                    let magnitude: f32 = row.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
                    assert!(
                        (f - slow).abs() <= BF16_DOT_REL_TOL * magnitude.max(1.0),
                        "{kernel} row {i}: {f} vs {slow}"
                    );
                }
                let mut got = vec![0.0; rows - 2];
                q.dot_rows(kernel, 2, &x, &mut got);
                assert_eq!(got, want_int8, "{kernel} int8, {rows} rows");
                q6.dot_rows(kernel, 2, &x, &mut got);
                assert_eq!(got, want_q6, "{kernel} q6, {rows} rows");
                for matrix in [&m, &q, &q6] {
                    let mut all = vec![0.0; rows];
                    matrix.matvec(kernel, &x, &mut all);
                    let mut tail = vec![0.0; rows - 2];
                    matrix.dot_rows(kernel, 2, &x, &mut tail);
                    assert_eq!(&all[2..], &tail[..], "{kernel} matvec, {rows} rows");
                }
            }
        }
    }

    /// The int8 dots of every path equal the scalar definition bit for bit,
    /// on lengths around the vector widths, row counts around the three
    /// streams, and the extreme codes.
    #[test]
    fn int8_dots_of_every_path_equal_the_definition() {
        use crate::kernels::scalar;
        for (n, rows) in [1usize, 31, 32, 33, 63, 64, 65, 96, 2560, 2579]
            .into_iter()
            .flat_map(|n| [1usize, 2, 3, 5, 7, 10].map(|rows| (n, rows)))
        {
            let a: Vec<i8> = (0..rows * n)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..n)
                .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
                .collect();
            let mut want = vec![0i32; rows];
            scalar::head::int8_dots(&a, &b, &mut want);
            for (r, &d) in want.iter().enumerate() {
                let plain: i64 = a[r * n..(r + 1) * n]
                    .iter()
                    .zip(&b)
                    .map(|(&p, &q)| i64::from(p) * i64::from(q))
                    .sum();
                assert_eq!(i64::from(d), plain);
            }
            for kernel in Kernel::supported() {
                let mut got = vec![0i32; rows];
                head::int8_dots(kernel, &a, &b, &mut got);
                assert_eq!(got, want, "{kernel} n = {n}, rows = {rows}");
                let extreme = vec![-127i8; n];
                head::int8_dots(kernel, &extreme, &extreme, &mut got[..1]);
                assert_eq!(got[0], 127 * 127 * n as i32, "{kernel}");
            }
        }
    }

    /// The dots of several tokens at once equal each token's scalar dots bit
    /// for bit on every path: lengths around the 64-byte step, row and token
    /// counts around the 4 × 4 tile, the extreme codes.
    #[test]
    fn int8_dots_of_several_tokens_equal_the_definition() {
        use crate::kernels::scalar;
        for (n, rows, tokens) in [1usize, 63, 64, 65, 200, 2579].into_iter().flat_map(|n| {
            [
                (n, 1, 1),
                (n, 3, 2),
                (n, 4, 4),
                (n, 5, 8),
                (n, 9, 7),
                (n, 13, 17),
                (n, 6, 12),
            ]
        }) {
            let head: Vec<i8> = (0..rows * n)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let xs: Vec<i8> = (0..tokens * n)
                .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
                .collect();
            let mut want = vec![0i32; tokens * rows];
            for (x, want) in xs.chunks_exact(n).zip(want.chunks_exact_mut(rows)) {
                scalar::head::int8_dots(&head, x, want);
            }
            for kernel in Kernel::supported() {
                let mut got = vec![0i32; tokens * rows];
                head::int8_dots_tokens(kernel, &head, &xs, tokens, &mut got);
                assert_eq!(
                    got, want,
                    "{kernel} n = {n}, rows = {rows}, tokens = {tokens}"
                );
                for (lo, hi) in [(-127i8, -127i8), (127, -127), (-127, 127)] {
                    let (a, b) = (vec![lo; rows * n], vec![hi; tokens * n]);
                    head::int8_dots_tokens(kernel, &a, &b, tokens, &mut got);
                    let each = i32::from(lo) * i32::from(hi) * n as i32;
                    assert!(got.iter().all(|&d| d == each), "{kernel} extremes");
                }
            }
        }
    }

    /// `matvecs` gives each x exactly what `matvec` gives it, int8, q6 and
    /// bf16, on every path, with rows past one task and a partial last task.
    #[test]
    fn matvecs_equal_each_matvec() {
        let (rows, cols) = (300, 2560 + 19);
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 7) as u16 & 0xBFFF)
            .collect();
        let m = DenseMatrix::Bf16 { rows, cols, bits };
        let q = m.to_int8().unwrap();
        let q6 = m.to_q6().unwrap();
        for n in [1usize, 2, 5, 8] {
            let xs: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            for kernel in Kernel::supported() {
                for matrix in [&m, &q, &q6] {
                    let mut outs = vec![vec![0.0f32; rows]; n];
                    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                    matrix.matvecs(kernel, &xs, &mut views);
                    for (x, got) in xs.chunks_exact(cols).zip(&outs) {
                        let mut want = vec![0.0f32; rows];
                        matrix.matvec(kernel, x, &mut want);
                        assert_eq!(got, &want, "{kernel}, {n} rows of x");
                    }
                }
            }
        }
    }

    #[test]
    fn half_matrix_rows_and_dots() {
        // [[1, 2, ..., 11], [-1, ..., -11]] in bf16 (small integers are exact).
        let values: Vec<f32> = (1..=11)
            .map(|v| v as f32)
            .chain((1..=11).map(|v| -(v as f32)))
            .collect();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let shape = [2, 11];
        let t = RawTensor::new("e", DType::BF16, &shape, &bytes).unwrap();
        let m = DenseMatrix::from_raw(&t, "e").unwrap();
        let mut row = [0.0f32; 11];
        m.row_into(1, &mut row);
        assert_eq!(row[10], -11.0);
        let x = [1.0f32; 11];
        assert_eq!(m.dot_row(0, &x), 66.0);
        assert_eq!(m.dot_row(1, &x), -66.0);
    }
}
