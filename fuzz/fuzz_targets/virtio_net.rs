//! The guest controls virtio-net's receive, transmit and control rings and every byte of
//! their buffers; the host sends packets of any length. Transmitting, receiving and answering
//! commands must never panic, hang or touch memory outside the guest's.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio::net::harness::Harness;
use virtio::net::Tap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 8;

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
    let Ok(mut net) = Harness::new(Arc::new(mem), [rx, tx], Some(ctrl), tap, mergeable) else {
        return;
    };
    // Packets from the host: 0 to 64 KiB, the shortest below the virtio-net header.
    for len in [*first, *second] {
        let _ = host.send(&vec![0x5a; usize::from(len) * 257]);
    }
    net.transmit();
    net.receive();
    net.control();
    // Whatever the guest sent reaches the host side whole or not at all.
    let mut buf = vec![0u8; 256 << 10];
    while host.recv(&mut buf).is_ok() {}
});
