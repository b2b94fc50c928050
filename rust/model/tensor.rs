//! The half-precision storage the embedding table keeps.

use rayon::prelude::*;

// f16_to_f32 is re-exported for the KV cache, which widens f16 entries.
pub use crate::checkpoint::{bf16_to_f32, f16_to_f32};
use crate::checkpoint::{DType, RawTensor};
use crate::kernels::activations::int8_code;

/// A row-major float matrix (the embedding and the output head) kept in its
/// on-disk precision, so a 128256×2560 bf16 embedding costs 656 MB rather than
/// 1.3 GB as f32 — or requantized to int8 rows (`to_int8`), 328 MB.
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
}

impl DenseMatrix {
    /// Copies a 2-D float tensor.
    pub fn from_raw(t: &RawTensor<'_>) -> Self {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        match t.dtype {
            DType::BF16 => DenseMatrix::Bf16 {
                rows,
                cols,
                bits: t
                    .data
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            },
            _ => DenseMatrix::F32 {
                rows,
                cols,
                values: t.to_f32(),
            },
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { rows, .. }
            | DenseMatrix::F32 { rows, .. }
            | DenseMatrix::Int8 { rows, .. } => *rows,
        }
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { bits, .. } => bits.len() * 2,
            DenseMatrix::F32 { values, .. } => values.len() * 4,
            DenseMatrix::Int8 { codes, scales, .. } => codes.len() + scales.len() * 4,
        }
    }

    /// The matrix requantized to symmetric int8 rows (the activation formula
    /// of BitNet, per row, with -128 excluded so that |code| <= 127).
    pub fn to_int8(&self) -> DenseMatrix {
        int8_rows(self.rows(), self.cols(), |r, row| self.row_into(r, row))
    }

    /// A 2-D float tensor quantized straight to int8 rows, as `to_int8` would
    /// from `from_raw`, without the half-precision copy in between (656 MB for
    /// the 2B4T embedding): peak memory at load stays at the int8 size.
    pub fn int8_from_raw(t: &RawTensor<'_>) -> DenseMatrix {
        int8_rows(t.shape[0], t.shape[1], |r, row| t.row_into(r, row))
    }

    pub fn cols(&self) -> usize {
        match self {
            DenseMatrix::Bf16 { cols, .. }
            | DenseMatrix::F32 { cols, .. }
            | DenseMatrix::Int8 { cols, .. } => *cols,
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
        }
    }

    /// Σ_j row_r[j] · x[j] in f32.
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        match self {
            DenseMatrix::Bf16 { cols, bits, .. } => {
                dot_lanes(&bits[r * cols..(r + 1) * cols], x, |b| bf16_to_f32(*b))
            }
            DenseMatrix::F32 { cols, values, .. } => {
                dot_lanes(&values[r * cols..(r + 1) * cols], x, |v| *v)
            }
            DenseMatrix::Int8 { .. } => {
                let mut out = [0.0f32];
                self.dot_rows(r, x, &mut out);
                out[0]
            }
        }
    }
}

