//! Shared by the hostile-driver tests: the process's resident memory, and a driver's side of a
//! split virtqueue in guest memory. (virtio-queue's `MockSplitQueue` puts the used ring inside
//! the second half of the available ring, which a driver that fills the ring overwrites.)

#![allow(dead_code)] // each test binary uses its own part

use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Memory = GuestMemoryMmap<()>;

/// Bytes of this process in RAM (`/proc/self/statm`).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * host_sys::system::page_size()
}

/// Guest memory of `len` bytes, every page touched, so that what the device writes into it
/// later does not count as the VMM's growth.
pub fn touched_memory(len: usize) -> Memory {
    let mem = Memory::from_ranges(&[(GuestAddress(0), len)]).unwrap();
    mem.write_slice(&vec![0u8; len], GuestAddress(0)).unwrap();
    mem
}

/// The rings of a `size`-entry split queue, as the driver sees them: the descriptor table at
/// `base`, the available ring after it, the used ring on the next 4 KiB boundary.
pub struct Rings<'m> {
    mem: &'m Memory,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl<'m> Rings<'m> {
    /// Rings at `base`, zeroed (nothing published, nothing used).
    pub fn new(mem: &'m Memory, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
        let rings = Rings {
            mem,
            size,
            desc: base,
            avail,
            used,
        };
        rings.clear();
        rings
    }

    /// Zeroes both rings, as a driver does after a reset.
    pub fn clear(&self) {
        let end = self.used + 6 + 8 * u64::from(self.size);
        let len = (end - self.avail) as usize;
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(self.avail))
            .unwrap();
    }

    /// A ready queue on these rings.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        queue.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    pub fn set_desc(&self, index: u16, desc: Descriptor) {
        let at = self.desc + 16 * u64::from(index);
        self.mem
            .write_obj(RawDescriptor::from(desc), GuestAddress(at))
            .unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Puts `head` on the available ring (again).
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The (head, length) of used entry `i` (counted from the start, wrapping).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let head: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (head, len)
    }

    /// Where the device last asked to be notified (event index feature): the available index
    /// it stopped taking chains at.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

/// Waits (10 s at most) for `done`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::yield_now();
    }
}
