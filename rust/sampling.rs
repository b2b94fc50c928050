//! Choosing the next token from logits: greedy, or sampling with
//! temperature, top-k, top-p and min-p, after a repetition penalty, in the
//! order transformers applies them. Seeded, so the same seed and inputs give
//! the same tokens.

use crate::error::{Result, TritError};
use crate::kernels::attention::softmax_in_place;
use crate::kernels::Kernel;

/// How to pick tokens. `temperature == 0` means greedy; `top_k == 0`,
/// `top_p == 1`, `min_p == 0` and `repetition_penalty == 1` switch a filter off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let p = self;
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return Err(TritError::invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                p.temperature
            )));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(TritError::invalid(format!(
                "top_p must be in (0, 1], got {}",
                p.top_p
            )));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(TritError::invalid(format!(
                "min_p must be in [0, 1], got {}",
                p.min_p
            )));
        }
        if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
            return Err(TritError::invalid(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                p.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// PCG32 (XSH-RR): small, fast, and good enough for sampling.
#[derive(Clone, Debug)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MUL: u64 = 6364136223846793005;

    pub fn new(seed: u64) -> Self {
        // The standard seeding: stream from a fixed odd increment, state
        // advanced past the seed so nearby seeds give unrelated streams.
        let mut rng = Pcg32 {
            state: 0,
            inc: (0xda3e_39cb_94b9_5bdb << 1) | 1,
        };
        rng.next_u32();
        rng.state = rng.state.wrapping_add(seed);
        rng.next_u32();
        rng
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MUL).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let bits = (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32());
        (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens according to `SamplingParams`, with its own RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Pcg32,
    work: Vec<f32>,              // [vocab] penalised, tempered logits
    candidates: Vec<(f32, u32)>, // surviving (logit, id) pairs
    probs: Vec<f32>,             // [candidates] their softmax
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Pcg32::new(seed),
            work: Vec::new(),
            candidates: Vec::new(),
            probs: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token given `logits` ([vocab]) and the tokens so far
    /// (`history`, prompt included, for the repetition penalty), its softmax
    /// on `kernel`'s path (the engine's that made the logits).
    pub fn sample(&mut self, kernel: Kernel, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(TritError::invalid("no logits to sample from"));
        }
        let p = self.params;
        if p.temperature == 0.0 && p.repetition_penalty == 1.0 {
            // Greedy and nothing to adjust: no copy of the logits.
            return Ok(argmax(logits));
        }
        let work = &mut self.work;
        work.clear();
        work.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            // As transformers' RepetitionPenaltyLogitsProcessor: each token
            // seen is penalised once, from its original logit.
            for &id in history {
                if let Some(&l) = logits.get(id as usize) {
                    work[id as usize] = if l > 0.0 {
                        l / p.repetition_penalty
                    } else {
                        l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return Ok(argmax(work));
        }
        let plain = p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0;
        // Every logit / T finite (no NaN to pass over, no overflow): checked
        // whole, a compare per logit and no branch, so that it vectorizes.
        let finite = || {
            !work
                .iter()
                .fold(false, |bad, &l| bad | !(l / p.temperature).is_finite())
        };
        if plain && finite() {
            // Temperature alone: the candidates would be every token, in
            // order, so the softmax runs on the logits themselves, with the
            // same values in the same order as `softmax_of` (the same draw)
            // and no (logit, id) pairs to build.
            for l in work.iter_mut() {
                *l /= p.temperature;
            }
            normalized_softmax(kernel, work);
            return Ok(draw(&mut self.rng, work).unwrap_or(0) as u32);
        }
        let cands = &mut self.candidates;
        let probs = &mut self.probs;
        cands.clear();
        cands.extend(
            work.iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l / p.temperature, i as u32)),
        );
        if cands.is_empty() {
            return Err(TritError::invalid("every logit is NaN"));
        }
        if cands.iter().any(|c| c.0.is_infinite()) {
            // A temperature so small that logit / T overflows (inf - inf would
            // make the softmax NaN): divide the distance from the largest
            // logit instead, so that the top token scores 0 and the rest are
            // finite or -inf. Only then: the usual order keeps seeded draws
            // as they were.
            let max = cands
                .iter()
                .fold(f32::NEG_INFINITY, |m, c| m.max(work[c.1 as usize]));
            for c in cands.iter_mut() {
                c.0 = (work[c.1 as usize] - max) / p.temperature;
            }
        }
        // top-k: keep every logit >= the k-th largest (ties at the edge kept).
        if p.top_k > 0 && p.top_k < cands.len() {
            let k = p.top_k;
            cands.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let kth = cands[k - 1].0;
            cands.retain(|c| c.0 >= kth);
        }
        if p.top_p < 1.0 {
            top_p_filter(kernel, cands, probs, p.top_p);
        }
        if p.min_p > 0.0 {
            softmax_of(kernel, cands, probs);
            let top = probs.iter().fold(0.0f32, |m, &v| m.max(v));
            let threshold = p.min_p * top;
            let mut i = 0;
            cands.retain(|_| {
                let keep = probs[i] >= threshold;
                i += 1;
                keep
            });
        }
        if cands.is_empty() {
            // Filters fed non-finite scores (the model's logits were not
            // finite) can leave nothing: fall back to the most likely token.
            return Ok(argmax(work));
        }
        // Draw from the softmax of what is left.
        softmax_of(kernel, cands, probs);
        Ok(draw(&mut self.rng, probs).map_or(cands[0].1, |i| cands[i].1))
    }
}

/// The index drawn from `probs` (a distribution, in f64): the first whose
/// running sum passes a uniform share of the total, or if rounding leaves it
/// short, the last with mass; None when none has any. The walk passes whole
/// blocks of `DRAW_BLOCK` by their sums, and every sum runs in
/// `DRAW_LANES` lanes: one sum in order is a chain of dependent adds, ~0.2
/// ms over a 128k vocabulary, every sampled token of every sequence.
fn draw(rng: &mut Pcg32, probs: &[f32]) -> Option<usize> {
    let mut u = rng.next_f64() * sum_f64(probs);
    for (b, block) in probs.chunks(DRAW_BLOCK).enumerate() {
        let mass = sum_f64(block);
        if u - mass >= 0.0 {
            u -= mass;
            continue;
        }
        for (i, &pr) in block.iter().enumerate() {
            u -= f64::from(pr);
            if u < 0.0 {
                return Some(b * DRAW_BLOCK + i);
            }
        }
        // Summed one by one the block fell short of its lane sum by a
        // rounding: the draw goes on into the next one.
    }
    probs.iter().rposition(|&pr| pr > 0.0)
}

/// Probabilities `draw` passes at a time, by their sum.
const DRAW_BLOCK: usize = 64;
/// Running sums of `sum_f64`: one AVX-512 vector of f64, two AVX2 ones.
const DRAW_LANES: usize = 8;

/// Σ x in f64, `DRAW_LANES` running sums then the tail.
fn sum_f64(x: &[f32]) -> f64 {
    let chunks = x.chunks_exact(DRAW_LANES);
    let tail = chunks.remainder();
    let mut lanes = [0.0f64; DRAW_LANES];
    for chunk in chunks {
        for (sum, &v) in lanes.iter_mut().zip(chunk) {
            *sum += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&v| f64::from(v)).sum::<f64>()
}

/// Index of the first largest value (torch.argmax's tie rule), NaNs passed
/// over (all NaN: the last index). The largest value is found first, in
/// `ARGMAX_LANES` running maxima that compile to vector instructions, then
/// its first index, `ARGMAX_LANES` entries a test: one 128k-entry vocabulary
/// a sequence every step, where a compare-and-branch per entry took ~0.5 ms
/// while the pool's threads waited.
pub fn argmax(x: &[f32]) -> u32 {
    let chunks = x.chunks_exact(ARGMAX_LANES);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; ARGMAX_LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // f32::max returns the other operand when one is NaN.
            *m = m.max(v);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // The first chunk holding it, each chunk tested whole (a compare per
    // lane, no branch per entry), then its first entry.
    let hit = |chunk: &[f32]| chunk.iter().fold(false, |h, &v| h | (v == max));
    let mut chunks = x.chunks(ARGMAX_LANES);
    let found = chunks.position(hit).and_then(|c| {
        let first = c * ARGMAX_LANES;
        x[first..].iter().position(|&v| v == max).map(|i| first + i)
    });
    match found {
        Some(i) => i as u32,
        None => x.len().saturating_sub(1) as u32,
    }
}

/// Running maxima of `argmax`: one AVX-512 vector, two AVX2 ones.
const ARGMAX_LANES: usize = 16;

/// How far below the largest score `top_p_filter` first looks (e^-8: a
/// candidate there is 1/2981 as likely as the top one); doubled each time the
/// rest would keep some of its mass.
const TOP_P_FIRST_WIDTH: f32 = 8.0;

/// top-p as transformers: in ascending order of logit, drop candidates while
/// the cumulative probability is <= 1 - top_p; the top one always stays.
/// `cands` is left in that order. Sorting a whole vocabulary (~128k) took ms
/// a token, and top-p keeps a few: only the candidates scoring within a
/// width of the largest are sorted (a partition puts them last), the rest
/// summed as the start of the cumulative, whose every prefix is then at
/// most 1 - top_p too, so all of it goes; if the rest holds more, the width
/// doubles (to every candidate at worst). The cumulative is kept in f64:
/// over a flat vocabulary an f32 one drifts by thousands of candidates'
/// worth, and the order it is summed in must not matter.
fn top_p_filter(kernel: Kernel, cands: &mut Vec<(f32, u32)>, probs: &mut Vec<f32>, top_p: f32) {
    let ascending = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1));
    let n = cands.len();
    // Scores are finite or -inf here (`sample` made them so).
    let max = cands.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
    let mut width = TOP_P_FIRST_WIDTH;
    loop {
        let threshold = max - width;
        let rest = if !threshold.is_finite() {
            cands.sort_unstable_by(ascending);
            0
        } else {
            // Those at or below the threshold first, in any order; every
            // one after them scores more, so they end the ascending order.
            let rest = partition_at_most(cands, threshold);
            cands[rest..].sort_unstable_by(ascending);
            rest
        };
        softmax_of(kernel, cands, probs);
        let limit = f64::from(1.0 - top_p);
        let rest_mass = sum_f64(&probs[..rest]);
        // (A NaN mass, from logits all -inf, goes the whole way, as before.)
        if rest > 0 && (rest_mass > limit || rest_mass.is_nan()) {
            // Some of the rest would stay: look further down.
            width *= 2.0;
            continue;
        }
        let mut cum = rest_mass;
        let mut drop = rest;
        for (i, &pr) in probs.iter().enumerate().skip(rest) {
            cum += f64::from(pr);
            if cum <= limit && i + 1 < n {
                drop = i + 1;
            } else {
                break;
            }
        }
        cands.drain(..drop);
        return;
    }
}

