//! The float pieces of the forward pass, written to follow transformers'
//! float32 op order (docs/formats.md "Forward pass"), because int8 activation rounding turns
//! ulp-level differences into visible ones.

use rayon::prelude::*;

use super::config::{Activation, Config, Llama3Rope};

/// RMSNorm of one token: `w * (x * rsqrt(mean(x²) + eps))`, in f32.
/// `x`, `w` and `out` have the same length.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == w.len() && x.len() == out.len());
    // The mean of squares in f64, rounded once: as accurate as torch's f32
    // cascade sum, so both agree to the last ulp or so. Each square is exact
    // in f64; eight running sums rather than one let the additions overlap
    // (one chain of dependent f64 additions took ~4 cycles a value).
    let square = |v: f32| f64::from(v) * f64::from(v);
    let mut lanes = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += square(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| square(v)).sum();
    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail;
    let variance = (sum / x.len() as f64) as f32;
    // torch's rsqrt on CPU is 1 / sqrt(v): two roundings, as here.
    let r = 1.0f32 / (variance + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = wv * (xv * r);
    }
}

/// Batches of at least this many tokens are normalised in parallel.
const PARALLEL_ROWS: usize = 8;

/// RMSNorm of `rows` tokens laid out [rows, w.len()] (in parallel on the
/// caller's rayon pool for a prompt batch).
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    if x.len() >= PARALLEL_ROWS * n {
        x.par_chunks_exact(n)
            .zip(out.par_chunks_exact_mut(n))
            .for_each(|(xr, or)| rms_norm(xr, w, eps, or));
    } else {
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            rms_norm(xr, w, eps, or);
        }
    }
}

/// The residual add and the next RMSNorm in one pass over each token:
/// `x += delta`, then `out = rms_norm(x)`; all [rows, w.len()], the rows in
/// parallel for a prompt batch (a serial add would leave the other threads idle).
pub fn add_rms_norm_rows(x: &mut [f32], delta: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let add_norm = |((xr, dr), or): ((&mut [f32], &[f32]), &mut [f32])| {
        add_into(xr, dr);
        rms_norm(xr, w, eps, or);
    };
    if x.len() >= PARALLEL_ROWS * n {
        x.par_chunks_exact_mut(n)
            .zip(delta.par_chunks_exact(n))
            .zip(out.par_chunks_exact_mut(n))
            .for_each(add_norm);
    } else {
        x.chunks_exact_mut(n)
            .zip(delta.chunks_exact(n))
            .zip(out.chunks_exact_mut(n))
            .for_each(add_norm);
    }
}

/// `x += delta`, elementwise, in parallel pieces when long.
pub fn add_rows(x: &mut [f32], delta: &[f32]) {
    const PIECE: usize = 1 << 15;
    if x.len() > PIECE {
        x.par_chunks_mut(PIECE)
            .zip(delta.par_chunks(PIECE))
            .for_each(|(xs, ds)| add_into(xs, ds));
    } else {
        add_into(x, delta);
    }
}

/// The MLP's GLU, elementwise, from gate values `h` and up values `up`
/// (both [rows, intermediate]): `h = act(h) * up`, with
/// `silu(g) = g / (1 + exp(-g))` in f32 as torch computes it and
/// `relu2(g) = max(g, 0)²`; in parallel pieces when long.
pub fn glu_rows(act: Activation, h: &mut [f32], up: &[f32]) {
    fn apply(hs: &mut [f32], us: &[f32], f: impl Fn(f32) -> f32) {
        for (g, &u) in hs.iter_mut().zip(us) {
            *g = f(*g) * u;
        }
    }
    // The activation is chosen once per piece, not per element.
    let glu = |(hs, us): (&mut [f32], &[f32])| match act {
        Activation::Silu => apply(hs, us, |g| g / (1.0 + (-g).exp())),
        Activation::Relu2 => apply(hs, us, |g| {
            let r = g.max(0.0);
            r * r
        }),
    };
    const PIECE: usize = 1 << 14;
    debug_assert_eq!(h.len(), up.len());
    if h.len() > PIECE {
        h.par_chunks_mut(PIECE)
            .zip(up.par_chunks(PIECE))
            .for_each(glu);
    } else {
        glu((h, up));
    }
}

fn add_into(x: &mut [f32], delta: &[f32]) {
    debug_assert_eq!(x.len(), delta.len());
    for (xv, &d) in x.iter_mut().zip(delta) {
        *xv += d;
    }
}

