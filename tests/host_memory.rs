//! The host allocator (`sdfix::kernels::host_memory`, the binary's global allocator, and this
//! test binary's): memory freed inside a phase stays resident for reuse, large blocks are
//! mappings of their own reused at any size, and [`release_freed`] hands freed memory back to the
//! OS. Alone in its test binary so that no other test's allocations move the process's resident
//! size; the tests take turns (`SERIAL`). Linux only (`/proc`, mappings).
#![cfg(target_os = "linux")]

use std::sync::Mutex;

use sdfix::kernels::host_memory::{
    keep_freed_memory, large_blocks, release_freed, HostAllocator, LARGE_BLOCK_OVER_BYTES,
};

#[global_allocator]
static ALLOCATOR: HostAllocator = HostAllocator;

/// One test at a time: they read the process's resident size and the allocator's totals.
static SERIAL: Mutex<()> = Mutex::new(());

const MB: usize = 1 << 20;

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

/// A buffer of `bytes`, every page written (resident).
fn touched(bytes: usize) -> Vec<u8> {
    let mut buffer = Vec::<u8>::with_capacity(bytes);
    buffer.resize(bytes, 1);
    buffer
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / MB as f64
}

#[test]
fn freed_small_blocks_stay_resident_until_released() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    keep_freed_memory();
    release_freed();
    let before = resident_bytes();
    // 256 MB in mimalloc's blocks (64 KiB each, under the large-block size).
    let blocks: Vec<Vec<u8>> = (0..4096).map(|_| touched(64 << 10)).collect();
    assert_eq!(large_blocks().live_bytes, 0, "64 KiB blocks are mimalloc's");
    drop(blocks);
    let freed = resident_bytes();
    release_freed();
    let released = resident_bytes();
    eprintln!(
        "small blocks: {:.0} MB before, {:.0} MB after freeing 256 MB, {:.0} MB after release_freed",
        mb(before),
        mb(freed),
        mb(released)
    );
    // Kept while a phase computes (mimalloc's timer never fires within a run)...
    assert!(freed >= before + 230 * MB, "freed memory was not kept for reuse");
    // ...and handed back at a phase boundary.
    assert!(
        released + 230 * MB <= freed,
        "release_freed did not return the freed memory"
    );
}

#[test]
fn freed_large_blocks_stay_resident_and_are_reused_at_any_size() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    release_freed();
    let start = resident_bytes();
    let first = touched(256 * MB);
    let totals = large_blocks();
    assert_eq!(totals.live_bytes, 256 * MB, "{totals:?}");
    drop(first);
    let totals = large_blocks();
    assert_eq!((totals.live_bytes, totals.free_bytes), (0, 256 * MB), "{totals:?}");
    let freed = resident_bytes();
    assert!(
        freed >= start + 250 * MB,
        "a freed large block stays resident for reuse"
    );
    // A smaller block is cut from the freed range: no new memory.
    let smaller = touched(192 * MB);
    let after_smaller = resident_bytes();
    assert_eq!(large_blocks().free_bytes, 64 * MB);
    assert!(
        after_smaller <= freed + 4 * MB,
        "192 MB from a freed 256 MB range: {:.0} MB more",
        mb(after_smaller.saturating_sub(freed))
    );
    drop(smaller);
    // A larger one takes the whole freed range (merged again) and only the rest is new.
    let larger = touched(320 * MB);
    let after_larger = resident_bytes();
    assert!(
        after_larger <= start + 330 * MB,
        "320 MB over a freed 256 MB range: {:.0} MB over the start",
        mb(after_larger - start)
    );
    drop(larger);
    release_freed();
    let released = resident_bytes();
    eprintln!(
        "large blocks: start {:.0} MB, 256 MB freed {:.0}, 192 MB reused {:.0}, 320 MB grown {:.0}, released {:.0}",
        mb(start),
        mb(freed),
        mb(after_smaller),
        mb(after_larger),
        mb(released)
    );
    assert!(released <= start + 8 * MB, "release_freed hands the freed ranges back");
    // Handed back, the addresses are reused, and read as zero when asked for zeroed memory.
    let zeros = vec![0u8; 300 * MB];
    assert!(zeros.iter().all(|&b| b == 0));
    assert_eq!(large_blocks().live_bytes, 300 * MB);
}

#[test]
fn contents_survive_every_resize_and_zeroed_blocks_are_zero_even_when_reused() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Grown from mimalloc's sizes into a mapping, grown as a mapping (moved by the kernel), shrunk
    // back to mimalloc's: every byte kept.
    let mut values: Vec<u32> = Vec::new();
    for count in [1_000usize, 100_000, 200_000, 3_000_000, 9_000_000] {
        values.extend(values.len() as u32..count as u32);
        assert!(values.iter().enumerate().all(|(i, &v)| v == i as u32), "{count} values");
    }
    assert!(large_blocks().live_bytes >= 36_000_000);
    values.truncate(50_000);
    values.shrink_to_fit();
    assert!(values.capacity() * 4 <= LARGE_BLOCK_OVER_BYTES);
    assert!(values.iter().enumerate().all(|(i, &v)| v == i as u32));
    // A dirty pooled block handed out as zeroed memory is cleared, at the same and other sizes.
    for bytes in [64 * MB, 64 * MB, 48 * MB, 80 * MB] {
        let dirty = vec![0xa5u8; bytes];
        drop(dirty);
        let zeros = vec![0u8; bytes];
        assert!(zeros.iter().all(|&b| b == 0), "{bytes} zeroed bytes from the pool");
    }
    release_freed();
}

#[test]
fn threads_allocate_resize_and_free_large_blocks_at_once() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live_before = large_blocks().live_bytes;
    std::thread::scope(|scope| {
        for thread in 0..4u32 {
            scope.spawn(move || {
                let mut kept: Vec<Vec<u32>> = Vec::new();
                let mut state = 0x9e37_79b9u32.wrapping_mul(thread + 1);
                for round in 0..150u32 {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let count = 150_000 + (state as usize % 2_000_000);
                    let mark = thread << 24 | round;
                    let mut block = vec![mark; count];
                    if state.is_multiple_of(3) {
                        block.resize(count + 500_000, mark);
                    }
                    assert!(block.iter().all(|&v| v == mark), "thread {thread} round {round}");
                    kept.push(block);
                    if kept.len() > 6 {
                        let old = kept.remove((state as usize / 7) % kept.len());
                        let first = old[0];
                        assert!(old.iter().all(|&v| v == first), "thread {thread} round {round}");
                    }
                }
            });
        }
    });
    assert_eq!(large_blocks().live_bytes, live_before, "every large block freed");
    release_freed();
}