/// Asks Linux to back the whole 2 MiB stretches inside `buf` with transparent
/// huge pages (where the system allows them: `madvise` or `always` in
/// /sys/kernel/mm/transparent_hugepage/enabled). Only pages not yet touched
/// are affected; only stretches wholly inside `buf`, so no memory is added.
fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + std::mem::size_of_val(buf)) / HUGE * HUGE;
        if end > start {
            // A refused advice leaves 4 KiB pages: nothing to handle.
            // SAFETY: [start, end) lies inside `buf`; MADV_HUGEPAGE changes
            // how its pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

impl DenseMatrix {
    /// `out[i] = row_i · x` for every row, in parallel chunks: the logits.
    /// An int8 matrix quantizes x once here (see `dot_rows`).
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        // 512 rows of 2560 columns: 1.3 MB (int8) or 2.6 MB (bf16) a task.
        const ROWS_PER_TASK: usize = 512;
        if let DenseMatrix::Int8 { cols, .. } = self {
            let mut qx = vec![0i8; *cols];
            let sx = quantize_row_symmetric(x, &mut qx);
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(c, ys)| self.int8_dot_rows(c * ROWS_PER_TASK, &qx, sx, ys));
            return;
        }
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, ys)| self.dot_rows(c * ROWS_PER_TASK, x, ys));
    }

    /// Rows of an int8 matrix times quantized activations `qx` (scale `sx`):
    /// `out[i] = (Σ qx · q_r) / sx / s_r`, r = first + i.
    fn int8_dot_rows(&self, first: usize, qx: &[i8], sx: f32, out: &mut [f32]) {
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
        // streams (see `x86::STREAMS`) are as long as they can be.
        const PIECE: usize = 512;
        let mut dots = [0i32; PIECE];
        let int8_dots = int8_dots_fn();
        for (c, ys) in out.chunks_mut(PIECE).enumerate() {
            let r0 = first + c * PIECE;
            let dots = &mut dots[..ys.len()];
            int8_dots(&codes[r0 * cols..(r0 + ys.len()) * cols], qx, dots);
            for (i, (y, &d)) in ys.iter_mut().zip(dots.iter()).enumerate() {
                *y = d as f32 / sx / scales[r0 + i];
            }
        }
    }

    /// `out[i] = row_{first + i} · x` for each i: the output head. Picks the
    /// SIMD path once per call (not per row): AVX2 + FMA where the CPU has
    /// them, else `dot_row`. Both sum in f32; they differ only in the order of
    /// the additions (a relative difference of about 1e-6).
    ///
    /// An int8 matrix quantizes x the same way (per call) and multiplies in
    /// integers: `out[i] = (Σ qx · q_r) / sx / s_r`.
    pub fn dot_rows(&self, first: usize, x: &[f32], out: &mut [f32]) {
        if let DenseMatrix::Int8 { cols, .. } = self {
            let mut qx = vec![0i8; *cols];
            let sx = quantize_row_symmetric(x, &mut qx);
            self.int8_dot_rows(first, &qx, sx, out);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let DenseMatrix::Bf16 { cols, bits, .. } = self {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let rows = &bits[first * cols..(first + out.len()) * cols];
                // SAFETY: the CPU has AVX2 and FMA, checked above.
                unsafe { x86::dots_bf16(rows, x, out) };
                return;
            }
        }
        for (i, y) in out.iter_mut().enumerate() {
            *y = self.dot_row(first + i, x);
        }
    }
}

/// Builds an int8 matrix row by row (in parallel: a real vocabulary has
/// 128256 rows) from `fill_row(r, out)`, which writes row r as f32.
fn int8_rows(rows: usize, cols: usize, fill_row: impl Fn(usize, &mut [f32]) + Sync) -> DenseMatrix {
    // Zeroed pages not yet touched: the advice takes effect as they are filled.
    let mut codes = vec![0i8; rows * cols];
    // The output head is read whole for every token: with 4 KiB pages that
    // is a TLB miss every 4 KiB of a 328 MB stream. In 2 MiB pages a decoded
    // 2B4T token ran 1.02x faster at 1 and at 2 threads (one process holding
    // both, alternated 12 times; load time unchanged). The ternary matrices
    // are mostly under 2 MiB apiece and gained nothing measurable.
    advise_huge_pages(&codes);
    let mut scales = vec![0.0f32; rows];
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
    DenseMatrix::Int8 {
        rows,
        cols,
        codes,
        scales,
    }
}

/// Per-row symmetric int8: `s = 127 / max(absmax, 1e-5)`,
/// `q = clamp(round_half_even(x · s), -127, 127)`; returns s.
fn quantize_row_symmetric(x: &[f32], q: &mut [i8]) -> f32 {
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = 127.0f32 / absmax.max(1e-5);
    for (qi, &xi) in q.iter_mut().zip(x) {
        // |x · s| <= 127 up to rounding, so only -128 needs excluding.
        *qi = int8_code(xi * s).max(-127);
    }
    s
}

