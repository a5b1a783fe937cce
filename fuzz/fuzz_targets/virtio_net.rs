//! The guest controls virtio-net's receive, transmit and control rings and every byte of
//! their buffers; the host sends packets of any length. Transmitting, receiving and answering
//! commands must never panic, hang or touch memory outside the guest's.
//!
//! Chains in flight: over a few rounds the driver publishes more (from its script in guest
//! memory: often heads the device still holds); between steps the device may hold receive
//! chains only, as many as it keeps for packets, and never returns a chain it does not hold.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio::net::harness::Harness;
use virtio::net::Tap;
use virtio::queue::BrokenBy;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 8;
/// The driver's script (bytes free in the seeds' layout), one byte per round after the first:
/// how many more entries it publishes on the receive ring (low half) and on the transmit ring
/// (high half) before the round.
const SCRIPT: u64 = 0x1f0;
const ROUNDS: u64 = 3;

/// A ready queue whose descriptor table, avail and used rings sit at `base`, +0x80, +0x100.
fn queue(base: u64, event_idx: bool) -> Option<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some(base as u32 + 0x80), Some(0));
    queue.set_used_ring_address(Some(base as u32 + 0x100), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(queue)
}

fuzz_target!(|data: &[u8]| {
    // The input: a flags byte, two bytes giving the lengths of two packets from the host,
    // then the guest's memory from address 0 (receive rings at 0, transmit at 0x200,
    // control at 0x400; buffers anywhere).
    let [flags, first, second, memory @ ..] = data else {
        return;
    };
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    let n = memory.len().min(MEMORY);
    if mem.write_slice(&memory[..n], GuestAddress(0)).is_err() {
        return;
    }
    let event_idx = flags & 1 == 1;
    let (Some(rx), Some(tx), Some(ctrl)) = (
        queue(0, event_idx),
        queue(0x200, event_idx),
        queue(0x400, event_idx),
    ) else {
        return;
    };
    let Ok((host, guest_end)) = UnixDatagram::pair() else {
        return;
    };
    if guest_end.set_nonblocking(true).is_err() || host.set_nonblocking(true).is_err() {
        return;
    }
    let tap = Arc::new(Tap::from_file(std::fs::File::from(
        std::os::fd::OwnedFd::from(guest_end),
    )));
    let mergeable = flags & 2 == 2;
    let mem = Arc::new(mem);
    let Ok(mut net) = Harness::new(mem.clone(), [rx, tx], Some(ctrl), tap, mergeable) else {
        return;
    };
    // Packets from the host: 0 to 64 KiB, the shortest below the virtio-net header.
    for len in [*first, *second] {
        let _ = host.send(&vec![0x5a; usize::from(len) * 257]);
    }
    let mut buf = vec![0u8; 256 << 10];
    for round in 0..ROUNDS {
        if round > 0 {
            let script: u8 = mem.read_obj(GuestAddress(SCRIPT + round)).unwrap_or(0);
            publish_more(&mem, 0, script & 0xf);
            publish_more(&mem, 0x200, script >> 4);
        }
        net.transmit();
        net.receive();
        net.control();
        check_in_flight(&net);
        // Whatever the guest sent reaches the host side whole or not at all.
        while host.recv(&mut buf).is_ok() {}
    }
});

/// Between steps the device holds receive chains only, those it keeps for packets (a queue the
/// driver broke may keep the chain it broke on).
fn check_in_flight(net: &Harness) {
    for (i, (in_flight, broken_by)) in net.queue_states().into_iter().enumerate() {
        assert_ne!(
            broken_by,
            Some(BrokenBy::Device),
            "queue {i}: the device returned a chain it did not hold"
        );
        assert!(in_flight <= usize::from(QUEUE_SIZE));
        let expected = if i == 0 { net.held_receive_chains() } else { 0 };
        if broken_by.is_none() {
            assert_eq!(in_flight, expected, "queue {i}");
        }
    }
}

/// The driver moves the avail index of the queue at `base` on by `count` entries, over
/// whatever the ring holds there.
fn publish_more(mem: &Memory, base: u64, count: u8) {
    let at = GuestAddress(base + 0x82);
    if let Ok(idx) = mem.read_obj::<u16>(at) {
        let _ = mem.write_obj(idx.wrapping_add(u16::from(count)), at);
    }
}
