//! A hostile driver against a running virtio-blk device (its worker and I/O threads, through
//! the device's public interface). While the disk holds every request, the driver publishes
//! the chains the device holds again and again, with a notification each time: 100 000 of
//! them. The device must ask for a reset instead of taking them, the VMM's memory must stay
//! put, each chain the device took must come back exactly once, another device must go on
//! working, and after a reset the device must serve the same chains again.
//!
//! A test binary of its own: it measures the process's resident memory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use block::{Buffers, ConcurrentIo, DiskImage};
use virtio::block::{request_type, Block};
use virtio::device::{Activation, ActiveQueue, VirtioDevice, VirtioInterrupt};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

mod common;

use common::{resident_bytes, touched_memory, wait_until, Memory, Rings};

const QUEUE_SIZE: u16 = 64;
/// Requests on the queue, three descriptors each: heads 0, 3, 6, ...
const REQUESTS: u16 = 16;
/// Each request reads 128 KiB, so none is served on the worker itself (all go to I/O threads).
const READ_LEN: u32 = 128 << 10;
const NOTIFICATIONS: u32 = 100_000;
/// What the flood may add to the process's resident memory.
const GROWTH_LIMIT: u64 = 2 << 20;

/// Holds every disk request until opened.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Opens the gate when dropped: a failed assertion must not leave the device's reset (in its
/// drop) waiting for requests the gate holds.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A 1 MiB disk whose reads and writes (on I/O threads) wait at the gate, then do nothing.
struct GatedDisk(Arc<Gate>);

impl ConcurrentIo for GatedDisk {
    fn read_at(&self, _offset: u64, _buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.0.pass();
        Ok(())
    }
    fn write_at(&self, _offset: u64, _buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.0.pass();
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl DiskImage for GatedDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        ConcurrentIo::read_at(self, offset, buffers)
    }
    fn write_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        ConcurrentIo::write_at(self, offset, buffers)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Ok(())
    }
    fn concurrent_io(&self) -> Option<Arc<dyn ConcurrentIo>> {
        Some(Arc::new(GatedDisk(self.0.clone())))
    }
}

/// Remembers whether the device asked for a reset.
#[derive(Default)]
struct Recorder {
    needs_reset: AtomicBool,
}

