//! The host allocator's policy: freed memory is kept for reuse while a phase computes, and handed
//! back to the OS between phases.
//!
//! `src/main.rs` makes mimalloc the global allocator. Reusing freed pages matters while a phase
//! computes: fresh pages cost a page fault and the kernel's zeroing on first touch (glibc, which
//! maps every large tensor fresh, spent 6% of a CPU VAE decode there, docs/performance.md), and
//! purging on mimalloc's own timer made a 512x512 VAE decode take 29.8 s (its default 10 ms) or
//! 22.7 s (at once) instead of 16.3 s (`sdfix bench`, issue 19's notes in docs/performance.md).
//! Between phases it is the other way
//! round: what a finished phase freed (the text encoder's 1.4 GB once the prompts are encoded,
//! the read buffers of a load) is not what the next phase allocates, and kept, it stays counted
//! in the process's memory and spreads the next phase's weights over more pages. So mimalloc
//! records every freed range for purging but its timer never fires within a run
//! ([`PURGE_DELAY_MS`]), and [`release_freed`] purges them at the engine's phase boundaries.
//!
//! Harmless where mimalloc is not the global allocator (the library's tests): the options and the
//! collection then apply to mimalloc's own, unused, heap.

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (libmimalloc-sys 0.1.49, mimalloc 3.x,
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's purge delay: an hour (ten for its arenas, which multiply it by
/// `arena_purge_mult`), so freed memory is never purged on the timer within a generation. Not -1,
/// which would stop mimalloc from recording freed ranges at all, and [`release_freed`] would find
/// nothing to purge.
pub const PURGE_DELAY_MS: std::os::raw::c_long = 3_600_000;

/// Sets the purge policy; called once at startup, before the first large allocation.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option, which mimalloc reads atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// Hands the memory freed so far back to the OS (mimalloc's forced collection: this thread's
/// empty pages returned to the arenas, then every arena's freed ranges purged). Milliseconds; the
/// pages it purges cost a fault when next used, so call it only where a phase ends.
pub fn release_freed() {
    // SAFETY: a collection of this thread's heap and of the arenas, safe at any point.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