/// transformers' default RoPE frequencies:
/// `inv_freq[i] = 1 / theta^((2i as f32) / head_dim)`, in f32.
fn default_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Llama 3's frequency scaling, transformers' `_compute_llama3_parameters`
/// in its f32 tensor ops (docs/formats.md "RoPE scaling"): wavelengths
/// longer than `original / low_freq_factor` are divided by `factor`, those
/// shorter than `original / high_freq_factor` kept, and the ones between
/// blended smoothly.
fn llama3_scale(inv_freq: &mut [f32], r: &Llama3Rope) {
    let old_len = r.original_max_position_embeddings as f64;
    // Python floats, met by f32 tensors.
    let low_wavelen = (old_len / f64::from(r.low_freq_factor)) as f32;
    let high_wavelen = (old_len / f64::from(r.high_freq_factor)) as f32;
    let (low, high) = (r.low_freq_factor, r.high_freq_factor);
    for f in inv_freq {
        // torch evaluates `2 * pi / inv_freq` as reciprocal(inv_freq) * (2 pi).
        let wavelen = (1.0f32 / *f) * std::f64::consts::TAU as f32;
        let scaled = if wavelen > low_wavelen {
            *f / r.factor
        } else {
            *f
        };
        // (Frequencies are finite and positive, so no NaN compares here.)
        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
        if medium {
            // `old / wavelen` is reciprocal(wavelen) * old in torch too.
            let smooth = ((1.0f32 / wavelen) * old_len as f32 - low) / (high - low);
            *f = (1.0 - smooth) * scaled / r.factor + smooth * scaled;
        } else {
            *f = scaled;
        }
    }
}

/// Rotary embedding tables for positions 0..n_pos, rotate_half ("NeoX") style.
#[derive(Clone, Debug)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>, // [n_pos, head_dim / 2]
    sin: Vec<f32>, // [n_pos, head_dim / 2]
}

impl Rope {
    /// As transformers: `inv_freq[i] = 1 / theta^((2i as f32) / head_dim)` in
    /// f32, the angle `pos * inv_freq[i]` one f32 product, cos and sin in f32.
    /// The second half of a head uses the same angles (`cat(freqs, freqs)`).
    pub fn new(head_dim: usize, theta: f32, n_pos: usize) -> Self {
        Rope::with_inv_freq(&default_inv_freq(head_dim, theta), n_pos)
    }

    /// The tables a model's config asks for: its rope_theta, and Llama 3
    /// frequency scaling if set.
    pub fn for_config(c: &Config, n_pos: usize) -> Self {
        let mut inv_freq = default_inv_freq(c.head_dim, c.rope_theta);
        if let Some(scaling) = &c.rope_scaling {
            llama3_scale(&mut inv_freq, scaling);
        }
        Rope::with_inv_freq(&inv_freq, n_pos)
    }

    fn with_inv_freq(inv_freq: &[f32], n_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n_pos * half);
        let mut sin = Vec::with_capacity(n_pos * half);
        for pos in 0..n_pos {
            for &f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates one head vector ([head_dim]) for position `pos`:
    /// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x[half:], x[:half])`.
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        let (lo, hi) = x.split_at_mut(h);
        for i in 0..h {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] + (-b) * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }

    /// Rotates every head of a batch of tokens at positions `start..`: `q` is
    /// [T, n_heads * head_dim] and `k` [T, n_kv_heads * head_dim]. Tokens run
    /// in parallel for a prompt batch.
    pub fn apply_batch(&self, q: &mut [f32], k: &mut [f32], t_len: usize, start: usize) {
        let hd = 2 * self.half;
        let (q_dim, kv_dim) = (q.len() / t_len.max(1), k.len() / t_len.max(1));
        debug_assert!(q.len() == t_len * q_dim && k.len() == t_len * kv_dim);
        let rotate = |(t, (q_row, k_row)): (usize, (&mut [f32], &mut [f32]))| {
            for head in q_row.chunks_exact_mut(hd).chain(k_row.chunks_exact_mut(hd)) {
                self.apply(head, start + t);
            }
        };
        if t_len >= PARALLEL_ROWS {
            q.par_chunks_exact_mut(q_dim)
                .zip(k.par_chunks_exact_mut(kv_dim))
                .enumerate()
                .for_each(rotate);
        } else {
            q.chunks_exact_mut(q_dim)
                .zip(k.chunks_exact_mut(kv_dim))
                .enumerate()
                .for_each(rotate);
        }
    }

    /// Positions the tables cover.
    pub fn len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let r = 1.0 / (ms + 1e-5f64).sqrt();
        for i in 0..4 {
            let want = f64::from(w[i]) * f64::from(x[i]) * r;
            assert!(
                (f64::from(out[i]) - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out[i]
            );
        }
        // All zeros stay zero thanks to eps (no NaN).
        rms_norm(&[0.0; 4], &w, 1e-5, &mut out);
        assert_eq!(out, [0.0; 4]);
    }

