//! The machine's streaming read bandwidth: the ceiling of memory-bound work
//! such as generating a token (every weight read once per token).

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Result, TritError};
use crate::kernels::Kernel;
use crate::memory::try_reserve_total;
use crate::threads;

/// Median GB/s (10^9 bytes per second) of summing a buffer of `bytes` with
/// `threads` threads, over `reps` passes after one untimed pass. The buffer
/// should be several times the last-level cache so that it comes from memory.
pub fn read_bandwidth(bytes: usize, threads: Option<usize>, reps: usize) -> Result<f64> {
    if bytes < 1 << 20 || reps == 0 {
        return Err(TritError::invalid(format!(
            "read_bandwidth needs at least 1 MiB and one repetition, got {bytes} bytes and {reps}"
        )));
    }
    let pool = threads::pool(threads)?;
    let kernel = Kernel::active()?;
    let mut words: Vec<u64> = Vec::new();
    try_reserve_total(&mut words, bytes / 8, "the bandwidth test buffer")?;
    words.extend((0..bytes / 8).map(|i| i as u64));
    let per_thread = words.len().div_ceil(pool.current_num_threads());
    let pass = || {
        pool.install(|| {
            words
                .par_chunks(per_thread)
                .map(|chunk| sum_words(kernel, chunk))
                .reduce(|| 0, u64::wrapping_add)
        })
    };
    black_box(pass());
    let mut seconds: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            black_box(pass());
            start.elapsed().as_secs_f64()
        })
        .collect();
    seconds.sort_by(f64::total_cmp);
    Ok((words.len() * 8) as f64 / seconds[reps / 2] / 1e9)
}

/// Σ words (wrapping): the pass `read_bandwidth` times, public so that the
/// criterion benchmark measures the same loop. The baseline x86-64 build
/// sums 16 bytes per instruction, which one core cannot issue fast enough to
/// saturate memory: the AVX2 paths sum with 32-byte vectors, so that the
/// figure is the memory's and not the loop's (the roofline must not be lower
/// than what the kernels reach).
pub fn sum_words(kernel: Kernel, words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2.
        return unsafe { crate::kernels::x86_avx2::bandwidth::sum_words(words) };
    }
    let _ = kernel;
    words.iter().fold(0u64, |acc, &w| acc.wrapping_add(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something_plausible() {
        let gbs = read_bandwidth(8 << 20, Some(1), 3).unwrap();
        assert!(gbs.is_finite() && gbs > 0.1, "{gbs}");
        assert!(read_bandwidth(1024, None, 3).is_err());
        let words: Vec<u64> = (0..1000).map(|i| i * 7).collect();
        for kernel in Kernel::supported() {
            assert_eq!(sum_words(kernel, &words), 7 * 999 * 1000 / 2, "{kernel}");
        }
        assert!(read_bandwidth(8 << 20, None, 0).is_err());
    }
}
