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
                .map(|chunk| chunk.iter().fold(0u64, |acc, &w| acc.wrapping_add(w)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something_plausible() {
        let gbs = read_bandwidth(8 << 20, Some(1), 3).unwrap();
        assert!(gbs.is_finite() && gbs > 0.1, "{gbs}");
        assert!(read_bandwidth(1024, None, 3).is_err());
        assert!(read_bandwidth(8 << 20, None, 0).is_err());
    }
}