/// Moves the candidates scoring at most `threshold` to the front (in any
/// order); returns how many there are.
fn partition_at_most(cands: &mut [(f32, u32)], threshold: f32) -> usize {
    let mut front = 0;
    for i in 0..cands.len() {
        if cands[i].0 <= threshold {
            cands.swap(front, i);
            front += 1;
        }
    }
    front
}

/// Softmax of the candidates' logits, in their order, into `probs`: the
/// engine's vectorized exponential (a vocabulary of logits is ~128k of them,
/// every step of every sampled sequence), which also keeps the far tail
/// from subnormal numbers: a candidate at or below e^-64 of the most
/// likely is 0.
fn softmax_of(kernel: Kernel, cands: &[(f32, u32)], probs: &mut Vec<f32>) {
    probs.clear();
    probs.extend(cands.iter().map(|c| c.0));
    normalized_softmax(kernel, probs);
}

/// x becomes its softmax in place, on `kernel`'s path.
fn normalized_softmax(kernel: Kernel, x: &mut [f32]) {
    let sum = softmax_in_place(kernel, x).sum;
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `argmax`'s definition, one element at a time.
    fn argmax_reference(x: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in x.iter().enumerate() {
            if v > x[best] || x[best].is_nan() {
                best = i;
            }
        }
        best as u32
    }

    fn logit() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -4.0f32..4.0,
            1 => Just(f32::NAN),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::INFINITY),
            1 => Just(1.0f32),
        ]
    }

    proptest! {
        #[test]
        fn argmax_equals_its_definition(x in prop::collection::vec(logit(), 0..100)) {
            prop_assert_eq!(argmax(&x), argmax_reference(&x));
        }
    }

    #[test]
    fn argmax_edge_cases() {
        let nan = f32::NAN;
        for x in [
            vec![],
            vec![nan],
            vec![nan; 40],
            vec![nan, f32::NEG_INFINITY],
            vec![f32::NEG_INFINITY, nan],
            vec![f32::NEG_INFINITY; 33],
            vec![2.0; 35],
        ] {
            assert_eq!(argmax(&x), argmax_reference(&x), "{x:?}");
        }
    }

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn a_vanishing_temperature_with_every_filter_is_greedy_not_a_panic() {
        let logits = [0.5f32, 3.0, -2.0, 3.0 - 1e-6, 1.0];
        for (top_k, top_p, min_p) in [(0, 1.0, 1.0), (2, 0.5, 0.0), (0, 1.0, 0.0), (3, 0.9, 0.5)] {
            let p = SamplingParams {
                temperature: f32::from_bits(1), // the smallest subnormal: logit / T overflows
                top_k,
                top_p,
                min_p,
                ..params()
            };
            let mut s = Sampler::new(p, 7).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(Kernel::Scalar, &logits, &[]).unwrap(), 1);
            }
        }
        // Logits that are not finite never reach an index panic either.
        let p = SamplingParams {
            min_p: 1.0,
            ..params()
        };
        let mut s = Sampler::new(p, 7).unwrap();
        let got = s
            .sample(Kernel::Scalar, &[f32::INFINITY, 1.0, f32::INFINITY], &[])
            .unwrap();
        assert!(got == 0 || got == 2);
    }

    #[test]
    fn rejects_invalid_values() {
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..params()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..params()
            },
            SamplingParams {
                top_p: 0.0,
                ..params()
            },
            SamplingParams {
                top_p: 1.5,
                ..params()
            },
            SamplingParams {
                min_p: -0.1,
                ..params()
            },
            SamplingParams {
                min_p: 1.1,
                ..params()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..params()
            },
        ];
        for p in bad {
            assert!(Sampler::new(p, 0).is_err(), "{p:?}");
        }
        assert!(Sampler::new(params(), 0).is_ok());
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default(), 0).unwrap();
        assert_eq!(
            s.sample(Kernel::Scalar, &[1.0, 3.0, 3.0, -1.0], &[])
                .unwrap(),
            1
        );
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 0).unwrap();
        // 4.0 -> 2.0 loses to 3.0; seen twice it is still penalised once.
        assert_eq!(s.sample(Kernel::Scalar, &[4.0, 3.0], &[0, 0]).unwrap(), 1);
        // -1.0 -> -2.0 loses to -1.5.
        assert_eq!(s.sample(Kernel::Scalar, &[-1.0, -1.5], &[0]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |p: SamplingParams, seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(p, seed).unwrap();
            (0..200)
                .map(|_| s.sample(Kernel::Scalar, &logits, &[]).unwrap())
                .collect()
        };
        assert_eq!(draw(params(), 7), draw(params(), 7));
        assert_ne!(draw(params(), 7), draw(params(), 8));
        // top_k = 3 only ever yields the 3 largest logits.
        let mut order: Vec<u32> = (0..50).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top3 = &order[..3];
        let got = draw(
            SamplingParams {
                top_k: 3,
                ..params()
            },
            1,
        );
        assert!(got.iter().all(|t| top3.contains(t)));
        assert!(top3.iter().all(|t| got.contains(t)));
        // A tiny top_p keeps only the most likely token.
        let got = draw(
            SamplingParams {
                top_p: 1e-6,
                ..params()
            },
            2,
        );
        assert!(got.iter().all(|&t| t == order[0]));
        // min_p = 1 keeps only tokens as likely as the top one.
        let got = draw(
            SamplingParams {
                min_p: 1.0,
                ..params()
            },
            3,
        );
        assert!(got.iter().all(|&t| t == order[0]));
    }

    /// The candidate path's draw, which plain temperature sampling skips.
    fn draw_from_candidates(kernel: Kernel, logits: &[f32], t: f32, rng: &mut Pcg32) -> u32 {
        let cands: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (l / t, i as u32))
            .collect();
        let mut probs = Vec::new();
        softmax_of(kernel, &cands, &mut probs);
        draw(rng, &probs).map_or(cands[0].1, |i| cands[i].1)
    }

    #[test]
    fn plain_temperature_draws_what_the_candidate_path_draws() {
        for kernel in Kernel::supported() {
            for (n, spread) in [(3usize, 1.0f32), (1000, 4.0), (128_256, 8.0), (5000, 300.0)] {
                let logits: Vec<f32> = (0..n)
                    .map(|i| spread * (((i * 7919) % 2003) as f32 / 1001.5 - 1.0))
                    .collect();
                for t in [0.3f32, 0.8, 1.0, 1.7] {
                    let params = SamplingParams {
                        temperature: t,
                        ..params()
                    };
                    let mut s = Sampler::new(params, 42).unwrap();
                    let mut rng = Pcg32::new(42);
                    for _ in 0..20 {
                        let want = draw_from_candidates(kernel, &logits, t, &mut rng);
                        assert_eq!(
                            s.sample(kernel, &logits, &[]).unwrap(),
                            want,
                            "{kernel:?} n {n} t {t}"
                        );
                    }
                }
            }
            // A NaN logit, or one whose quotient overflows, takes the candidate path.
            let mut logits = vec![0.5f32, 2.0, f32::NAN, 1.0];
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 1.0,
                    ..params()
                },
                3,
            )
            .unwrap();
            for _ in 0..50 {
                assert_ne!(s.sample(kernel, &logits, &[]).unwrap(), 2);
            }
            logits[2] = f32::MAX;
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 0.5,
                    ..params()
                },
                3,
            )
            .unwrap();
            assert_eq!(s.sample(kernel, &logits, &[]).unwrap(), 2);
        }
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        // Two tokens with probabilities 0.2 and 0.8 (logit gap ln 4).
        let logits = [0.0f32, 4f32.ln()];
        let mut s = Sampler::new(params(), 42).unwrap();
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(Kernel::Scalar, &logits, &[]).unwrap() == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.8).abs() < 0.02, "{frac}");
    }

    /// `top_p_filter` keeps what sorting every candidate keeps, in the same
    /// order: vocabularies past its first sorted share, flat and peaked
    /// logits, so that the kept set is a few or most of them.
    #[test]
    fn top_p_over_a_vocabulary_keeps_what_a_full_sort_keeps() {
        let mut rng = Pcg32::new(11);
        for n in [3usize, 100, 600, 5000, 128_256] {
            for scale in [0.5f32, 3.0, 20.0] {
                let cands: Vec<(f32, u32)> = (0..n as u32)
                    .map(|i| ((rng.next_f64() as f32 - 0.5) * scale, i))
                    .collect();
                for top_p in [0.3f32, 0.9, 0.95, 0.999] {
                    let mut want = cands.clone();
                    want.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
                    let mut probs = Vec::new();
                    softmax_of(Kernel::Scalar, &want, &mut probs);
                    let (mut cum, mut drop) = (0.0f64, 0);
                    for (i, &pr) in probs.iter().enumerate() {
                        cum += f64::from(pr);
                        if cum <= f64::from(1.0 - top_p) && i + 1 < n {
                            drop = i + 1;
                        } else {
                            break;
                        }
                    }
                    want.drain(..drop);
                    let mut got = cands.clone();
                    top_p_filter(Kernel::Scalar, &mut got, &mut probs, top_p);
                    let ids = |c: &[(f32, u32)]| c.iter().map(|c| c.1).collect::<Vec<_>>();
                    assert_eq!(ids(&got), ids(&want), "n {n} scale {scale} top_p {top_p}");
                }
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.75 keeps the first two.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.75,
                ..params()
            },
            5,
        )
        .unwrap();
        let got: Vec<u32> = (0..500)
            .map(|_| s.sample(Kernel::Scalar, &logits, &[]).unwrap())
            .collect();
        assert!(got.contains(&0) && got.contains(&1) && !got.contains(&2));
    }
}
