//! virtio-net (virtio 1.x section 5.1) on a TAP device: one receive and one transmit queue per
//! queue pair. With several pairs (`VIRTIO_NET_F_MQ`, on a multi-queue TAP) each pair has its
//! own TAP queue and worker thread, and the driver picks how many pairs carry traffic through
//! the control queue ([`ctrl`]); until it does, only pair 0 does. The host kernel steers a
//! flow's packets to the TAP queue its last packet from the guest came through, so a
//! connection's transmit completions and incoming packets interrupt the vCPU that sends.
//!
//! Every packet carries the 12-byte virtio-net header, which the TAP device understands too, so
//! checksum offload and TSO pass through untouched; the device only fills in `num_buffers` on
//! receive. With mergeable receive buffers a packet may span several of the driver's buffers.
//! When the driver has given room for the largest packet, packets are read from the TAP straight
//! into its buffers (no copy in between); otherwise through a bounce buffer, so a packet is
//! never cut short. When the driver has no receive buffers left, the packet waits (the TAP is
//! not read) until the driver adds some. A receive chain the device cannot write into goes
//! back at once, empty; one too short for the virtio-net header makes the device need a reset.

pub mod ctrl;
pub mod harness;
#[cfg(test)]
mod mq_tests;
mod rx_buffers;
pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use block::Slices;
use virtio_queue::DescriptorChain;
use vm_memory::VolatileSlice;

use crate::counters::Counters;
use crate::device::{read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::queue::{chain_buffers, chain_buffers_limited, BrokenCause, DeviceQueue, QueueBroken};
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};

use rx_buffers::{RxBuffers, RxChain};
use sandbox::ThreadKind;
pub use tap::Tap;

const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with `num_buffers` (virtio 1.x always uses this layout).
pub const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
/// Receive buffer: a GSO frame is at most 64 KiB of IP datagram plus the Ethernet, VLAN and
/// virtio-net headers; twice that leaves room for any TAP quirk (a short buffer would
/// silently truncate a packet).
const MAX_PACKET: usize = 128 << 10;
/// Most buffers of one packet to transmit: the kernel's IOV_MAX, the most one write takes (a
/// packet in more could only be sent cut short).
const MAX_TX_SEGMENTS: usize = 1024;
/// Most packets placed in one receive pass.
const PACKETS_PER_PASS: usize = 256;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const LINK_UP: u16 = 1;

/// Feature bits (virtio 1.x 5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
}

/// Most queue pairs a device offers (the driver caps its use at its CPU count): the limit
/// `api` tells users about.
const MAX_QUEUE_PAIRS: usize = api::net::MAX_NET_QUEUE_PAIRS as usize;

/// The device's counters (indexes into [`COUNTER_NAMES`]); bytes are frame bytes, without
/// the virtio-net header.
pub mod counter {
    pub const RX_PACKETS: usize = 0;
    pub const RX_BYTES: usize = 1;
    pub const RX_DROPPED: usize = 2;
    pub const TX_PACKETS: usize = 3;
    pub const TX_BYTES: usize = 4;
    pub const TX_DROPPED: usize = 5;
    pub const ERRORS: usize = 6;
}

/// Names of the counters, in index order.
pub const COUNTER_NAMES: &[&str] = &[
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
    "errors",
];

/// Fresh counters for a network device.
pub fn new_counters() -> Arc<Counters> {
    Counters::new("net", COUNTER_NAMES)
}

/// A network device.
#[derive(Debug)]
pub struct Net {
    /// One TAP queue per queue pair.
    taps: Vec<Arc<Tap>>,
    mac: [u8; 6],
    /// Receive and transmit queue of each pair, then the control queue with several pairs.
    queue_sizes: Vec<u16>,
    /// The control queue's, stopped first (on reset, and on drop by field order) so no
    /// pair switch races the stop.
    ctrl_worker: Option<WorkerHandle>,
    /// One per pair in use by the driver.
    workers: Vec<WorkerHandle>,
    counters: Arc<Counters>,
}

