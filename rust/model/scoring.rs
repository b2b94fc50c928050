//! Scoring a text: the log-probability a model gives each next token, one
//! position's logits at a time, so that scoring a window needs O(vocab)
//! memory however long the window is.

use rayon::prelude::*;

/// Logits per task of the parallel exp-sum: 8192 f64 exps are a few µs, and
/// a 128k vocabulary still gives 16 tasks.
const EXP_CHUNK: usize = 8192;

/// `-log softmax(logits)[target]` in nats. The f32 logits are widened to f64
/// before the shift, the exps and the sum, so the result is their exact
/// log-softmax up to f64 rounding (what numpy computes on a float64 copy; the
/// order of the sum differs, by a few ulps of f64).
///
/// `partials` holds one partial sum per `EXP_CHUNK` logits: the chunks are
/// summed in parallel, and then in order, so the result does not depend on the
/// thread count. Reusing it from row to row keeps the loop allocation-free.
pub fn next_token_nll(logits: &[f32], target: usize, partials: &mut Vec<f64>) -> f64 {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    logits
        .par_chunks(EXP_CHUNK)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&x| (f64::from(x) - max).exp())
                .sum::<f64>()
        })
        .collect_into_vec(partials);
    let log_z = max + partials.iter().sum::<f64>().ln();
    log_z - f64::from(logits[target])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, serially: log Σ exp(x) − x[target].
    fn naive(logits: &[f32], target: usize) -> f64 {
        let x: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - x[target]
    }

    #[test]
    fn matches_the_definition_over_several_chunks() {
        let mut partials = Vec::new();
        for n in [1, 7, EXP_CHUNK, 3 * EXP_CHUNK + 5] {
            // Spread wide enough that a naive exp without the shift overflows.
            let logits: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.5 - 100.0)
                .collect();
            for target in [0, n / 2, n - 1] {
                let got = next_token_nll(&logits, target, &mut partials);
                let want = naive(&logits, target);
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{n} {target}"
                );
                assert!(got >= 0.0);
            }
        }
    }

    #[test]
    fn a_certain_token_costs_nothing_and_uniform_costs_log_vocab() {
        let mut partials = Vec::new();
        let mut logits = vec![-1e4f32; 1000];
        logits[3] = 50.0;
        assert_eq!(next_token_nll(&logits, 3, &mut partials), 0.0);
        let uniform = vec![2.5f32; 1000];
        let got = next_token_nll(&uniform, 10, &mut partials);
        assert!((got - 1000f64.ln()).abs() < 1e-12);
    }
}
