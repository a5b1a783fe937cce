//! Zero-filling a guest buffer allocates nothing its size: a guest may hand one descriptor of
//! up to 4 GiB, and reads of unallocated qcow2 clusters (or past the end of a raw file) fill
//! it with zeroes. A test binary of its own, because it counts this process's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::VolatileSlice;

/// The system allocator, remembering the largest allocation since the last reset.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

#[test]
fn zero_filling_a_64_mib_buffer_allocates_no_64_mib() {
    const LEN: usize = 64 << 20;
    let mut guest = vec![0xa5u8; LEN];
    let buffer = [VolatileSlice::from(&mut guest[..])];
    LARGEST.store(0, Ordering::SeqCst);
    block::zero_fill(&buffer);
    let largest = LARGEST.load(Ordering::SeqCst);
    assert!(guest.iter().all(|&b| b == 0), "the buffer is zeroed");
    assert!(
        largest <= 64 << 10,
        "zero_fill allocated {largest} bytes for a {LEN}-byte buffer"
    );
}