/// Why a network device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("a network device needs at least one TAP queue")]
    NoTapQueue,
}

impl Net {
    /// A device with one queue pair per TAP queue in `taps` (at least one, at most
    /// [`MAX_QUEUE_PAIRS`]; extra queues are left unused).
    pub fn new(
        mut taps: Vec<Arc<Tap>>,
        mac: [u8; 6],
        counters: Arc<Counters>,
    ) -> Result<Self, NetError> {
        if taps.is_empty() {
            return Err(NetError::NoTapQueue);
        }
        taps.truncate(MAX_QUEUE_PAIRS);
        let pairs = taps.len();
        let queues = if pairs > 1 { 2 * pairs + 1 } else { 2 };
        Ok(Net {
            taps,
            mac,
            queue_sizes: vec![QUEUE_SIZE; queues],
            workers: Vec::new(),
            ctrl_worker: None,
            counters,
        })
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c
    }
}

/// TAP offloads matching the guest's receive features.
fn tap_offloads(features: u64) -> u32 {
    let mut flags = 0;
    if features & self::features::GUEST_CSUM != 0 {
        flags |= tap::offload::CSUM;
        if features & self::features::GUEST_TSO4 != 0 {
            flags |= tap::offload::TSO4;
        }
        if features & self::features::GUEST_TSO6 != 0 {
            flags |= tap::offload::TSO6;
        }
        if features & self::features::GUEST_ECN != 0 {
            flags |= tap::offload::TSO_ECN;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        use self::features::*;
        let multi_queue = if self.pairs() > 1 { MQ | CTRL_VQ } else { 0 };
        multi_queue
            | CSUM
            | GUEST_CSUM
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_ECN
            | HOST_TSO4
            | HOST_TSO6
            | HOST_ECN
            | MRG_RXBUF
            | STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let features = activation.features;
        // MQ is only meaningful with the control queue that picks the pairs (5.1.3.1).
        let both = features::MQ | features::CTRL_VQ;
        let multi_queue = features & both == both && self.pairs() > 1;
        let pairs = if multi_queue { self.pairs() } else { 1 };
        // The control queue follows the last pair the device offers (virtio 1.x 5.1.2).
        let ctrl_index = (2 * pairs) as u16;
        let mut queues: Vec<Option<DeviceQueue>> = (0..=2 * pairs).map(|_| None).collect();
        for q in activation.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.into());
            }
        }
        let ctrl = if features & features::CTRL_VQ != 0 {
            queues[usize::from(ctrl_index)].take()
        } else {
            None
        };
        // Pairs the driver enabled both queues of, from pair 0 up to the first gap.
        let mut pair_queues = Vec::new();
        for pair in queues.chunks_mut(2).take(pairs) {
            let (Some(rx), Some(tx)) = (pair[0].take(), pair[1].take()) else {
                break;
            };
            pair_queues.push((rx, tx));
        }
        if pair_queues.is_empty() {
            return Err(ActivateError::MissingQueues { needed: 2, got });
        }
        let backend = |e: tap::TapError| ActivateError::Backend(e.to_string());
        self.taps[0]
            .set_offload(tap_offloads(features))
            .map_err(backend)?;
        // Only pair 0 carries traffic until the driver asks for more.
        let gates: Vec<_> = (0..pair_queues.len())
            .map(|_| Arc::new(ctrl::PairGate::new(false)))
            .collect();
        let pair_switch =
            ctrl::PairSwitch::new(self.taps.clone(), gates.clone()).map_err(backend)?;
        let mut workers = Vec::new();
        for (((rx, tx), tap), gate) in pair_queues.into_iter().zip(&self.taps).zip(gates) {
            let worker = NetWorker {
                memory: activation.memory.clone(),
                rx,
                tx,
                interrupt: activation.interrupt.clone(),
                tap: tap.clone(),
                gate,
                packets_per_pass: PACKETS_PER_PASS,
                mergeable: features & features::MRG_RXBUF != 0,
                packet: vec![0; MAX_PACKET],
                pending: None,
                rx_buffers: RxBuffers::default(),
                tap_watched: true,
                counters: self.counters.clone(),
            };
            workers
                .push(WorkerHandle::spawn(ThreadKind::Net, worker).map_err(ActivateError::Worker)?);
        }
        if let Some(queue) = ctrl {
            let worker = ctrl::CtrlWorker {
                memory: activation.memory.clone(),
                queue,
                interrupt: activation.interrupt.clone(),
                pairs: pair_switch,
                counters: self.counters.clone(),
            };
            self.ctrl_worker = Some(
                WorkerHandle::spawn(ThreadKind::NetControl, worker)
                    .map_err(ActivateError::Worker)?,
            );
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut ctrl) = self.ctrl_worker.take() {
            ctrl.stop();
        }
        for mut worker in self.workers.drain(..) {
            worker.stop();
        }
    }
}