impl Recorder {
    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for Recorder {
    fn notify_queue(&self, _index: u16) {}
    fn notify_config(&self) {}
    fn needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// Writes [`REQUESTS`] 3-descriptor read requests of `len` bytes each into the table of
/// `rings` (request i: head 3i; header, data and status at their own addresses above `base`).
fn write_read_requests(mem: &Memory, rings: &Rings, base: u64, len: u32) {
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    for i in 0..REQUESTS {
        let n = u64::from(i);
        let (header, status) = (base + 0x1_0000 + n * 0x100, base + 0x2_0000 + n);
        let data = base + 0x10_0000 + n * u64::from(len);
        mem.write_obj(request_type::IN, GuestAddress(header))
            .unwrap();
        mem.write_obj(0u64, GuestAddress(header + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let head = 3 * i;
        rings.set_desc(head, Descriptor::new(header, 16, next, head + 1));
        rings.set_desc(head + 1, Descriptor::new(data, len, next | write, head + 2));
        rings.set_desc(head + 2, Descriptor::new(status, 1, write, 0));
    }
}

/// A queue on `rings` that uses event indices, and its notifier.
fn active_queue(rings: &Rings) -> (ActiveQueue, EventFd) {
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let active = ActiveQueue {
        index: 0,
        queue: rings.queue(true),
        notify: notify.try_clone().unwrap(),
        watch: virtio::queue_watch::QueueWatch::detached(),
    };
    (active, notify)
}

fn activate(device: &mut Block, mem: &Memory, queue: ActiveQueue, interrupt: Arc<Recorder>) {
    device
        .activate(Activation {
            memory: Arc::new(mem.clone()),
            features: virtio::block::features::FLUSH | virtio::features::RING_EVENT_IDX,
            queues: vec![queue],
            interrupt,
        })
        .unwrap();
}

/// The driver publishes `head`, notifies, and waits until the device took it (or asked for a
/// reset).
fn publish_and_notify(rings: &Rings, notify: &EventFd, recorder: &Recorder, head: u16) {
    rings.publish(head);
    notify.write(1).unwrap();
    let published = rings.avail_idx();
    wait_until("the device takes the chain", || {
        recorder.needs_reset() || rings.avail_event() == published
    });
}

/// The heads of the used ring, sorted.
fn used_heads(rings: &Rings) -> Vec<u32> {
    let mut heads: Vec<u32> = (0..rings.used_idx())
        .map(|i| rings.used_entry(i).0)
        .collect();
    heads.sort_unstable();
    heads
}

#[test]
fn chains_published_again_while_held_put_the_device_in_needs_reset_not_in_memory() {
    let mem = touched_memory(8 << 20);
    let rings = Rings::new(&mem, 0, QUEUE_SIZE);
    write_read_requests(&mem, &rings, 0, READ_LEN);
    let gate = Arc::new(Gate::default());
    let disk: Box<dyn DiskImage> = Box::new(GatedDisk(gate.clone()));
    let disk = Arc::new(Mutex::new(disk));
    let mut device = Block::new(disk, false, "", virtio::block::new_counters());
    let _open_on_failure = OpenOnDrop(gate.clone());
    let recorder = Arc::new(Recorder::default());
    let (queue, notify) = active_queue(&rings);
    activate(&mut device, &mem, queue, recorder.clone());

    // Every request is taken, and held by the disk.
    for i in 0..REQUESTS {
        publish_and_notify(&rings, &notify, &recorder, 3 * i);
    }
    assert!(!recorder.needs_reset(), "a well-behaved driver so far");
    let before = resident_bytes();
    // The flood: held chains published again, one notification each.
    for n in 0..NOTIFICATIONS {
        let head = 3 * (n % u32::from(REQUESTS)) as u16;
        publish_and_notify(&rings, &notify, &recorder, head);
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(recorder.needs_reset(), "the device asks for a reset");
    assert!(
        grown < GROWTH_LIMIT,
        "{NOTIFICATIONS} notifications grew the VMM by {grown} bytes"
    );

    // Another device (in-order path, its own worker) goes on serving.
    let other_rings = Rings::new(&mem, 0x40_0000, QUEUE_SIZE);
    write_read_requests(&mem, &other_rings, 0x40_0000, 512);
    let disk: Box<dyn DiskImage> = Box::new(block::mem::MemoryImage::new(1 << 20));
    let mut other = Block::new(
        Arc::new(Mutex::new(disk)),
        false,
        "",
        virtio::block::new_counters(),
    );
    let other_recorder = Arc::new(Recorder::default());
    let (queue, other_notify) = active_queue(&other_rings);
    activate(&mut other, &mem, queue, other_recorder.clone());
    publish_and_notify(&other_rings, &other_notify, &other_recorder, 0);
    wait_until("the other device answers", || other_rings.used_idx() == 1);
    let status: u8 = mem.read_obj(GuestAddress(0x40_0000 + 0x2_0000)).unwrap();
    assert_eq!(status, virtio::block::status::OK);
    assert!(!other_recorder.needs_reset());
    other.reset();

    // The disk lets the held requests go: each comes back exactly once, and nothing else.
    gate.open();
    wait_until("the held requests complete", || {
        rings.used_idx() >= REQUESTS
    });
    device.reset();
    let expected: Vec<u32> = (0..u32::from(REQUESTS)).map(|i| 3 * i).collect();
    assert_eq!(used_heads(&rings), expected);

    // After a reset the driver starts over with fresh rings and the same chains.
    rings.clear();
    let recorder = Arc::new(Recorder::default());
    let (queue, notify) = active_queue(&rings);
    activate(&mut device, &mem, queue, recorder.clone());
    for i in 0..REQUESTS {
        publish_and_notify(&rings, &notify, &recorder, 3 * i);
    }
    wait_until("the requests complete after the reset", || {
        rings.used_idx() == REQUESTS
    });
    assert!(!recorder.needs_reset());
    assert_eq!(used_heads(&rings), expected);
    device.reset();
}