/// Σ a[i] · b[i] of int8 vectors: the definition the SIMD version must match.
pub fn int8_dot_scalar(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// `dots[r] = Σ rows[r · n + i] · x[i]` for consecutive rows of n = x.len()
/// int8 values: the definition the SIMD version must match.
pub fn int8_dots_scalar(rows: &[i8], x: &[i8], dots: &mut [i32]) {
    for (row, dot) in rows.chunks_exact(x.len()).zip(dots.iter_mut()) {
        *dot = int8_dot_scalar(row, x);
    }
}

/// `int8_dots` for this CPU, chosen once per call site.
fn int8_dots_fn() -> fn(&[i8], &[i8], &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        return |rows, x, dots| {
            // SAFETY: AVX2 was detected just above.
            unsafe { x86::int8_dots(rows, x, dots) }
        };
    }
    int8_dots_scalar
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Bytes of the output head to prefetch ahead of the one being read: the
    /// head is one sequential stream of 328 MB per token (2B4T), and without
    /// a software prefetch it ran at ~76 % of the read bandwidth on Zen 3.
    const PREFETCH: usize = 2048;

    /// Rows read at once, each from its own third of the rows given: three
    /// streams far apart, for the reason given at `x86_avx2::GEMV_STREAMS`.
    const STREAMS: usize = 3;

    /// `int8_dots_scalar`: each row's products by `vpmaddubsw(|a|, sign(x, a))`,
    /// exact because both sides are symmetric int8 (|a|, |x| <= 127, so a
    /// pair is at most 2 · 127 · 127 = 32258 and fits an i16), widened at once
    /// by `vpmaddwd`; 64 bytes a step, in two independent chains per row.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn int8_dots(rows: &[i8], x: &[i8], dots: &mut [i32]) {
        let n = x.len();
        assert!(rows.len() >= dots.len() * n);
        let stretch = dots.len() / STREAMS;
        // Plain loops, no closures: a closure does not inherit `avx2` and may
        // become a call per row (as it did in the GEMV).
        let mut row_dots = [0i32; STREAMS];
        for i in 0..stretch {
            let mut stream_rows = [std::ptr::null::<i8>(); STREAMS];
            for (s, row) in stream_rows.iter_mut().enumerate() {
                *row = rows.as_ptr().add((i + s * stretch) * n);
            }
            dots_of(&stream_rows, x, &mut row_dots);
            for (s, &dot) in row_dots.iter().enumerate() {
                dots[i + s * stretch] = dot;
            }
        }
        let mut one = [0i32; 1];
        for r in STREAMS * stretch..dots.len() {
            dots_of(&[rows.as_ptr().add(r * n)], x, &mut one);
            dots[r] = one[0];
        }
    }

    /// The dots of R rows of `x.len()` values with `x`, sharing its loads.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dots_of<const R: usize>(rows: &[*const i8; R], x: &[i8], dots: &mut [i32; R]) {
        let (n, b) = (x.len(), x.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let product = |a: __m256i, b: __m256i| {
            _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)),
                ones,
            )
        };
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let mut j = 0;
        while j + 64 <= n {
            for a in rows {
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(j + PREFETCH).cast());
            }
            for h in 0..2 {
                let bv = _mm256_loadu_si256(b.add(j + 32 * h).cast());
                for (acc, a) in acc.iter_mut().zip(rows) {
                    let av = _mm256_loadu_si256(a.add(j + 32 * h).cast());
                    acc[h] = _mm256_add_epi32(acc[h], product(av, bv));
                }
            }
            j += 64;
        }
        if j + 32 <= n {
            let bv = _mm256_loadu_si256(b.add(j).cast());
            for (acc, a) in acc.iter_mut().zip(rows) {
                let av = _mm256_loadu_si256(a.add(j).cast());
                acc[0] = _mm256_add_epi32(acc[0], product(av, bv));
            }
            j += 32;
        }
        for ((dot, acc), &a) in dots.iter_mut().zip(acc).zip(rows) {
            let v = _mm256_add_epi32(acc[0], acc[1]);
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let row = std::slice::from_raw_parts(a, n);
            *dot = _mm_cvtsi128_si32(s) + super::int8_dot_scalar(&row[j..], &x[j..]);
        }
    }

    /// `out[r] = Σ_j bf16(rows[r · n + j]) · x[j]` for the `out.len()`
    /// consecutive rows of n = x.len() values in `rows`, read three at a
    /// time from three far-apart stretches (see `STREAMS`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_bf16(rows: &[u16], x: &[f32], out: &mut [f32]) {
        let n = x.len();
        assert!(rows.len() >= out.len() * n);
        let stretch = out.len() / STREAMS;
        let mut row_dots = [0.0f32; STREAMS];
        for i in 0..stretch {
            let mut stream_rows = [std::ptr::null::<u16>(); STREAMS];
            for (s, row) in stream_rows.iter_mut().enumerate() {
                *row = rows.as_ptr().add((i + s * stretch) * n);
            }
            dots_bf16_of(&stream_rows, x, &mut row_dots);
            for (s, &dot) in row_dots.iter().enumerate() {
                out[i + s * stretch] = dot;
            }
        }
        let mut one = [0.0f32; 1];
        for r in STREAMS * stretch..out.len() {
            dots_bf16_of(&[rows.as_ptr().add(r * n)], x, &mut one);
            out[r] = one[0];
        }
    }

    /// Σ_j bf16(w[j]) · x[j] for R rows w of x.len() values, sharing the
    /// loads of x: 32 products per step in four independent FMA chains a row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_bf16_of<const R: usize>(rows: &[*const u16; R], x: &[f32], out: &mut [f32; R]) {
        let (n, xp) = (x.len(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut j = 0;
        while j + 32 <= n {
            for &w in rows {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j + PREFETCH / 2).cast());
            }
            for l in 0..4 {
                let xs = _mm256_loadu_ps(xp.add(j + 8 * l));
                for (acc, &w) in acc.iter_mut().zip(rows) {
                    let half = _mm_loadu_si128(w.add(j + 8 * l).cast());
                    // bf16 is the top half of an f32: widen and shift into place.
                    let wf =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)));
                    acc[l] = _mm256_fmadd_ps(wf, xs, acc[l]);
                }
            }
            j += 32;
        }
        for ((total, acc), &w) in out.iter_mut().zip(&acc).zip(rows) {
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let quad = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            *total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
            for k in j..n {
                *total += super::bf16_to_f32(*w.add(k)) * x[k];
            }
        }
    }
}

