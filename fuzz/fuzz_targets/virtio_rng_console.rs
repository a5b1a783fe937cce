//! The guest controls virtio-rng's and virtio-console's rings and buffers: filling entropy
//! requests and moving console output and input must never panic, hang, touch memory outside
//! the guest's or take more than a bounded amount per chain.
//!
//! Chains in flight: both devices return every chain they take before the step ends, over a
//! few rounds in which the driver publishes more (from its script in guest memory), and never
//! return one they do not hold.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio::device::{ActiveQueue, VirtioInterrupt};
use virtio::queue::{BrokenBy, DeviceQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 8;
/// The driver's script (bytes free in the layout), one byte per round after the first: how
/// many more entries it publishes on the rng ring (low half) and on the console's receive ring
/// (high half) before the round.
const SCRIPT: u64 = 0x1f0;
const ROUNDS: u64 = 3;

struct NoInterrupts;

impl VirtioInterrupt for NoInterrupts {
    fn notify_queue(&self, _index: u16) {}
    fn notify_config(&self) {}
    fn needs_reset(&self) {}
}

/// The driver moves the avail index of the queue at `base` on by `count` entries, over
/// whatever the ring holds there.
fn publish_more(mem: &Memory, base: u64, count: u8) {
    let at = GuestAddress(base + 0x82);
    if let Ok(idx) = mem.read_obj::<u16>(at) {
        let _ = mem.write_obj(idx.wrapping_add(u16::from(count)), at);
    }
}

/// A ready queue whose descriptor table, avail and used rings sit at `base`, +0x80, +0x100.
fn queue(base: u32, event_idx: bool) -> Option<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(base), Some(0));
    queue.set_avail_ring_address(Some(base + 0x80), Some(0));
    queue.set_used_ring_address(Some(base + 0x100), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(queue)
}

fuzz_target!(|data: &[u8]| {
    // The input: a flags byte, the count of console input bytes (x17), then guest memory
    // from 0: rng rings at 0, console receive rings at 0x200, transmit rings at 0x400.
    let [flags, input, memory @ ..] = data else {
        return;
    };
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    let n = memory.len().min(MEMORY);
    if mem.write_slice(&memory[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mem = Arc::new(mem);
    let event_idx = flags & 1 == 1;
    let Some(rng) = queue(0, event_idx) else {
        return;
    };
    let Ok(notify) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut rng = DeviceQueue::from(ActiveQueue {
        index: 0,
        queue: rng,
        notify,
        watch: virtio::queue_watch::QueueWatch::detached(),
    });
    let (Some(receive), Some(transmit)) = (queue(0x200, event_idx), queue(0x400, event_idx)) else {
        return;
    };
    let input = vec![b'k'; usize::from(*input) * 17];
    let Ok(mut console) = virtio::console::Harness::new(mem.clone(), [receive, transmit], &input)
    else {
        return;
    };
    for round in 0..ROUNDS {
        if round > 0 {
            let script: u8 = mem.read_obj(GuestAddress(SCRIPT + round)).unwrap_or(0);
            publish_more(&mem, 0, script & 0xf);
            publish_more(&mem, 0x200, script >> 4);
        }
        // The rng device's worker does exactly this.
        let _ = rng.process(&mem, &NoInterrupts, |chain| virtio::rng::fill(chain, &mem));
        assert_ne!(rng.broken_by(), Some(BrokenBy::Device));
        if rng.broken_by().is_none() {
            assert_eq!(rng.in_flight(), 0, "every entropy request returned");
        }
        console.transmit();
        console.receive();
        for (i, (in_flight, broken_by)) in console.queue_states().into_iter().enumerate() {
            assert_ne!(
                broken_by,
                Some(BrokenBy::Device),
                "console queue {i}: the device returned a chain it did not hold"
            );
            assert_eq!(in_flight, 0, "console queue {i}: every chain returned");
        }
    }
});
