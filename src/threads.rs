//! How many threads the CPU device uses, and which pool runs them.
//!
//! The fast CPU path splits every op over independent pieces (batch rows, heads, query tiles)
//! with rayon. Which pool runs them, in order:
//! 1. the caller's own rayon pool, when the op is called from inside one (a framework that
//!    already parallelises keeps control: no second pool, no oversubscription);
//! 2. a pool of [`set_num_threads`]`(n)` threads, when it was called with n ≥ 1 (or the
//!    `FEP_NUM_THREADS` environment variable was set before the first op);
//! 3. rayon's global pool (`RAYON_NUM_THREADS`, else one thread per core).
//!
//! Results never depend on the thread count: each output element is computed by one thread in
//! a fixed order, so 1 thread and 16 give bitwise-equal results.

use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

/// The pool of `set_num_threads`, or None for rayon's global pool.
fn slot() -> &'static Mutex<Option<Arc<ThreadPool>>> {
    static SLOT: OnceLock<Mutex<Option<Arc<ThreadPool>>>> = OnceLock::new();
    SLOT.get_or_init(|| {
        let from_env = std::env::var("FEP_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .and_then(|n| build(n).ok());
        Mutex::new(from_env)
    })
}

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("fep-cpu-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::invalid("threads", format!("could not start {n} threads: {e}")))
}

/// Sets the number of threads the CPU device uses: n ≥ 1 gives the library a pool of its own
/// with n threads; 0 returns to rayon's global pool (the default). An op called from inside a
/// rayon pool runs on that pool whatever this says. Ops already running finish on the pool they
/// started on.
///
/// ```
/// fep_kernels::set_num_threads(1).unwrap();
/// assert_eq!(fep_kernels::num_threads(), 1);
/// fep_kernels::set_num_threads(0).unwrap(); // back to rayon's global pool
/// ```
pub fn set_num_threads(n: usize) -> Result<()> {
    const MAX: usize = 4096;
    if n > MAX {
        return Err(Error::invalid(
            "threads",
            format!("{n} threads; expected 0 (rayon's global pool) to {MAX}"),
        ));
    }
    let pool = if n == 0 { None } else { Some(build(n)?) };
    *slot().lock().unwrap_or_else(|p| p.into_inner()) = pool;
    Ok(())
}

/// The number of threads an op called here and now would use (see the module docs).
pub fn num_threads() -> usize {
    if rayon::current_thread_index().is_some() {
        return rayon::current_num_threads();
    }
    match &*slot().lock().unwrap_or_else(|p| p.into_inner()) {
        Some(pool) => pool.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// Runs `f` on the pool the module docs name: inside `f`, rayon's parallel iterators use it.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = slot().lock().unwrap_or_else(|p| p.into_inner()).clone();
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_limits() {
        set_num_threads(3).unwrap();
        assert_eq!(num_threads(), 3);
        assert_eq!(install(rayon::current_num_threads), 3);
        // Inside a foreign pool, that pool wins.
        let outer = ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(outer.install(num_threads), 2);
        assert_eq!(outer.install(|| install(rayon::current_num_threads)), 2);
        assert!(set_num_threads(1 << 20).is_err());
        set_num_threads(0).unwrap();
        assert_eq!(num_threads(), rayon::current_num_threads());
    }
}
