//! The guest controls a virtqueue's rings and descriptors and every byte of its requests:
//! parsing chains and serving virtio-blk requests must never panic, hang or touch memory
//! outside the guest's. The first byte picks the path: requests one at a time (qcow2's
//! in-order path), or the whole available batch grouped and merged (raw images), where every
//! chain must still get exactly one completion, in order.
//!
//! Chains in flight: the queue is a `DeviceQueue`, which records the chains the device holds.
//! On the batch path the device keeps some completions for a later round (as I/O threads
//! finish late) while the driver publishes more, from its script in guest memory; a head the
//! device holds must never be handed out again, the count in flight must match what the device
//! holds, and the device must never return a chain it does not hold.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio::device::{ActiveQueue, VirtioInterrupt};
use virtio::queue::{BrokenBy, DeviceQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 16;
const AVAIL: u64 = 0x100;
/// The driver's script (bytes free in the seeds' layout), one byte per batch round: the low
/// half says how many more avail entries it publishes before the round (what the ring holds
/// there, often heads the device still holds), the high half how many of the round's
/// completions the device keeps until the next round.
const SCRIPT: u64 = 0x1f0;
const ROUNDS: u64 = 4;

struct NoInterrupts;

impl VirtioInterrupt for NoInterrupts {
    fn notify_queue(&self, _index: u16) {}
    fn notify_config(&self) {}
    fn needs_reset(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    let mem = Arc::new(mem);
    // The input: a flags byte, then the guest's memory from address 0. The rings sit low so
    // that short inputs reach them: descriptor table at 0, avail ring at 0x100, used ring at
    // 0x200; buffers anywhere (fuzz/seeds/virtio_block has requests laid out this way).
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    let n = memory.len().min(MEMORY);
    if mem.write_slice(&memory[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_event_idx(flags & 1 == 1);
    queue.set_ready(true);
    let Ok(notify) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut queue = DeviceQueue::from(ActiveQueue {
        index: 0,
        queue,
        notify,
        watch: virtio::queue_watch::QueueWatch::detached(),
    });
    let disk: Box<dyn block::DiskImage> = Box::new(block::mem::MemoryImage::new(64 << 10));
    let executor = virtio::block::Executor::new(Arc::new(Mutex::new(disk)), false, [0; 20]);
    if flags & 2 == 2 {
        serve_in_rounds(&mut queue, &mem, &executor);
    } else {
        // The in-order path, as the device runs it.
        let _ = queue.process(&mem, &NoInterrupts, |chain| executor.serve(chain, &mem));
        if queue.broken_by().is_none() {
            assert_eq!(queue.in_flight(), 0, "every chain served was returned");
        }
    }
    assert_ne!(queue.broken_by(), Some(BrokenBy::Device));
    assert!(queue.in_flight() <= usize::from(QUEUE_SIZE));
});

/// The batch path over a few rounds, the device keeping some completions across rounds.
fn serve_in_rounds(queue: &mut DeviceQueue, mem: &Arc<Memory>, executor: &virtio::block::Executor) {
    let mut held: Vec<(u16, u32)> = Vec::new();
    for round in 0..ROUNDS {
        let script: u8 = mem.read_obj(GuestAddress(SCRIPT + round)).unwrap_or(0);
        if round > 0 {
            publish_more(mem, script & 0xf);
        }
        let Ok(chains) = queue.pop_all(mem.clone()) else {
            assert_eq!(queue.broken_by(), Some(BrokenBy::Driver));
            break;
        };
        let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
        for (i, head) in heads.iter().enumerate() {
            assert!(!heads[..i].contains(head), "head {head} handed out twice");
            assert!(
                !held.iter().any(|&(h, _)| h == *head),
                "head {head} handed out while held"
            );
        }
        assert_eq!(queue.in_flight(), held.len() + heads.len());
        let done = executor.serve_batch(chains, mem);
        let done_heads: Vec<u16> = done.iter().map(|&(head, _)| head).collect();
        assert_eq!(done_heads, heads, "one completion per chain, in order");
        let keep = usize::from(script >> 4).min(done.len());
        let (kept, now) = done.split_at(keep);
        for &(head, len) in now {
            if queue.add_used(mem, head, len).is_err() {
                assert_ne!(queue.broken_by(), Some(BrokenBy::Device));
            }
        }
        held.extend_from_slice(kept);
    }
    let broken_before = queue.broken_by().is_some();
    for (head, len) in held {
        let _ = queue.add_used(mem, head, len);
    }
    if !broken_before {
        assert_eq!(queue.in_flight(), 0, "every chain came back");
    }
}

/// The driver moves the avail index on by `count` entries, over whatever the ring holds there.
fn publish_more(mem: &Memory, count: u8) {
    let at = GuestAddress(AVAIL + 2);
    if let Ok(idx) = mem.read_obj::<u16>(at) {
        let _ = mem.write_obj(idx.wrapping_add(u16::from(count)), at);
    }
}
