//! Thread pools for the kernels, and how a matmul's rows are shared out.
//!
//! One rayon pool per requested thread count, built on first use and kept
//! for reuse, so a call never pays for spawning threads. The counts are
//! bounded (`max_threads`) and so is the number of pools kept
//! (`MAX_CACHED_POOLS`, least recently used dropped first): whatever thread
//! counts callers ask for, the threads alive stay bounded. Rows are claimed
//! by the threads as they come free (`run_claimed`).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Result, TritError};

/// Environment variable that sets the default number of threads.
pub const THREADS_ENV: &str = "TRIT_NUM_THREADS";

/// The default thread count: `TRIT_NUM_THREADS` if set, else the number of
/// physical cores (SMT siblings share the memory bandwidth and vector units the
/// kernels are bound by, so they do not help).
pub fn default_threads() -> Result<usize> {
    match std::env::var(THREADS_ENV) {
        Ok(text) => {
            let n = parse_threads(&text).ok_or_else(|| {
                TritError::invalid(format!("{THREADS_ENV}={text:?} is not a positive integer"))
            })?;
            check_count(n, THREADS_ENV)
        }
        Err(_) => Ok(num_cpus::get_physical().max(1)),
    }
}

fn parse_threads(text: &str) -> Option<usize> {
    text.trim().parse::<usize>().ok().filter(|&n| n >= 1)
}

/// Threads allowed per logical CPU. The kernels are bound by memory
/// bandwidth and vector units, so past one thread per core more only adds
/// switching; a few per CPU leave room for oversubscribed tests and
/// benchmarks, while a count far beyond is a mistake that would cost an OS
/// thread each.
pub const THREADS_PER_CPU: usize = 4;

/// Pools kept for reuse; a pool dropped from the cache ends its threads once
/// no session holds it.
pub const MAX_CACHED_POOLS: usize = 4;

/// The largest thread count a pool may have: `THREADS_PER_CPU` per logical
/// CPU, and never less than 8.
pub fn max_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.saturating_mul(THREADS_PER_CPU).max(8)
}

/// `n` if it is a thread count a pool may have; the error names `what`.
fn check_count(n: usize, what: &str) -> Result<usize> {
    if n == 0 {
        return Err(TritError::invalid(format!("{what} must be at least 1")));
    }
    let max = max_threads();
    if n > max {
        return Err(TritError::invalid(format!(
            "{what}={n} is more than {max} ({THREADS_PER_CPU} per CPU of this machine); \
             the kernels run best with one thread per core"
        )));
    }
    Ok(n)
}

/// The pool with `threads` workers (`None`: the default count).
pub fn pool(threads: Option<usize>) -> Result<Arc<ThreadPool>> {
    let n = match threads {
        Some(n) => check_count(n, "threads")?,
        None => default_threads()?,
    };
    static POOLS: OnceLock<Mutex<Pools>> = OnceLock::new();
    POOLS
        .get_or_init(|| Mutex::new(Pools::new(MAX_CACHED_POOLS)))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(n)
}

/// Pools by thread count, the most recently used last.
struct Pools {
    capacity: usize,
    pools: Vec<(usize, Arc<ThreadPool>)>,
}

impl Pools {
    fn new(capacity: usize) -> Self {
        Pools {
            capacity,
            pools: Vec::with_capacity(capacity),
        }
    }

    fn get(&mut self, n: usize) -> Result<Arc<ThreadPool>> {
        if let Some(i) = self.pools.iter().position(|(count, _)| *count == n) {
            let entry = self.pools.remove(i);
            let pool = entry.1.clone();
            self.pools.push(entry);
            return Ok(pool);
        }
        let pool = ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("trit-{i}"))
            .build()
            .map_err(|e| TritError::invalid(format!("cannot start {n} threads: {e}")))?;
        let pool = Arc::new(pool);
        if self.pools.len() == self.capacity {
            self.pools.remove(0);
        }
        self.pools.push((n, pool.clone()));
        Ok(pool)
    }
}

/// How `run_claimed` cuts a range into the pieces the threads claim.
#[derive(Clone, Copy, Debug)]
pub struct Claims {
    /// A claim takes 1 / (threads · share) of what is left...
    pub share: usize,
    /// ...but at least this much...
    pub min: usize,
    /// ...rounded up to a multiple of this (the last piece ends the range).
    pub align: usize,
}

