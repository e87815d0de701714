//! A global allocator that records, per measurement, the largest single allocation request and
//! the peak of live heap bytes.
//!
//! This is the one piece of process-wide state in the fuzz binary, and it has to be: the
//! allocator is process-wide by definition. The runner resets the marks before each input and
//! reads them after, so a reader that sizes a buffer from an untrusted length field (a shape, an
//! offset, a count in a header) is caught even when the allocation happens to succeed, and one
//! that builds up memory in many small pieces (a pickle's tree of values, a list per declared
//! entry) is caught by the peak even when no single piece is large.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator plus a high-water mark of request sizes and of live bytes.
pub struct Watermark {
    largest: AtomicUsize,
    live: AtomicUsize,
    peak: AtomicUsize,
    base: AtomicUsize,
}

impl Watermark {
    /// A fresh watermark (nothing allocated).
    pub const fn new() -> Watermark {
        Watermark {
            largest: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            base: AtomicUsize::new(0),
        }
    }

    /// The largest request since the last [`Watermark::reset`], in bytes.
    pub fn largest(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }

    /// The peak of live bytes since the last [`Watermark::reset`], above what was live then.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed).saturating_sub(self.base.load(Ordering::Relaxed))
    }

    /// Starts a new measurement.
    pub fn reset(&self) {
        let live = self.live.load(Ordering::Relaxed);
        self.base.store(live, Ordering::Relaxed);
        self.peak.store(live, Ordering::Relaxed);
        self.largest.store(0, Ordering::Relaxed);
    }

    fn grow(&self, request: usize, by: usize) {
        self.largest.fetch_max(request, Ordering::Relaxed);
        let live = self.live.fetch_add(by, Ordering::Relaxed) + by;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    fn shrink(&self, by: usize) {
        self.live.fetch_sub(by, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// bookkeeping is atomic arithmetic and never allocates. A failed request (null) is not counted
// as live.
unsafe impl GlobalAlloc for Watermark {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        if !p.is_null() {
            self.grow(layout.size(), layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        if !p.is_null() {
            self.grow(layout.size(), layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.shrink(layout.size());
        // SAFETY: `ptr` was allocated by `System` (every path above) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's, passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        self.largest.fetch_max(new_size, Ordering::Relaxed);
        if !p.is_null() {
            if new_size >= layout.size() {
                self.grow(new_size, new_size - layout.size());
            } else {
                self.shrink(layout.size() - new_size);
            }
        }
        p
    }
}
