//! The host allocator's policy: freed memory is kept for reuse while a phase computes, and handed
//! back to the OS between phases.
//!
//! `src/main.rs` makes [`HostAllocator`] the global allocator: mimalloc for small blocks, an arena
//! of our own for large ones (below). Reusing freed pages matters while a phase
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
//! Blocks over 512 KiB (every weight matrix and convolution, the large activations) do not go to
//! mimalloc at all ([`HostAllocator`]): they are cut from one arena of our own at page
//! granularity, best fit, freed ranges merged with their neighbours and kept resident for reuse
//! until [`release_freed`], like mimalloc's. mimalloc 3 places a block over 32 MB only in whole
//! free 32 MB blocks of its arenas, which it shares with small pages; so a few small allocations
//! (the 1228-entry header of a single file against a folder's three small ones) moved SD 2's
//! 193 MB token embedding, and every weight after it, 32 MB on, and which free range a 33.5 MB
//! VAE activation found changed the peak by 30 MB from run to run. In an arena of large blocks
//! only, the layout follows the large blocks alone: SD 2.1-base's 256 px peak went from 4.21-4.25 GB
//! to 3.92-3.93 GB for a folder and a single file alike, with no consistent cost in speed (issue
//! 19, docs/performance.md).
//!
//! Harmless where [`HostAllocator`] is not the global allocator (the library's tests): the options
//! and the collection then apply to mimalloc's own, unused, heap, and the arena is never reserved.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;

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

/// Hands the memory freed so far back to the OS: the large blocks' free ranges, then
/// mimalloc's forced collection (this thread's empty pages returned to the arenas, then every
/// arena's freed ranges purged). Milliseconds; the pages it returns cost a fault when next used,
/// so call it only where a phase ends.
pub fn release_freed() {
    #[cfg(target_os = "linux")]
    large::release_free_ranges();
    // SAFETY: a collection of this thread's heap and of the arenas, safe at any point.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Blocks of more than this many bytes are the large-block arena's ([`HostAllocator`]): mimalloc
/// 3's `MI_LARGE_MAX_OBJ_SIZE`, past which it gives a block a page of its own in its arenas
/// anyway. Every weight matrix and convolution of SD 1/2 but the 320-channel ones, and the
/// activations of all but the smallest pictures.
pub const LARGE_BLOCK_OVER_BYTES: usize = 512 << 10;

/// The large blocks' bytes, whole pages: in use, and freed (resident until [`release_freed`],
/// then address space only, reused all the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LargeBlocks {
    pub live_bytes: usize,
    pub free_bytes: usize,
}

/// What the large blocks hold now (all zero where they are not the arena's: off Linux, or where
/// [`HostAllocator`] is not the global allocator).
pub fn large_blocks() -> LargeBlocks {
    #[cfg(target_os = "linux")]
    {
        large::totals()
    }
    #[cfg(not(target_os = "linux"))]
    {
        LargeBlocks::default()
    }
}

/// The process's global allocator (`src/main.rs`): mimalloc for blocks up to
/// [`LARGE_BLOCK_OVER_BYTES`], the large-block arena for larger ones (on Linux; mimalloc for all
/// elsewhere, and where the arena's address range cannot be reserved or is full). Freed large
/// blocks stay resident for reuse until [`release_freed`], like mimalloc's freed pages under
/// [`keep_freed_memory`].
pub struct HostAllocator;

/// Whether a block of `layout` is the arena's (alignments past a page stay mimalloc's).
fn is_large(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() > LARGE_BLOCK_OVER_BYTES && layout.align() <= large::PAGE_BYTES
}

/// A block for `layout` (`zeroed`: all zero): the arena's when it is large and the arena has room,
/// else mimalloc's.
///
/// # Safety
/// `layout` has a non-zero size, as [`GlobalAlloc::alloc`] requires.
unsafe fn allocate(layout: Layout, zeroed: bool) -> *mut u8 {
    if is_large(layout) {
        let block = large::allocate(layout.size(), zeroed);
        if !block.is_null() {
            return block;
        }
    }
    // SAFETY: `layout` has a non-zero size (this function's contract), the one requirement of
    // GlobalAlloc::alloc and alloc_zeroed.
    unsafe {
        if zeroed {
            MiMalloc.alloc_zeroed(layout)
        } else {
            MiMalloc.alloc(layout)
        }
    }
}

