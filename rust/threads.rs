//! Thread pools for the kernels.
//!
//! One rayon pool per requested thread count, built on first use and kept for
//! the life of the process, so a call never pays for spawning threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Result, TritError};

/// Environment variable that sets the default number of threads.
pub const THREADS_ENV: &str = "TRIT_NUM_THREADS";

/// The default thread count: `TRIT_NUM_THREADS` if set, else the number of
/// physical cores (SMT siblings share the memory bandwidth and vector units the
/// kernels are bound by, so they do not help).
pub fn default_threads() -> Result<usize> {
    match std::env::var(THREADS_ENV) {
        Ok(text) => parse_threads(&text).ok_or_else(|| {
            TritError::invalid(format!("{THREADS_ENV}={text:?} is not a positive integer"))
        }),
        Err(_) => Ok(num_cpus::get_physical().max(1)),
    }
}

fn parse_threads(text: &str) -> Option<usize> {
    text.trim().parse::<usize>().ok().filter(|&n| n >= 1)
}

/// Upper bound on a requested thread count; more is almost surely a mistake.
pub const MAX_THREADS: usize = 1024;

/// The pool with `threads` workers (`None`: the default count).
pub fn pool(threads: Option<usize>) -> Result<Arc<ThreadPool>> {
    let n = match threads {
        Some(0) => return Err(TritError::invalid("threads must be at least 1")),
        Some(n) if n > MAX_THREADS => {
            return Err(TritError::invalid(format!(
                "threads={n} is more than {MAX_THREADS}"
            )))
        }
        Some(n) => n,
        None => default_threads()?,
    };
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = pools.get(&n) {
        return Ok(pool.clone());
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("trit-{i}"))
        .build()
        .map_err(|e| TritError::invalid(format!("cannot start {n} threads: {e}")))?;
    let pool = Arc::new(pool);
    pools.insert(n, pool.clone());
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thread_counts() {
        assert_eq!(parse_threads("4"), Some(4));
        assert_eq!(parse_threads(" 2 "), Some(2));
        assert_eq!(parse_threads("0"), None);
        assert_eq!(parse_threads("-1"), None);
        assert_eq!(parse_threads("many"), None);
    }

    #[test]
    fn pools_are_cached_and_sized() {
        let a = pool(Some(3)).unwrap();
        let b = pool(Some(3)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 3);
        assert!(pool(Some(0)).is_err());
    }
}
