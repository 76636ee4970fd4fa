//! The host allocator's policy (`sdfix::kernels::host_memory`): memory freed inside a phase stays
//! resident for reuse, and [`release_freed`] hands it back to the OS. Alone in its test binary so
//! that no other test's allocations move the process's resident size. Linux only (`/proc`).
#![cfg(target_os = "linux")]

use sdfix::kernels::host_memory::{keep_freed_memory, release_freed};

/// This process's resident bytes (`/proc/self/statm`'s second field, in pages).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

#[test]
fn freed_memory_stays_resident_until_released() {
    const BYTES: usize = 256 << 20;
    keep_freed_memory();
    // mimalloc directly: the test binary's global allocator is the system's.
    // SAFETY: a plain allocation, checked for null, written within its size, then freed once.
    let before = resident_bytes();
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
