//! The host allocator's policy (`sdfix::kernels::host_memory`): memory freed inside a phase stays
//! resident for reuse, and [`release_freed`] hands it back to the OS. Alone in its test binary so
//! that no other test's allocations move the process's resident size. Linux only (`/proc`).
#![cfg(target_os = "linux")]

use sdfix::kernels::host_memory::{keep_freed_memory, release_freed};

/// This process's resident bytes (`VmRSS` in `/proc/self/status`, in kB whatever the page size).
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[test]
fn freed_memory_stays_resident_until_released() {
    const BYTES: usize = 256 << 20;
    keep_freed_memory();
    let before = resident_bytes();
    // mimalloc directly: the test binary's global allocator is the system's.
    // SAFETY: a plain allocation, checked for null, written within its size, then freed once.
    unsafe {
        let block = libmimalloc_sys::mi_malloc(BYTES).cast::<u8>();
        assert!(!block.is_null());
        for offset in (0..BYTES).step_by(4096) {
            block.add(offset).write_volatile(1);
        }
        libmimalloc_sys::mi_free(block.cast());
    }
    let freed = resident_bytes();
    release_freed();
    let released = resident_bytes();
    let mb = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    eprintln!(
        "resident: {:.0} MB before, {:.0} MB after freeing 256 MB, {:.0} MB after release_freed",
        mb(before),
        mb(freed),
        mb(released)
    );
    // Kept while a phase computes (mimalloc's timer never fires within a run)...
    assert!(freed >= before + BYTES * 9 / 10, "freed memory was not kept for reuse");
    // ...and handed back at a phase boundary.
    assert!(
        released + BYTES * 9 / 10 <= freed,
        "release_freed did not return the freed memory"
    );
}
