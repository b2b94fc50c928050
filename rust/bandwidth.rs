//! The machine's streaming read bandwidth: the ceiling of memory-bound work
//! such as generating a token (every weight read once per token).

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Result, TritError};
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
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let per_thread = words.len().div_ceil(pool.current_num_threads());
    let pass = || {
        pool.install(|| {
            words
                .par_chunks(per_thread)
                .map(sum_words)
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
/// saturate memory: with AVX2, four 32-byte accumulators, so that the figure
/// is the memory's and not the loop's (the roofline must not be lower than
/// what the kernels reach).
pub fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { sum_words_avx2(words) };
    }
    words.iter().fold(0u64, |acc, &w| acc.wrapping_add(w))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut chunks = words.chunks_exact(16);
    for c in &mut chunks {
        for (l, a) in acc.iter_mut().enumerate() {
            // SAFETY: the chunk holds 16 words, 4 per lane group.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().add(4 * l).cast()) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let total = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` holds 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(0u64, |acc, &w| acc.wrapping_add(w))
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
        assert_eq!(sum_words(&words), 7 * 999 * 1000 / 2);
        assert!(read_bandwidth(8 << 20, None, 0).is_err());
    }
}