impl Claims {
    /// The end of the piece claimed at `start` of `0..total` by one of `threads`.
    fn end(&self, start: usize, total: usize, threads: usize) -> usize {
        let left = total - start;
        let take = left.div_ceil(threads * self.share).max(self.min).max(1);
        (start + take.div_ceil(self.align) * self.align).min(total)
    }
}

/// Runs `task` over `0..total` on `pool`, the threads claiming pieces from a
/// shared counter as they come free (guided self-scheduling): the first
/// pieces are long, so a thread streams through long runs of rows, and the
/// last ones short, so the threads finish together; a thread that arrives
/// late (still waking up, or slowed by other work) simply claims less. With
/// one thread, or when one claim takes it all, `task` runs here on the whole
/// range, without entering the pool (from outside it that costs tens of µs).
///
/// Why claims and not equal tasks: docs/performance.md "Row claims".
pub fn run_claimed(
    pool: &ThreadPool,
    total: usize,
    claims: Claims,
    task: impl Fn(Range<usize>) + Sync,
) {
    let threads = pool.current_num_threads();
    if threads <= 1 || claims.end(0, total, threads) == total {
        task(0..total);
        return;
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut start = next.load(Ordering::Relaxed);
        while start < total {
            let end = claims.end(start, total, threads);
            // Relaxed: the counter only hands out disjoint ranges; the
            // task's writes are published by the pool's join.
            match next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    task(start..end);
                    start = next.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    };
    pool.install(|| (0..threads).into_par_iter().for_each(|_| work()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_cover_the_range_once_in_shrinking_aligned_pieces() {
        let claims = Claims {
            share: 2,
            min: 24,
            align: 12,
        };
        for (total, threads) in [(1, 2), (13, 2), (6912, 2), (7000, 3), (128_257, 16)] {
            let mut start = 0;
            let mut last_len = usize::MAX;
            while start < total {
                let end = claims.end(start, total, threads);
                assert!(end > start);
                if end < total {
                    assert_eq!((end - start) % 12, 0);
                    assert!(end - start >= 24 && end - start <= last_len);
                }
                last_len = end - start;
                start = end;
            }
            assert_eq!(start, total);
        }
        // The first claim: 6912 / (2 · 2) rows.
        assert_eq!(claims.end(0, 6912, 2), 1728);
    }

    #[test]
    fn claimed_pieces_run_every_index_once() {
        let claims = Claims {
            share: 1,
            min: 5,
            align: 3,
        };
        for threads in [1, 2, 4] {
            let pool = pool(Some(threads)).unwrap();
            for total in [1, 4, 5, 6, 100, 1001] {
                let hits: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
                run_claimed(&pool, total, claims, |rows| {
                    for i in rows {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn parses_thread_counts() {
        assert_eq!(parse_threads("4"), Some(4));
        assert_eq!(parse_threads(" 2 "), Some(2));
        assert_eq!(parse_threads("0"), None);
        assert_eq!(parse_threads("-1"), None);
        assert_eq!(parse_threads("many"), None);
    }

    #[test]
    fn pools_are_cached_sized_and_bounded() {
        let mut pools = Pools::new(2);
        let a = pools.get(3).unwrap();
        assert!(Arc::ptr_eq(&a, &pools.get(3).unwrap()));
        assert_eq!(a.current_num_threads(), 3);
        pools.get(1).unwrap();
        pools.get(3).unwrap(); // 3 is now the most recently used...
        pools.get(2).unwrap(); // ...so 1 goes.
        let kept: Vec<usize> = pools.pools.iter().map(|(n, _)| *n).collect();
        assert_eq!(kept, [3, 2]);
        assert!(Arc::ptr_eq(&a, &pools.get(3).unwrap()));

        assert!(pool(Some(0)).is_err());
        let max = max_threads();
        assert!(max >= 8);
        let err = pool(Some(max + 1)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("threads={} is more than {max}", max + 1)),
            "{err}"
        );
        assert!(pool(Some(usize::MAX)).is_err());
    }
}
