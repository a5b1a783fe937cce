//! Runs a virtio-net queue pair and control queue on the calling thread, one step at a time,
//! for fuzzing and tests: the device's workers run this same code on their threads, woken by
//! the guest's notifications.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{CtrlWorker, PairGate, PairSwitch};
use super::rx_buffers::RxBuffers;
use super::{new_counters, NetWorker, Tap, MAX_PACKET, PACKETS_PER_PASS, TOKEN_TAP};
use crate::device::{ActiveQueue, Silent, VirtioInterrupt};
use crate::queue::{BrokenBy, DeviceQueue};
use crate::worker::Poll;
use crate::GuestMemory;

/// A queue pair on `tap` (and a control queue), served when asked.
pub struct Harness {
    pair: NetWorker,
    ctrl: Option<CtrlWorker>,
    poll: Poll,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

fn device_queue(index: u16, queue: Queue) -> io::Result<DeviceQueue> {
    Ok(DeviceQueue::from(ActiveQueue {
        index,
        queue,
        notify: EventFd::new(libc::EFD_NONBLOCK)?,
        watch: crate::queue_watch::QueueWatch::detached(),
    }))
}

impl Harness {
    /// Queue 0 receives, queue 1 transmits, `ctrl` (queue 2) takes commands for up to one
    /// queue pair; `mergeable` as if VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub fn new(
        memory: Arc<GuestMemory>,
        [rx, tx]: [Queue; 2],
        ctrl: Option<Queue>,
        tap: Arc<Tap>,
        mergeable: bool,
    ) -> io::Result<Self> {
        let counters = new_counters();
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(Silent);
        let poll = Poll::new()?;
        poll.add(tap.as_raw_fd(), TOKEN_TAP)?;
        let gate = Arc::new(PairGate::new(true));
        let ctrl = match ctrl {
            Some(queue) => Some(CtrlWorker {
                memory: memory.clone(),
                queue: device_queue(2, queue)?,
                interrupt: interrupt.clone(),
                pairs: PairSwitch::new(vec![tap.clone()], vec![gate.clone()])
                    .map_err(io::Error::other)?,
                counters: counters.clone(),
            }),
            None => None,
        };
        let pair = NetWorker {
            memory,
            rx: device_queue(0, rx)?,
            tx: device_queue(1, tx)?,
            interrupt,
            tap,
            gate,
            packets_per_pass: PACKETS_PER_PASS,
            mergeable,
            packet: vec![0; MAX_PACKET],
            pending: None,
            rx_buffers: RxBuffers::default(),
            tap_watched: true,
            counters,
        };
        Ok(Harness { pair, ctrl, poll })
    }

    /// Sends every packet the guest queued for transmission. False once a queue broke.
    pub fn transmit(&mut self) -> bool {
        self.pair.transmit().is_ok()
    }

    /// Moves waiting packets from the TAP into receive buffers. False once a queue broke or
    /// the TAP failed.
    pub fn receive(&mut self) -> bool {
        matches!(self.pair.receive(&self.poll), Ok(Ok(())))
    }

    /// Answers every waiting control command. False once the queue broke or the device
    /// needs a reset.
    pub fn control(&mut self) -> bool {
        self.ctrl
            .as_mut()
            .is_none_or(|ctrl| matches!(ctrl.serve(), Ok(false)))
    }

    /// Per queue (receive, transmit, control): the chains the device holds, and whether the
    /// queue broke and by whose fault. Between steps, a queue that did not break holds only
    /// receive chains kept for packets.
    pub fn queue_states(&self) -> Vec<(usize, Option<BrokenBy>)> {
        [&self.pair.rx, &self.pair.tx]
            .into_iter()
            .chain(self.ctrl.as_ref().map(|ctrl| &ctrl.queue))
            .map(|q| (q.in_flight(), q.broken_by()))
            .collect()
    }