// SAFETY: a block is the arena's exactly when its address lies in the arena's range (mimalloc's
// memory never does), so every call that receives a block sends it to its owner: the arena's for
// sizes `is_large` could have given it (the size a block was made with, as GlobalAlloc requires),
// mimalloc's for the rest, unchanged.
unsafe impl GlobalAlloc for HostAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: GlobalAlloc::alloc's caller guarantees a non-zero size, `allocate`'s contract.
        unsafe { allocate(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: GlobalAlloc::alloc_zeroed's caller guarantees a non-zero size, `allocate`'s
        // contract.
        unsafe { allocate(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() > LARGE_BLOCK_OVER_BYTES && large::free(ptr, layout.size()) {
            return;
        }
        // SAFETY: `large::free` declined it, so it is not the arena's: a live block mimalloc made,
        // and GlobalAlloc::dealloc's caller passes the layout it was made with.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let in_arena = layout.size() > LARGE_BLOCK_OVER_BYTES && large::owns(ptr);
        if in_arena && is_large(new_layout) && large::resize_in_place(ptr, layout.size(), new_size) {
            return ptr;
        }
        if !in_arena && !is_large(new_layout) {
            // SAFETY: not in the arena, so a live block of mimalloc's made with `layout`; `new_size`
            // is non-zero and rounds to a valid Layout with this alignment (checked just above),
            // as GlobalAlloc::realloc requires.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // Moved (to the other owner, or elsewhere in the arena): a new block, the common bytes
        // copied, the old one freed through `dealloc`, which returns it to its owner.
        // SAFETY: `moved` is a fresh block of at least `new_size` bytes and `ptr` holds
        // `layout.size()`; they do not overlap, and `ptr` is freed once, with its own layout.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            moved
        }
    }
}

/// The large blocks: one reserved address range (the arena) cut into blocks at page granularity,
/// with the free ranges in address order, coalesced, under one lock (held for the list's
/// searches and edits; the arena's one reservation and [`release_freed`]'s advice are the only
/// system calls made under it, and neither allocates).
mod large {
    #[cfg(target_os = "linux")]
    pub use linux::*;

    /// Blocks start and end on page boundaries (4 KiB on x86-64; where the kernel's pages are
    /// larger, its advice applies to whole pages, the same way every time).
    pub const PAGE_BYTES: usize = 4096;

    #[cfg(target_os = "linux")]
    mod linux {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Mutex, MutexGuard, PoisonError};

        use super::super::LargeBlocks;
        use super::PAGE_BYTES;

        /// Transparent huge pages: 2 MiB on x86-64 and most aarch64 kernels.
        const HUGE_PAGE_BYTES: usize = 2 << 20;
        /// Free ranges the list holds; past this many (a badly fragmented arena), a freed block's
        /// pages are returned to the OS and its addresses left unused.
        const FREE_SLOTS: usize = 8192;
        /// The arena reserves address space, not memory: twice the machine's memory, at most
        /// 1 TiB, which no run needs to exceed (past it, large blocks are mimalloc's).
        const MAX_ARENA_BYTES: usize = 1 << 40;

        #[derive(Clone, Copy)]
        struct Range {
            start: usize,
            length: usize,
        }

        const NO_RANGE: Range = Range { start: 0, length: 0 };

        struct Arena {
            /// 0 until the first large block; `usize::MAX` once a reservation failed.
            start: usize,
            end: usize,
            /// Where never-used addresses begin: the pages from here on have never been touched
            /// (or were handed back), so they read as zero.
            top: usize,
            /// `free[..free_count]`: freed ranges below `top`, by address, none adjacent.
            free: [Range; FREE_SLOTS],
            free_count: usize,
            live_bytes: usize,
            free_bytes: usize,
        }

        static ARENA: Mutex<Arena> = Mutex::new(Arena {
            start: 0,
            end: 0,
            top: 0,
            free: [NO_RANGE; FREE_SLOTS],
            free_count: 0,
            live_bytes: 0,
            free_bytes: 0,
        });

        /// The arena's bounds, readable without the lock (set once): what `owns` checks.
        static ARENA_START: AtomicUsize = AtomicUsize::new(0);
        static ARENA_END: AtomicUsize = AtomicUsize::new(0);

        /// The arena, locked. std's Mutex does not allocate; nothing panics while it is held,
        /// so a poisoned lock still guards a consistent arena.
        fn arena() -> MutexGuard<'static, Arena> {
            ARENA.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn page_length(size: usize) -> usize {
            size.div_ceil(PAGE_BYTES) * PAGE_BYTES
        }

        impl Arena {
            /// Reserves the address range on first use: no memory is committed until touched
            /// (MAP_NORESERVE), and the kernel is asked for huge pages in it, as mimalloc does for
            /// its arenas: the large blocks stay on 2 MiB pages, as they were under mimalloc
            /// (`AnonHugePages` in /proc/PID/smaps_rollup covers nearly all of the RSS).
            fn reserve(&mut self) -> bool {
                if self.start != 0 {
                    return self.start != usize::MAX;
                }
                // SAFETY: sysconf takes no pointers and only reads two limits of the machine
                // (-1 on error, clamped to 0).
                let memory = unsafe {
                    libc::sysconf(libc::_SC_PHYS_PAGES).max(0) as usize
                        * libc::sysconf(libc::_SC_PAGESIZE).max(0) as usize
                };
                let bytes = memory.saturating_mul(2).min(MAX_ARENA_BYTES) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
                // SAFETY: a new private anonymous mapping at an address the kernel picks (null
                // hint, no MAP_FIXED), so it cannot replace memory anything else refers to.
                let address = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        bytes + HUGE_PAGE_BYTES,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if bytes == 0 || address == libc::MAP_FAILED {
                    self.start = usize::MAX;
                    return false;
                }
                let start = (address as usize).next_multiple_of(HUGE_PAGE_BYTES);
                // SAFETY: start..start + bytes lies inside the mapping just made (start rounds
                // `address` up by less than the extra HUGE_PAGE_BYTES mapped); MADV_HUGEPAGE
                // only hints the page size and leaves contents alone, so failure changes nothing.
                unsafe { libc::madvise(start as *mut _, bytes, libc::MADV_HUGEPAGE) };
                self.start = start;
                self.end = start + bytes;
                self.top = start;
                ARENA_END.store(self.end, Ordering::Release);
                ARENA_START.store(start, Ordering::Release);
                true
            }

            /// The start of `length` free bytes: the smallest free range that holds them (its
            /// rest stays free), else fresh addresses at `top`. `Some((start, fresh))`, `fresh`
            /// when the pages were never used (they read as zero).
            fn take(&mut self, length: usize) -> Option<(usize, bool)> {
                let best = self.free[..self.free_count]
                    .iter()
                    .enumerate()
                    .filter(|(_, range)| range.length >= length)
                    .min_by_key(|(_, range)| range.length)
                    .map(|(index, _)| index);
                if let Some(index) = best {
                    let start = self.free[index].start;
                    self.take_front(index, length);
                    return Some((start, false));
                }
                // A free range that ends at `top` grows there instead of leaving a hole.
                let at_top = self
                    .free_count
                    .checked_sub(1)
                    .filter(|&last| self.free[last].start + self.free[last].length == self.top);
                let start = at_top.map_or(self.top, |last| self.free[last].start);
                if start + length > self.end {
                    return None;
                }
                if let Some(last) = at_top {
                    self.free_count -= 1;
                    self.free_bytes -= self.free[last].length;
                }
                self.top = start + length;
                self.live_bytes += length;
                Some((start, at_top.is_none()))
            }

            /// Moves the first `length` bytes of free range `index` (which holds them) into use:
            /// the range shrinks from the front, or leaves the list when that is all of it.
            fn take_front(&mut self, index: usize, length: usize) {
                let range = self.free[index];
                if range.length == length {
                    self.free.copy_within(index + 1..self.free_count, index);
                    self.free_count -= 1;
                } else {
                    self.free[index] = Range {
                        start: range.start + length,
                        length: range.length - length,
                    };
                }
                self.free_bytes -= length;
                self.live_bytes += length;
            }

            /// Returns `range` to the free list, merged with free neighbours; false when the
            /// list is full.
            fn give_back_range(&mut self, range: Range) -> bool {
                let count = self.free_count;
                let index = self.free[..count].partition_point(|r| r.start < range.start);
                let joins_before = index > 0 && {
                    let before = self.free[index - 1];
                    before.start + before.length == range.start
                };
                let joins_after = index < count && range.start + range.length == self.free[index].start;
                match (joins_before, joins_after) {
                    (true, true) => {
                        self.free[index - 1].length += range.length + self.free[index].length;
                        self.free.copy_within(index + 1..count, index);
                        self.free_count -= 1;
                    }
                    (true, false) => self.free[index - 1].length += range.length,
                    (false, true) => {
                        self.free[index].start = range.start;
                        self.free[index].length += range.length;
                    }
                    (false, false) => {
                        if count == FREE_SLOTS {
                            return false;
                        }
                        self.free.copy_within(index..count, index + 1);
                        self.free[index] = range;
                        self.free_count += 1;
                    }
                }
                self.free_bytes += range.length;
                true
            }
        }

        /// A large block of at least `size` bytes (`zeroed`: all zero), or null for the caller to
        /// ask mimalloc (no arena could be reserved, or it is full).
        pub fn allocate(size: usize, zeroed: bool) -> *mut u8 {
            let length = page_length(size);
            let taken = {
                let mut arena = arena();
                if !arena.reserve() {
                    return std::ptr::null_mut();
                }
                arena.take(length)
            };
            let Some((start, fresh)) = taken else {
                return std::ptr::null_mut();
            };
            if zeroed && !fresh {
                // SAFETY: `take` handed this call the range start..start + length, inside the
                // mapped arena and owned by no other block, and length >= size.
                unsafe { std::ptr::write_bytes(start as *mut u8, 0, size) };
            }
            start as *mut u8
        }

        /// Whether `ptr` lies in the arena (every block there is this module's).
        pub fn owns(ptr: *mut u8) -> bool {
            let address = ptr as usize;
            let start = ARENA_START.load(Ordering::Acquire);
            start != 0 && address >= start && address < ARENA_END.load(Ordering::Acquire)
        }

        /// Frees the block of `size` bytes at `ptr` if it is the arena's (its pages stay
        /// resident for the next large block, until [`release_free_ranges`]); false for mimalloc's.
        pub fn free(ptr: *mut u8, size: usize) -> bool {
            if !owns(ptr) {
                return false;
            }
            let range = Range {
                start: ptr as usize,
                length: page_length(size),
            };
            let mut arena = arena();
            arena.live_bytes -= range.length;
            if !arena.give_back_range(range) {
                drop(arena);
                // The list is full: the pages go back to the OS, the addresses stay unused.
                // SAFETY: the caller's freed block, which nobody uses any more.
                unsafe { libc::madvise(range.start as *mut _, range.length, libc::MADV_DONTNEED) };
            }
            true
        }

        /// Resizes the arena's block at `ptr` (`old_size` bytes) in place: shrinking frees its
        /// tail, growing takes the free range or fresh addresses right after it. False when
        /// there is no room there (the caller moves the block).
        pub fn resize_in_place(ptr: *mut u8, old_size: usize, new_size: usize) -> bool {
            let (old, new) = (page_length(old_size), page_length(new_size));
            let start = ptr as usize;
            let mut arena = arena();
            if new <= old {
                if new < old {
                    arena.live_bytes -= old - new;
                    if !arena.give_back_range(Range {
                        start: start + new,
                        length: old - new,
                    }) {
                        // Keep the tail in the block (its bytes are counted live again).
                        arena.live_bytes += old - new;
                        return false;
                    }
                }
                return true;
            }
            let (end, extra) = (start + old, new - old);
            if end == arena.top {
                if end + extra > arena.end {
                    return false;
                }
                arena.top += extra;
                arena.live_bytes += extra;
                return true;
            }
            let count = arena.free_count;
            let index = arena.free[..count].partition_point(|r| r.start < end);
            if index < count && arena.free[index].start == end && arena.free[index].length >= extra {
                // Its pages may hold old bytes, which realloc allows.
                arena.take_front(index, extra);
                return true;
            }
            false
        }

        /// Hands the free ranges' pages back to the OS; a free range that ends at `top` lowers
        /// it (its addresses read as zero again).
        pub fn release_free_ranges() {
            let mut arena = arena();
            if arena.start == 0 || arena.start == usize::MAX {
                return;
            }
            for range in &arena.free[..arena.free_count] {
                // SAFETY: free ranges of the arena, used by nobody; the pages read as zero next.
                unsafe { libc::madvise(range.start as *mut _, range.length, libc::MADV_DONTNEED) };
            }
            if let Some(last) = arena.free_count.checked_sub(1).map(|last| arena.free[last]) {
                if last.start + last.length == arena.top {
                    arena.top = last.start;
                    arena.free_count -= 1;
                    arena.free_bytes -= last.length;
                }
            }
        }

        pub fn totals() -> LargeBlocks {
            let arena = arena();
            LargeBlocks {
                live_bytes: arena.live_bytes,
                free_bytes: arena.free_bytes,
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn allocate(_size: usize, _zeroed: bool) -> *mut u8 {
        std::ptr::null_mut()
    }

    #[cfg(not(target_os = "linux"))]
    pub fn owns(_ptr: *mut u8) -> bool {
        false
    }

    #[cfg(not(target_os = "linux"))]
    pub fn free(_ptr: *mut u8, _size: usize) -> bool {
        false
    }

    #[cfg(not(target_os = "linux"))]
    pub fn resize_in_place(_ptr: *mut u8, _old_size: usize, _new_size: usize) -> bool {
        false
    }
}
