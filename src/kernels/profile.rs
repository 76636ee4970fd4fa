//! Wall time per kind of op (conv 3x3, linear, attention, ...), for `sdfix bench --profile`: which
//! op costs what, measured before changing any of them. Off unless enabled; then each timed op
//! adds its seconds to its thread's table (the layers time themselves on the thread that runs the
//! model, and `bench` reads that thread's table; tests running in parallel cannot mix entries). CPU ops run synchronously, so the times are theirs; on a
//! GPU, kernels are queued asynchronously and the times mean little. Ops that pass a detail
//! (the linear layers: their `rows x in x out`) are also totalled per detail, to compare shape by
//! shape with PyTorch's profiler.
//!
//! On a GPU, [`enable_synchronized`] makes each timed op wait for the device before and after it,
//! so that its time is its kernels' (issue 32: where a UNet step goes on CUDA). The waits cost
//! time of their own, so a profiled run's stage times are not the unprofiled ones.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::LocalKey;
use std::time::Instant;

use candle_core::Device;

/// Rows of (key, seconds, calls), in first-seen order.
type Table<K> = RefCell<Vec<(K, f64, usize)>>;

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// (op, seconds, calls).
    static TOTALS: Table<&'static str> = const { RefCell::new(Vec::new()) };
    /// ((op, detail), seconds, calls).
    static DETAILS: Table<(&'static str, String)> = const { RefCell::new(Vec::new()) };
    /// The device this thread's timed ops wait for ([`enable_synchronized`]).
    static SYNCHRONIZE: RefCell<Option<Device>> = const { RefCell::new(None) };
}

/// Starts recording.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Starts recording, with every op timed on this thread waiting for `device` before it starts
/// and after it returns (for GPUs, whose kernels are otherwise queued asynchronously).
pub fn enable_synchronized(device: &Device) {
    SYNCHRONIZE.with_borrow_mut(|d| *d = Some(device.clone()));
    enable();
}

/// Waits for this thread's [`enable_synchronized`] device, if any. A failed wait is left to the
/// op's own result (the next use of the device reports it).
fn wait_for_device() {
    SYNCHRONIZE.with_borrow(|device| {
        if let Some(device) = device {
            let _ = device.synchronize();
        }
    });
}

/// Runs `f`, adding its wall time to `op`'s total when recording.
pub fn time<T>(op: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    wait_for_device();
    let started = Instant::now();
    let out = f();
    wait_for_device();
    add(&TOTALS, op, started.elapsed().as_secs_f64());
    out
}

/// As [`time`], and also adds the time to (`op`, `detail()`)'s total; `detail` runs only when
/// recording.
pub fn time_detailed<T>(op: &'static str, detail: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let detail = detail();
    wait_for_device();
    let started = Instant::now();
    let out = f();
    wait_for_device();
    let seconds = started.elapsed().as_secs_f64();
    add(&TOTALS, op, seconds);
    add(&DETAILS, (op, detail), seconds);
    out
}

/// Adds one call of `seconds` to `key`'s row of `table`, appending the row when new.
fn add<K: PartialEq + 'static>(table: &'static LocalKey<Table<K>>, key: K, seconds: f64) {
    table.with_borrow_mut(|rows| match rows.iter_mut().find(|(k, _, _)| *k == key) {
        Some((_, total, calls)) => {
            *total += seconds;
            *calls += 1;
        }
        None => rows.push((key, seconds, 1)),
    })
}

/// This thread's totals so far, (op, seconds, calls), and a fresh table.
pub fn take() -> Vec<(&'static str, f64, usize)> {
    TOTALS.take()
}

/// This thread's per-detail totals so far, (op, detail, seconds, calls), and a fresh table.
pub fn take_details() -> Vec<(&'static str, String, f64, usize)> {
    DETAILS
        .take()
        .into_iter()
        .map(|((op, detail), seconds, calls)| (op, detail, seconds, calls))
        .collect()
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

        time_detailed("op c", || "2x3".to_string(), || ());
        time_detailed("op c", || "2x3".to_string(), || ());
        time_detailed("op c", || "4x5".to_string(), || ());
        let totals = take();
        assert!(totals.iter().any(|(op, _, calls)| *op == "op c" && *calls == 3));
        let details = take_details();
        assert_eq!(details.len(), 2);
        assert!(details
            .iter()
            .any(|(op, d, _, calls)| *op == "op c" && d == "2x3" && *calls == 2));
        assert!(take_details().is_empty());
    }
}