    /// The receive chains kept for packets to come.
    pub fn held_receive_chains(&self) -> usize {
        self.pair.rx_buffers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// The fuzz target's path, checked once by hand: a frame the guest queues reaches the
    /// host, one from the host lands in a receive buffer, and a command gets its answer.
    #[test]
    fn one_step_moves_packets_both_ways_and_answers_commands() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 8);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 8);
        let ctrl = MockSplitQueue::create(&mem, GuestAddress(0x2000), 8);
        let desc = |addr, len, flags, next| {
            RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
        };
        rx.add_desc_chains(&[desc(0x8_0000, 0x2_0000, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        mem.write_slice(&[7u8; 72], GuestAddress(0x9000)).unwrap();
        tx.build_multiple_desc_chains(&[
            desc(0x9000, 12, VRING_DESC_F_NEXT, 1),
            desc(0x900c, 60, 0, 0),
        ])
        .unwrap();
        mem.write_slice(&[4, 0, 1, 0], GuestAddress(0xa000))
            .unwrap();
        ctrl.build_multiple_desc_chains(&[
            desc(0xa000, 4, VRING_DESC_F_NEXT, 1),
            desc(0xa080, 1, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        let (host, guest_end) = UnixDatagram::pair().unwrap();
        guest_end.set_nonblocking(true).unwrap();
        let tap = Arc::new(Tap::from_file(std::fs::File::from(
            std::os::fd::OwnedFd::from(guest_end),
        )));
        let mut net = Harness::new(
            Arc::new(mem.clone()),
            [rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            Some(ctrl.create_queue().unwrap()),
            tap,
            true,
        )
        .unwrap();
        assert!(net.transmit());
        let mut got = [0u8; 200];
        assert_eq!(host.recv(&mut got).unwrap(), 72);
        host.send(&[9u8; 300]).unwrap();
        assert!(net.receive());
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 300);
        let mut received = [0u8; 300];
        mem.read_slice(&mut received, GuestAddress(0x8_0000))
            .unwrap();
        assert_eq!(received[12..], [9u8; 288], "the frame after the header");
        assert!(net.control());
        let answer: u8 = mem.read_obj(GuestAddress(0xa080)).unwrap();
        assert_eq!(answer, super::super::ctrl::ACK_OK);
    }

    /// A command in more descriptors than any driver uses is not walked to its end: no answer,
    /// and the chain comes back empty.
    #[test]
    fn a_command_in_too_many_descriptors_gets_no_answer() {
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        const TABLE: u64 = 0x4_0000;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let queues: Vec<_> = [0, 0x1000, 0x2000]
            .map(|at| MockSplitQueue::create(&mem, GuestAddress(at), 8))
            .into();
        // Class MQ, VQ_PAIRS_SET, 1 pair: then 63 empty descriptors, then the answer byte.
        mem.write_slice(&[4, 0, 1, 0], GuestAddress(0xa000))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(0xa080)).unwrap();
        let descs = std::iter::once((0xa000, 4, 0))
            .chain((0..63).map(|_| (0xa000, 0, 0)))
            .chain(std::iter::once((0xa080, 1, VRING_DESC_F_WRITE)));
        let count = descs.clone().count();
        for (i, (addr, len, flags)) in descs.enumerate() {
            let next = if i + 1 < count { VRING_DESC_F_NEXT } else { 0 };
            let desc = Descriptor::new(addr, len, (flags | next) as u16, i as u16 + 1);
            let at = GuestAddress(TABLE + 16 * i as u64);
            mem.write_obj(RawDescriptor::from(desc), at).unwrap();
        }
        let indirect = Descriptor::new(TABLE, 16 * count as u32, VRING_DESC_F_INDIRECT as u16, 0);
        queues[2]
            .add_desc_chains(&[RawDescriptor::from(indirect)], 0)
            .unwrap();
        let (_host, guest_end) = UnixDatagram::pair().unwrap();
        let tap = Arc::new(Tap::from_file(std::fs::File::from(
            std::os::fd::OwnedFd::from(guest_end),
        )));
        let mut net = Harness::new(
            Arc::new(mem.clone()),
            [
                queues[0].create_queue().unwrap(),
                queues[1].create_queue().unwrap(),
            ],
            Some(queues[2].create_queue().unwrap()),
            tap,
            true,
        )
        .unwrap();
        assert!(net.control());
        let answer: u8 = mem.read_obj(GuestAddress(0xa080)).unwrap();
        assert_eq!(answer, 0xff, "not answered");
        let used = queues[2].used().ring().ref_at(0).unwrap().load();
        assert_eq!((queues[2].used().idx().load(), used.len()), (1, 0));
    }
}