/// The guest buffers of a receive chain; none if it is malformed (a receive chain is all
/// device-writable).
fn receive_buffers<'m>(
    chain: &DescriptorChain<Arc<GuestMemory>>,
    mem: &'m GuestMemory,
) -> Vec<VolatileSlice<'m, ()>> {
    match chain_buffers(chain.clone(), mem) {
        Ok(buffers) if buffers.readable.is_empty() => buffers.writable,
        _ => Vec::new(),
    }
}

/// Writes `num_buffers` into the virtio-net header at the start of `buffers`; false if they
/// are too short to hold it.
fn write_num_buffers(buffers: &[VolatileSlice<'_, ()>], num_buffers: u16) -> bool {
    let mut header = Slices::new(buffers);
    if header.len() < HEADER_LEN as u64 || header.advance(NUM_BUFFERS_OFFSET).is_err() {
        return false;
    }
    let Ok(field) = header.take(2) else {
        return false;
    };
    let bytes = num_buffers.to_le_bytes();
    let mut at = 0;
    for slice in field {
        slice.copy_from(&bytes[at..at + slice.len()]);
        at += slice.len();
    }
    true
}

/// Why a packet could not be received.
enum ReceiveError {
    Tap(io::Error),
    Queue(QueueBroken),
}

struct NetWorker {
    memory: Arc<GuestMemory>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: Arc<Tap>,
    /// Open while the driver has this pair in use.
    gate: Arc<ctrl::PairGate>,
    /// Most packets placed in one receive pass ([`PACKETS_PER_PASS`]; fewer in tests).
    packets_per_pass: usize,
    mergeable: bool,
    /// Receive buffer for one packet from the TAP.
    packet: Vec<u8>,
    /// Length of a packet read from the TAP but not yet given to the guest.
    pending: Option<usize>,
    /// Receive chains taken from the driver and not used yet.
    rx_buffers: RxBuffers,
    tap_watched: bool,
    counters: Arc<Counters>,
}

impl NetWorker {
    fn transmit(&mut self) -> Result<(), QueueBroken> {
        let mem = self.memory.clone();
        let tap = self.tap.clone();
        let c = self.counters.clone();
        self.tx.process(&mem, self.interrupt.as_ref(), |chain| {
            match chain_buffers_limited(chain, &mem, MAX_TX_SEGMENTS) {
                Ok(buffers)
                    if buffers.writable.is_empty() && buffers.readable.len() <= MAX_TX_SEGMENTS =>
                {
                    let slices = Slices::new(&buffers.readable);
                    let len = slices.len();
                    if !(HEADER_LEN as u64..=MAX_PACKET as u64).contains(&len) {
                        c.add(counter::ERRORS, 1);
                    } else if slices.with_iovecs(|iov| tap.write_packet(iov)).is_ok() {
                        c.add(counter::TX_PACKETS, 1);
                        c.add(counter::TX_BYTES, len - HEADER_LEN as u64);
                    } else {
                        // A full TAP queue drops the packet, as a NIC would.
                        c.add(counter::TX_DROPPED, 1);
                    }
                }
                _ => {
                    guest_log::guest_debug!("virtio-net: dropping a malformed transmit chain");
                    c.add(counter::ERRORS, 1);
                }
            }
            0
        })
    }

    /// Moves packets from the TAP into receive buffers while both last; with the pair out of
    /// use, drops them instead.
    fn receive(&mut self, poll: &Poll) -> io::Result<Result<(), QueueBroken>> {
        let gate = self.gate.clone();
        let open = gate.hold();
        if !*open {
            self.drop_received()?;
            return Ok(Ok(()));
        }
        let mem = self.memory.clone();
        let mut delivered = 0;
        // A pass ends after a bounded number of packets, so the gate is let go now and then
        // (a busy pair would otherwise keep a control command waiting); the TAP, still
        // readable, wakes the worker again.
        while delivered < self.packets_per_pass {
            let direct = match self.pending {
                Some(_) => false,
                None => match self.room_for_any_packet(&mem) {
                    Ok(direct) => direct,
                    Err(broken) => return Ok(Err(broken)),
                },
            };
            if direct {
                match self.receive_direct(&mem) {
                    Ok(Some(())) => {
                        delivered += 1;
                        continue;
                    }
                    Ok(None) => break,
                    Err(ReceiveError::Tap(e)) => return Err(e),
                    Err(ReceiveError::Queue(broken)) => return Ok(Err(broken)),
                }
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.tap.read_packet(&mut self.packet)? {
                    Some(len) => len,
                    None => break,
                },
            };
            self.pending = Some(len);
            match self.place(&mem, len) {
                Ok(true) => {
                    self.pending = None;
                    delivered += 1;
                }
                Ok(false) => match self.rx.wait_for_chains(&mem) {
                    Ok(true) => continue, // buffers arrived meanwhile
                    Ok(false) => {
                        // No room: stop reading the TAP until the driver adds buffers.
                        self.watch_tap(poll, false)?;
                        break;
                    }
                    Err(broken) => return Ok(Err(broken)),
                },
                Err(broken) => return Ok(Err(broken)),
            }
        }
        if delivered > 0 {
            if let Err(broken) = self.rx.signal_used(&mem, self.interrupt.as_ref()) {
                return Ok(Err(broken));
            }
        }
        Ok(Ok(()))
    }

    /// Takes receive chains until they hold the largest packet; false if the driver has not
    /// given that much (without mergeable buffers, one chain must hold it).
    fn room_for_any_packet(&mut self, mem: &GuestMemory) -> Result<bool, QueueBroken> {
        while self.rx_buffers.room() < MAX_PACKET && (self.mergeable || self.rx_buffers.is_empty())
        {
            if !self.take_rx_chain(mem)? {
                return Ok(false);
            }
        }
        Ok(self.rx_buffers.room() >= MAX_PACKET)
    }

    /// Reads one packet from the TAP into the chains taken by [`Self::room_for_any_packet`]
    /// and returns the ones it filled; None when the TAP has nothing.
    fn receive_direct(&mut self, mem: &GuestMemory) -> Result<Option<()>, ReceiveError> {
        let Some(len) = self
            .rx_buffers
            .read_packet(&self.tap)
            .map_err(ReceiveError::Tap)?
        else {
            return Ok(None);
        };
        if len < HEADER_LEN {
            self.counters.add(counter::RX_DROPPED, 1);
            return Ok(Some(()));
        }
        let chains = self.rx_buffers.claim(len);
        if let Some(first) = chains.first() {
            let buffers = receive_buffers(&first.chain, mem);
            if !write_num_buffers(&buffers, chains.len() as u16) {
                // Every chain taken holds the header; one that no longer does (the driver
                // rewrote its descriptors) breaks the queue, not the worker.
                return Err(ReceiveError::Queue(self.rx.fail(BrokenCause::Buffer(
                    "a receive buffer is shorter than the virtio-net header",
                ))));
            }
        }
        let mut left = len;
        for rx in chains {
            let written = rx.room.min(left);
            left -= written;
            self.rx
                .add_used(mem, rx.chain.head_index(), written as u32)
                .map_err(ReceiveError::Queue)?;
        }
        self.count_received(len);
        Ok(Some(()))
    }

    fn watch_tap(&mut self, poll: &Poll, on: bool) -> io::Result<()> {
        if self.tap_watched != on {
            poll.watch(self.tap.as_raw_fd(), TOKEN_TAP, on)?;
            self.tap_watched = on;
        }
        Ok(())
    }

    /// Copies the pending packet into receive buffers; false if the driver has not given
    /// enough yet (the chains taken so far are kept for the next try, so waiting for more
    /// cannot miss the driver's notification).
    fn place(&mut self, mem: &GuestMemory, len: usize) -> Result<bool, QueueBroken> {
        if len < HEADER_LEN {
            self.counters.add(counter::RX_DROPPED, 1);
            return Ok(true); // not a packet: drop it
        }
        while self.rx_buffers.room() < len && (self.mergeable || self.rx_buffers.is_empty()) {
            if !self.take_rx_chain(mem)? {
                return Ok(false);
            }
        }
        if self.rx_buffers.room() < len {
            // Without mergeable buffers the packet must fit one buffer: drop it.
            guest_log::guest_debug!("virtio-net: dropping a {len}-byte packet that does not fit");
            self.counters.add(counter::RX_DROPPED, 1);
            for rx in self.rx_buffers.take_all() {
                self.rx.add_used(mem, rx.chain.head_index(), 0)?;
            }
            return Ok(true);
        }
        let chains = self.rx_buffers.claim(len);
        self.packet[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut offset = 0;
        for RxChain { chain, .. } in chains {
            let mut written = 0;
            for slice in receive_buffers(&chain, mem) {
                let n = slice.len().min(len - offset);
                slice.copy_from(&self.packet[offset..offset + n]);
                offset += n;
                written += n;
            }
            self.rx.add_used(mem, chain.head_index(), written as u32)?;
        }
        self.count_received(len);
        Ok(true)
    }

    /// Drops the pending packet and whatever the TAP queue holds (a detached queue holds
    /// nothing, but a level-triggered wakeup must not spin on one that does).
    fn drop_received(&mut self) -> io::Result<()> {
        let mut dropped = u64::from(self.pending.take().is_some());
        while self.tap.read_packet(&mut self.packet)?.is_some() {
            dropped += 1;
        }
        self.counters.add(counter::RX_DROPPED, dropped);
        Ok(())
    }

    fn count_received(&self, len: usize) {
        self.counters.add(counter::RX_PACKETS, 1);
        self.counters
            .add(counter::RX_BYTES, (len - HEADER_LEN) as u64);
    }

    /// Takes one more receive chain from the driver; false if it has none. A chain the device
    /// cannot write a byte into (device-readable or outside guest memory) goes back at once,
    /// empty, so the driver gets it back instead of the device holding it for ever. One with
    /// room for less than the virtio-net header breaks the queue: with mergeable buffers the
    /// spec requires every buffer to hold the header (5.1.6.3.1), and without them no packet
    /// fits.
    fn take_rx_chain(&mut self, mem: &GuestMemory) -> Result<bool, QueueBroken> {
        let Some(chain) = self.rx.pop(self.memory.clone())? else {
            return Ok(false);
        };
        let buffers = receive_buffers(&chain, mem);
        let room = block::slices_len(&buffers) as usize;
        if room == 0 {
            self.counters.add(counter::ERRORS, 1);
            self.rx.add_used(mem, chain.head_index(), 0)?;
        } else if room < HEADER_LEN {
            return Err(self.rx.fail(BrokenCause::Buffer(
                "a receive buffer is shorter than the virtio-net header",
            )));
        } else {
            self.rx_buffers.push(chain, &buffers);
        }
        Ok(true)
    }
}

impl Worker for NetWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![
            (self.rx.notify.as_raw_fd(), TOKEN_RX),
            (self.tx.notify.as_raw_fd(), TOKEN_TX),
            (self.tap.as_raw_fd(), TOKEN_TAP),
        ]
    }

    fn handle(&mut self, token: u64, poll: &Poll) -> io::Result<()> {
        let result = match token {
            TOKEN_TX => self.transmit(),
            TOKEN_RX => {
                self.rx.clear_notification();
                self.watch_tap(poll, true)?;
                self.receive(poll)?
            }
            _ => self.receive(poll)?,
        };
        if let Err(e) = result {
            guest_log::guest_warn!("virtio-net: {e}");
            self.interrupt.needs_reset();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_guest_features() {
        use self::features::*;
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(GUEST_TSO4), 0, "TSO needs checksum offload");
        assert_eq!(
            tap_offloads(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN),
            tap::offload::CSUM | tap::offload::TSO4 | tap::offload::TSO6 | tap::offload::TSO_ECN
        );
    }
}

/// The receive path against a datagram socket standing in for the TAP device.
#[cfg(test)]
mod receive_tests {
    use super::*;
    use crate::device::ActiveQueue;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const BUFFERS: u64 = 0x10_0000;
    const BUFFER_LEN: u32 = 4096;

    use crate::device::Silent as NoInterrupt;

    struct Setup {
        mem: Arc<GuestMemory>,
        worker: NetWorker,
        host: UnixDatagram,
        poll: Poll,
    }

    /// A worker whose receive queue holds `buffers` one-descriptor chains of 4 KiB.
    fn setup(buffers: u16, mergeable: bool) -> (Setup, MockSplitQueue<'static, GuestMemory>) {
        setup_chains(&vec![(BUFFER_LEN, true); usize::from(buffers)], mergeable)
    }

    /// A worker whose receive queue holds one one-descriptor chain per `(length, writable)`,
    /// their buffers one after another from BUFFERS, each on a 4 KiB boundary.
    fn setup_chains(
        chains: &[(u32, bool)],
        mergeable: bool,
    ) -> (Setup, MockSplitQueue<'static, GuestMemory>) {
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8_0000), 16);
        let mut at = BUFFERS;
        let descs: Vec<_> = chains
            .iter()
            .map(|&(len, writable)| {
                let flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                let desc = RawDescriptor::from(Descriptor::new(at, len, flags, 0));
                at += u64::from(len).next_multiple_of(4096);
                desc
            })
            .collect();
        rx.add_desc_chains(&descs, 0).unwrap();
        let (host, guest_side) = UnixDatagram::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let tap = Arc::new(Tap::from_file(std::fs::File::from(
            std::os::fd::OwnedFd::from(guest_side),
        )));
        let queue = |mock: &MockSplitQueue<GuestMemory>, index| {
            DeviceQueue::from(ActiveQueue {
                index,
                queue: mock.create_queue().unwrap(),
                notify: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                watch: crate::queue_watch::QueueWatch::detached(),
            })
        };
        let poll = Poll::new().unwrap();
        poll.add(tap.as_raw_fd(), TOKEN_TAP).unwrap();
        let memory = Arc::new(mem.clone());
        let worker = NetWorker {
            memory: memory.clone(),
            rx: queue(&rx, 0),
            tx: queue(&tx, 1),
            interrupt: Arc::new(NoInterrupt),
            tap,
            gate: Arc::new(ctrl::PairGate::new(true)),
            packets_per_pass: PACKETS_PER_PASS,
            mergeable,
            packet: vec![0; MAX_PACKET],
            pending: None,
            rx_buffers: RxBuffers::default(),
            tap_watched: true,
            counters: new_counters(),
        };
        let setup = Setup {
            mem: memory,
            worker,
            host,
            poll,
        };
        (setup, rx)
    }

    /// A packet of `len` bytes (header included) whose bytes count up from `seed`.
    fn packet(len: usize, seed: u8) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
        p[..HEADER_LEN].fill(0);
        p
    }

    /// The (head, length) pairs in the used ring.
    fn used(rx: &MockSplitQueue<GuestMemory>) -> Vec<(u32, u32)> {
        (0..rx.used().idx().load())
            .map(|i| {
                let e = rx.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// The bytes of the buffers from chain `first` on, `len` of them.
    fn guest_bytes(s: &Setup, first: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        s.mem
            .read_slice(
                &mut bytes,
                GuestAddress(BUFFERS + first * u64::from(BUFFER_LEN)),
            )
            .unwrap();
        bytes
    }

    #[test]
    fn packets_land_in_guest_buffers_without_a_bounce() {
        let (mut s, rx) = setup(64, true);
        let (small, large) = (packet(1000, 1), packet(10_000, 7));
        s.host.send(&small).unwrap();
        s.host.send(&large).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        // The large one needs three 4 KiB buffers (chains 1, 2 and 3).
        assert_eq!(used(&rx), vec![(0, 1000), (1, 4096), (2, 4096), (3, 1808)]);
        let mut expected = small.clone();
        expected[NUM_BUFFERS_OFFSET] = 1;
        assert_eq!(guest_bytes(&s, 0, 1000), expected);
        let mut expected = large.clone();
        expected[NUM_BUFFERS_OFFSET] = 3;
        assert_eq!(guest_bytes(&s, 1, 10_000), expected);
        assert!(
            s.worker.packet.iter().all(|&b| b == 0),
            "read straight into the guest"
        );
        // Buffers not needed yet stay with the device, as many as the largest packet needs.
        assert_eq!(s.worker.rx_buffers.len(), MAX_PACKET / BUFFER_LEN as usize);
    }

    #[test]
    fn without_room_for_the_largest_packet_it_goes_through_the_bounce_buffer() {
        let (mut s, rx) = setup(4, true);
        let p = packet(6000, 3);
        s.host.send(&p).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx), vec![(0, 4096), (1, 1904)]);
        let mut expected = p.clone();
        expected[NUM_BUFFERS_OFFSET] = 2;
        assert_eq!(guest_bytes(&s, 0, 6000), expected);
        // The two buffers it did not need are kept, not handed back empty.
        assert_eq!(s.worker.rx_buffers.len(), 2);
        // A packet larger than all the room left waits for more buffers.
        s.host.send(&packet(9000, 5)).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx).len(), 2);
        assert_eq!(s.worker.pending, Some(9000));
    }

    #[test]
    fn without_mergeable_buffers_a_packet_too_big_for_one_buffer_is_dropped() {
        let (mut s, rx) = setup(4, false);
        s.host.send(&packet(5000, 1)).unwrap();
        s.host.send(&packet(100, 9)).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx), vec![(0, 0), (1, 100)]);
        assert_eq!(s.worker.counters.get(counter::RX_DROPPED), 1);
    }

    #[test]
    fn a_receive_pass_ends_after_its_packet_budget_and_the_next_goes_on() {
        let (mut s, rx) = setup(64, true);
        s.worker.packets_per_pass = 2;
        for seed in 0..3 {
            s.host.send(&packet(100, seed)).unwrap();
        }
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx).len(), 2, "two packets in the first pass");
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx), vec![(0, 100), (1, 100), (2, 100)]);
    }

    /// Remembers whether the device asked for a reset.
    #[derive(Default)]
    struct ResetFlag(std::sync::atomic::AtomicBool);

    impl VirtioInterrupt for ResetFlag {
        fn notify_queue(&self, _index: u16) {}
        fn notify_config(&self) {}
        fn needs_reset(&self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn receive_chains_the_device_cannot_write_go_back_at_once_empty() {
        let chains = [(4096, true), (64, false), (64, false), (4096, true)];
        let (mut s, rx) = setup_chains(&chains, true);
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx), vec![(1, 0), (2, 0)]);
        assert_eq!(s.worker.rx_buffers.len(), 2, "the writable ones are kept");
        assert_eq!(s.worker.counters.get(counter::ERRORS), 2);
        s.host.send(&packet(5000, 3)).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(used(&rx), vec![(1, 0), (2, 0), (0, 4096), (3, 904)]);
    }

    #[test]
    fn a_receive_buffer_shorter_than_the_header_breaks_the_device_not_the_worker() {
        // Once the first packet took chain 0, the 5-byte chain would come first.
        let chains = [(100, true), (5, true), (MAX_PACKET as u32, true)];
        let (mut s, rx) = setup_chains(&chains, true);
        let reset = Arc::new(ResetFlag::default());
        s.worker.interrupt = reset.clone();
        s.host.send(&packet(100, 1)).unwrap();
        s.host.send(&packet(200, 2)).unwrap();
        assert!(
            s.worker.handle(TOKEN_TAP, &s.poll).is_ok(),
            "the worker thread goes on"
        );
        assert!(reset.0.load(std::sync::atomic::Ordering::SeqCst));
        // The broken queue is left alone; the worker still answers.
        assert!(s.worker.handle(TOKEN_RX, &s.poll).is_ok());
        assert!(s.worker.handle(TOKEN_TAP, &s.poll).is_ok());
        assert!(used(&rx).len() <= 1);
    }

    #[test]
    fn a_packet_in_more_buffers_than_one_write_takes_is_dropped_not_cut_short() {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
        const TABLE: u64 = 0x40_0000;
        let (mut s, _rx) = setup(0, true);
        let tx = MockSplitQueue::create(&*s.mem, GuestAddress(0x8_0000), 16);
        s.host.set_nonblocking(true).unwrap();
        let mut got = [0u8; 4096];
        // Packets of `buffers` 2-byte buffers, in an indirect table.
        for (head, buffers) in [(0u16, MAX_TX_SEGMENTS), (1, MAX_TX_SEGMENTS + 1)] {
            for i in 0..buffers {
                let next = if i + 1 < buffers {
                    VRING_DESC_F_NEXT
                } else {
                    0
                };
                let desc = Descriptor::new(0x50_0000 + 2 * i as u64, 2, next as u16, i as u16 + 1);
                let at = GuestAddress(TABLE + 16 * i as u64);
                s.mem.write_obj(RawDescriptor::from(desc), at).unwrap();
            }
            let len = 16 * buffers as u32;
            let indirect = Descriptor::new(TABLE, len, VRING_DESC_F_INDIRECT as u16, 0);
            tx.add_desc_chains(&[RawDescriptor::from(indirect)], head)
                .unwrap();
            s.worker.transmit().unwrap();
            let sent = s.host.recv(&mut got).ok();
            if buffers == MAX_TX_SEGMENTS {
                assert_eq!(sent, Some(2 * MAX_TX_SEGMENTS));
            } else {
                assert_eq!(sent, None, "nothing sent, not {sent:?} bytes");
            }
        }
        assert_eq!(tx.used().idx().load(), 2, "both chains are returned");
        assert_eq!(s.worker.counters.get(counter::TX_PACKETS), 1);
        assert_eq!(s.worker.counters.get(counter::ERRORS), 1);
    }

    #[test]
    fn a_pair_out_of_use_places_nothing_and_drops_what_waits() {
        let (mut s, rx) = setup(2, true);
        s.host.send(&packet(9000, 5)).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert_eq!(s.worker.pending, Some(9000), "too big for the room given");
        s.worker.gate = Arc::new(ctrl::PairGate::new(false));
        s.host.send(&packet(100, 1)).unwrap();
        s.worker.receive(&s.poll).unwrap().unwrap();
        assert!(used(&rx).is_empty());
        assert_eq!(s.worker.pending, None);
        assert_eq!(s.worker.counters.get(counter::RX_DROPPED), 2);
        assert_eq!(s.worker.counters.get(counter::RX_PACKETS), 0);
    }
}
