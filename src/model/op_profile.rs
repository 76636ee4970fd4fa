//! Wall time per kind of op (conv 3x3, linear, attention, ...), for `sdfix bench --profile`: which
//! op costs what, measured before changing any of them. Off unless enabled; then each timed op
//! adds its seconds to a global table. CPU ops run synchronously, so the times are theirs; on a
//! GPU, kernels are queued asynchronously and the times mean little.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (op, seconds, calls), in first-seen order.
static TOTALS: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

/// Starts recording.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `op`'s total when recording.
pub fn time<T>(op: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let out = f();
    let seconds = started.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap_or_else(PoisonError::into_inner);
    match totals.iter_mut().find(|(name, _, _)| *name == op) {
        Some((_, total, calls)) => {
            *total += seconds;
            *calls += 1;
        }
        None => totals.push((op, seconds, 1)),
    }
    out
}

/// The totals so far, (op, seconds, calls), and a fresh table.
pub fn take() -> Vec<(&'static str, f64, usize)> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(PoisonError::into_inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled_and_take_resets() {
        // One test owns the global table, so nothing else records concurrently.
        time("off", || ());
        assert!(take().iter().all(|(op, _, _)| *op != "off"));
        enable();
        time("op a", || std::thread::sleep(std::time::Duration::from_millis(2)));
        time("op a", || ());
        time("op b", || ());
        let totals = take();
        let a = totals.iter().find(|(op, _, _)| *op == "op a").unwrap();
        assert_eq!(a.2, 2);
        assert!(a.1 >= 0.002);
        assert!(totals.iter().any(|(op, _, calls)| *op == "op b" && *calls == 1));
        assert!(take().iter().all(|(op, _, _)| *op != "op a"));
    }
}