    #[test]
    fn batch_ops_equal_their_token_by_token_definitions() {
        let (hd, n_heads, n_kv, t_len, start) = (8, 3, 1, 11, 5);
        let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 97.0;
        let rope = Rope::new(hd, 10_000.0, 32);
        let q0: Vec<f32> = (0..t_len * n_heads * hd).map(value).collect();
        let k0: Vec<f32> = (0..t_len * n_kv * hd).map(|i| value(i + 3)).collect();
        let (mut q, mut k) = (q0.clone(), k0.clone());
        rope.apply_batch(&mut q, &mut k, t_len, start);
        let (mut q_want, mut k_want) = (q0, k0);
        for (t, head) in q_want.chunks_exact_mut(hd).enumerate() {
            rope.apply(head, start + t / n_heads);
        }
        for (t, head) in k_want.chunks_exact_mut(hd).enumerate() {
            rope.apply(head, start + t / n_kv);
        }
        assert_eq!((q, k), (q_want, k_want));

        // The fused residual add and norm, parallel (11 rows) and not (3 rows).
        for rows in [11, 3] {
            let n = 40;
            let w: Vec<f32> = (0..n).map(|i| value(i + 1)).collect();
            let x0: Vec<f32> = (0..rows * n).map(value).collect();
            let delta: Vec<f32> = (0..rows * n).map(|i| value(i + 17)).collect();
            let (mut x, mut out) = (x0.clone(), vec![0.0; rows * n]);
            add_rms_norm_rows(&mut x, &delta, &w, 1e-5, &mut out);
            let mut x_want = x0.clone();
            add_rows(&mut x_want, &delta);
            let want: Vec<f32> = x0.iter().zip(&delta).map(|(a, b)| a + b).collect();
            assert_eq!(x_want, want);
            let mut out_want = vec![0.0; rows * n];
            rms_norm_rows(&want, &w, 1e-5, &mut out_want);
            assert_eq!((x, out), (want, out_want));
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_the_middle() {
        // head_dim 16, theta 5e5: wavelengths 2π·5e5^(i/8) = 6.3, 32, 167, ...;
        // with an original context of 64 the bands are < 16, 16..64 and > 64.
        let plain = default_inv_freq(16, 500_000.0);
        let mut scaled = plain.clone();
        let r = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        llama3_scale(&mut scaled, &r);
        assert_eq!(scaled[0], plain[0]);
        for i in 2..8 {
            assert_eq!(scaled[i], plain[i] / 8.0, "{i}");
        }
        let wavelen = std::f64::consts::TAU / f64::from(plain[1]);
        let smooth = (64.0 / wavelen - 1.0) / 3.0;
        let want = (1.0 - smooth) * f64::from(plain[1]) / 8.0 + smooth * f64::from(plain[1]);
        assert!(
            (f64::from(scaled[1]) / want - 1.0).abs() < 1e-6,
            "{} vs {want}",
            scaled[1]
        );
        assert!(scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0);
    }

    #[test]
    fn glu_activations_follow_their_formulas() {
        let (g, up) = ([-1.5f32, 0.0, 2.5], [2.0f32, 3.0, -0.5]);
        let mut h = g;
        glu_rows(Activation::Relu2, &mut h, &up);
        assert_eq!(h, [0.0, 0.0, 2.5 * 2.5 * -0.5]);
    }

    #[test]
    fn silu_glu_is_g_sigmoid_g_times_up() {
        let g = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let up = [1.5f32, -2.0, 3.0, 0.25, -1.0];
        let mut h = g;
        glu_rows(Activation::Silu, &mut h, &up);
        for i in 0..5 {
            let (g, u) = (f64::from(g[i]), f64::from(up[i]));
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (f64::from(h[i]) - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                h[i]
            );
        }
    }

    #[test]
    fn rope_rotates_pairs_j_and_j_plus_half() {
        let rope = Rope::new(4, 10000.0, 8);
        assert_eq!(rope.len(), 8);
        // Position 0 is the identity.
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope.apply(&mut x, 0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        // Position 3: pair (0, 2) turns by 3 rad (inv_freq 1), pair (1, 3) by
        // 3 / 100 rad (inv_freq 10000^-0.5).
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope.apply(&mut x, 3);
        let rot = |a: f64, b: f64, t: f64| (a * t.cos() - b * t.sin(), b * t.cos() + a * t.sin());
        let (x0, x2) = rot(1.0, 3.0, 3.0);
        let (x1, x3) = rot(2.0, 4.0, 0.03);
        for (got, want) in x.iter().zip([x0, x1, x2, x3]) {
            assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Rotation keeps each pair's norm.
        let n = |a: f32, b: f32| (a * a + b * b).sqrt();
        assert!((n(x[0], x[2]) - n(1.0, 3.0)).abs() < 1e-5);
    }
}
