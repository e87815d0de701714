//! A global allocator that records the largest single allocation request.
//!
//! This is the one piece of process-wide state in the fuzz binary, and it has to be: the
//! allocator is process-wide by definition. The runner resets the watermark before each input
//! and reads it after, so a reader that sizes a buffer from an untrusted length field (a shape,
//! an offset, a count in a header) is caught even when the allocation happens to succeed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator plus a high-water mark of request sizes.
pub struct Watermark {
    largest: AtomicUsize,
}

impl Watermark {
    /// A fresh watermark (0).
    pub const fn new() -> Watermark {
        Watermark { largest: AtomicUsize::new(0) }
    }

    /// The largest request since the last [`Watermark::reset`], in bytes.
    pub fn largest(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }

    /// Starts a new measurement.
    pub fn reset(&self) {
        self.largest.store(0, Ordering::Relaxed);
    }

    fn note(&self, size: usize) {
        self.largest.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// bookkeeping is an atomic max and never allocates.
unsafe impl GlobalAlloc for Watermark {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (every path above) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