#[cfg(test)]
mod head_tests {
    use super::*;

    #[test]
    fn int8_dot_paths_agree() {
        // Row counts below, at and past the AVX2 path's three streams, with
        // rows left over.
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
            let mut got = vec![0i32; rows];
            int8_dots_scalar(&a, &b, &mut want);
            int8_dots_fn()(&a, &b, &mut got);
            assert_eq!(got, want, "n = {n}, rows = {rows}");
            for (r, &d) in want.iter().enumerate() {
                let row = &a[r * n..(r + 1) * n];
                let plain: i32 = row
                    .iter()
                    .zip(&b)
                    .map(|(&p, &q)| i32::from(p) * i32::from(q))
                    .sum();
                assert_eq!(d, plain);
            }
            let extreme = vec![-127i8; n];
            int8_dots_fn()(&extreme, &extreme, &mut got[..1]);
            assert_eq!(got[0], 127 * 127 * n as i32);
        }
    }

    #[test]
    fn int8_head_is_close_to_bf16() {
        let (rows, cols) = (9, 300);
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 9) as u16 & 0xBFFF)
            .collect();
        let m = DenseMatrix::Bf16 { rows, cols, bits };
        let q = m.to_int8();
        assert_eq!(q.nbytes(), rows * cols + rows * 4);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let (mut exact, mut approx) = (vec![0.0; rows], vec![0.0; rows]);
        m.dot_rows(0, &x, &mut exact);
        q.dot_rows(0, &x, &mut approx);
        for r in 0..rows {
            let mut row = vec![0.0; cols];
            m.row_into(r, &mut row);
            let magnitude: f32 = row.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
            // Two roundings of at most half a step (absmax / 254) per product.
            assert!((exact[r] - approx[r]).abs() <= 0.01 * magnitude, "row {r}");
        }
    }

    #[test]
    fn dot_rows_agrees_with_dot_row() {
        for rows in [3, 4, 5, 7, 12] {
            dot_rows_agree(rows);
        }
    }

    /// Rows 2.. of a `rows`-row bf16 matrix: fewer than, as many as and more
    /// than the AVX2 path's three streams, with rows left over.
    fn dot_rows_agree(rows: usize) {
        let cols = 2560 + 19;
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 7) as u16 & 0xBFFF)
            .collect();
        let m = DenseMatrix::Bf16 {
            rows,
            cols,
            bits: bits.clone(),
        };
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut fast = vec![0.0; rows - 2];
        m.dot_rows(2, &x, &mut fast);
        for (i, &f) in fast.iter().enumerate() {
            let slow = m.dot_row(2 + i, &x);
            let magnitude: f32 = (0..cols)
                .map(|j| (bf16_to_f32(bits[(2 + i) * cols + j]) * x[j]).abs())
                .sum();
            assert!(
                (f - slow).abs() <= 1e-5 * magnitude.max(1.0),
                "row {i}: {f} vs {slow}"
            );
        }
    }
}

/// Σ_j a[j] · b[j] in f32 (the attention scores).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dot_lanes(a, b, |v| *v)
}

/// A float dot product with 8 independent partial sums: the compiler keeps
/// the lanes in one vector register (it may not reorder one serial sum), and
/// the error stays at the level of a BLAS blocked sum.
#[inline(always)]
fn dot_lanes<T>(w: &[T], x: &[f32], widen: impl Fn(&T) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let mut wc = w.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (wv, xv) in (&mut wc).zip(&mut xc) {
        for l in 0..LANES {
            acc[l] += widen(&wv[l]) * xv[l];
        }
    }
    let mut tail = 0.0f32;
    for (wv, xv) in wc.remainder().iter().zip(xc.remainder()) {
        tail += widen(wv) * xv;
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let m = DenseMatrix::from_raw(&t);
        let mut row = [0.0f32; 11];
        m.row_into(1, &mut row);
        assert_eq!(row[10], -11.0);
        let x = [1.0f32; 11];
        assert_eq!(m.dot_row(0, &x), 66.0);
        assert_eq!(m.dot_row(1, &x), -66.0);
    }
}
