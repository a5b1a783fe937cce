//! virtio-net (virtio 1.x section 5.1) on a TAP device: one receive and one transmit queue.
//!
//! Every packet carries the 12-byte virtio-net header, which the TAP device understands too, so
//! checksum offload and TSO pass through untouched; the device only fills in `num_buffers` on
//! receive. With mergeable receive buffers a packet may span several of the driver's buffers.
//! When the driver has no receive buffers left, the packet waits (the TAP is not read) until
//! the driver adds some.

pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use block::Slices;
use virtio_queue::DescriptorChain;

use crate::counters::Counters;
use crate::device::{read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::queue::{chain_buffers, DeviceQueue, QueueBroken};
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};

pub use tap::Tap;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// The virtio-net header with `num_buffers` (virtio 1.x always uses this layout).
pub const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
/// Receive buffer: a GSO frame is at most 64 KiB of IP datagram plus the Ethernet, VLAN and
/// virtio-net headers; twice that leaves room for any TAP quirk (a short buffer would
/// silently truncate a packet).
const MAX_PACKET: usize = 128 << 10;
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
}

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
    tap: Arc<Tap>,
    mac: [u8; 6],
    worker: Option<WorkerHandle>,
    counters: Arc<Counters>,
}

impl Net {
    pub fn new(tap: Arc<Tap>, mac: [u8; 6], counters: Arc<Counters>) -> Self {
        Net {
            tap,
            mac,
            worker: None,
            counters,
        }
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
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
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        use self::features::*;
        CSUM | GUEST_CSUM
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
        let mut rx = None;
        let mut tx = None;
        for q in activation.queues {
            match q.index {
                RX_QUEUE => rx = Some(q.into()),
                TX_QUEUE => tx = Some(q.into()),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::MissingQueues { needed: 2, got });
        };
        self.tap
            .set_offload(tap_offloads(activation.features))
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let worker = NetWorker {
            memory: activation.memory,
            rx,
            tx,
            interrupt: activation.interrupt,
            tap: self.tap.clone(),
            mergeable: activation.features & features::MRG_RXBUF != 0,
            packet: vec![0; MAX_PACKET],
            pending: None,
            rx_chains: Vec::new(),
            rx_room: 0,
            tap_watched: true,
            counters: self.counters.clone(),
        };
        self.worker =
            Some(WorkerHandle::spawn("virtio-net", worker).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

struct NetWorker {
    memory: Arc<GuestMemory>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: Arc<Tap>,
    mergeable: bool,
    /// Receive buffer for one packet from the TAP.
    packet: Vec<u8>,
    /// Length of a packet read from the TAP but not yet given to the guest.
    pending: Option<usize>,
    /// Receive chains taken for the pending packet, and their room in bytes.
    rx_chains: Vec<DescriptorChain<Arc<GuestMemory>>>,
    rx_room: usize,
    tap_watched: bool,
    counters: Arc<Counters>,
}

impl NetWorker {
    fn transmit(&mut self) -> Result<(), QueueBroken> {
        let mem = self.memory.clone();
        let tap = self.tap.clone();
        let c = self.counters.clone();
        self.tx.process(&mem, self.interrupt.as_ref(), |chain| {
            match chain_buffers(chain, &mem) {
                Ok(buffers) if buffers.writable.is_empty() => {
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
                    tracing::debug!("virtio-net: dropping a malformed transmit chain");
                    c.add(counter::ERRORS, 1);
                }
            }
            0
        })
    }

    /// Moves packets from the TAP into receive buffers while both last.
    fn receive(&mut self, poll: &Poll) -> io::Result<Result<(), QueueBroken>> {
        let mem = self.memory.clone();
        let mut delivered = false;
        loop {
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
                    delivered = true;
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
        if delivered {
            if let Err(broken) = self.rx.signal_used(&mem, self.interrupt.as_ref()) {
                return Ok(Err(broken));
            }
        }
        Ok(Ok(()))
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
        while self.rx_room < len {
            let Some(chain) = self.rx.pop(self.memory.clone())? else {
                return Ok(false);
            };
            let room = chain.clone().writer(mem).map_or(0, |w| w.available_bytes());
            if self.rx_chains.is_empty() && room < HEADER_LEN {
                // A buffer too small for even the header: give it back empty.
                self.rx.add_used(mem, chain.head_index(), 0)?;
                continue;
            }
            self.rx_room += room;
            self.rx_chains.push(chain);
            if !self.mergeable {
                break;
            }
        }
        let chains = std::mem::take(&mut self.rx_chains);
        let room = std::mem::replace(&mut self.rx_room, 0);
        if room < len {
            // Without mergeable buffers the packet must fit one buffer: drop it.
            tracing::debug!("virtio-net: dropping a {len}-byte packet that does not fit");
            self.counters.add(counter::RX_DROPPED, 1);
            for chain in chains {
                self.rx.add_used(mem, chain.head_index(), 0)?;
            }
            return Ok(true);
        }
        // Only as many buffers as the packet needs; the rest go back empty.
        let mut needed = 0;
        let mut covered = 0;
        for chain in &chains {
            if covered >= len {
                break;
            }
            covered += chain.clone().writer(mem).map_or(0, |w| w.available_bytes());
            needed += 1;
        }
        self.packet[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&(needed as u16).to_le_bytes());
        let mut offset = 0;
        for chain in chains {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) if offset < len => {
                    let n = writer.available_bytes().min(len - offset);
                    let done = match std::io::Write::write_all(
                        &mut writer,
                        &self.packet[offset..offset + n],
                    ) {
                        Ok(()) => n,
                        Err(_) => writer.bytes_written(),
                    };
                    offset += n;
                    done
                }
                _ => 0,
            };
            self.rx.add_used(mem, head, written as u32)?;
        }
        self.counters.add(counter::RX_PACKETS, 1);
        self.counters
            .add(counter::RX_BYTES, (len - HEADER_LEN) as u64);
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
                let _ = self.rx.notify.read();
                self.watch_tap(poll, true)?;
                self.receive(poll)?
            }
            _ => self.receive(poll)?,
        };
        if let Err(e) = result {
            tracing::warn!("virtio-net: {e}");
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
