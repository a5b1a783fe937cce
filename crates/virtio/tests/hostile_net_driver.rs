//! A hostile driver against virtio-net's receive queue (served step by step through
//! `net::harness`, the code the device's worker runs): after one good buffer, it publishes
//! 100 000 receive chains the device cannot write into (device-readable), reusing the same
//! heads. Each must come back at once, empty, rather than stay with the device; the VMM's memory
//! must stay put, and a packet must still land in the good buffer. Then the driver publishes
//! the good buffer again while the device holds it, which breaks the queue.
//!
//! A test binary of its own: it measures the process's resident memory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio::net::harness::Harness;
use virtio::net::Tap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;

mod common;

use common::{resident_bytes, touched_memory, Rings};

const QUEUE_SIZE: u16 = 256;
const CHAINS: u32 = 100_000;
const GOOD_BUFFER: u64 = 0x10_0000;
const GOOD_LEN: u32 = 4096;
/// What the flood may add to the process's resident memory.
const GROWTH_LIMIT: u64 = 2 << 20;

#[test]
fn receive_chains_without_writable_room_go_back_at_once() {
    let mem = touched_memory(4 << 20);
    let rx = Rings::new(&mem, 0, QUEUE_SIZE);
    let tx = Rings::new(&mem, 0x8000, 16);
    // Descriptor 0: a good 4 KiB buffer; the others: 64 device-readable bytes each.
    rx.set_desc(
        0,
        Descriptor::new(GOOD_BUFFER, GOOD_LEN, VRING_DESC_F_WRITE as u16, 0),
    );
    for i in 1..QUEUE_SIZE {
        rx.set_desc(i, Descriptor::new(0x20_0000 + u64::from(i) * 64, 64, 0, 0));
    }
    let (host, guest_end) = UnixDatagram::pair().unwrap();
    guest_end.set_nonblocking(true).unwrap();
    let tap = Arc::new(Tap::from_file(std::fs::File::from(
        std::os::fd::OwnedFd::from(guest_end),
    )));
    let queues = [rx.queue(false), tx.queue(false)];
    let mut net = Harness::new(Arc::new(mem.clone()), queues, None, tap, true).unwrap();

    rx.publish(0);
    assert!(net.receive());
    assert_eq!(rx.used_idx(), 0, "the good buffer waits for a packet");
    let before = resident_bytes();
    let mut returned = 0u32;
    for n in 0..CHAINS {
        let head = 1 + (n % u32::from(QUEUE_SIZE - 1)) as u16;
        let used_before = rx.used_idx();
        rx.publish(head);
        assert!(net.receive(), "the queue works on");
        returned += u32::from(rx.used_idx().wrapping_sub(used_before));
    }
    let grown = resident_bytes().saturating_sub(before);
    assert_eq!(returned, CHAINS, "every read-only chain came back at once");
    assert!(
        grown < GROWTH_LIMIT,
        "{CHAINS} read-only chains grew the VMM by {grown} bytes"
    );
    // They came back empty, and the good buffer still takes a packet.
    let last = rx.used_idx().wrapping_sub(1);
    assert_eq!(rx.used_entry(last).1, 0);
    host.send(&[7u8; 1000]).unwrap();
    assert!(net.receive());
    assert_eq!(rx.used_idx(), last.wrapping_add(2));
    assert_eq!(rx.used_entry(last.wrapping_add(1)), (0, 1000));

    // The driver publishes the good buffer again, once returned (fine), and again while the
    // device holds it (the queue breaks).
    rx.publish(0);
    assert!(net.receive());
    rx.publish(0);
    assert!(
        !net.receive(),
        "a held chain published again breaks the queue"
    );
}
