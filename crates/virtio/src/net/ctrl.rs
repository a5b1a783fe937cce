//! The control virtqueue (virtio 1.x 5.1.6.5): commands from the driver. Ferro offers the
//! control queue only for multi-queue (`VIRTIO_NET_F_MQ`), so the one command it carries out
//! is choosing how many queue pairs carry traffic; every other class belongs to a feature
//! that was not negotiated and is answered `VIRTIO_NET_ERR`.
//!
//! Threading: served by its own worker thread, because the Linux driver busy-waits for each
//! answer; switching TAP queues on and off from there is safe (each is its own file).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::counters::Counters;
use crate::device::VirtioInterrupt;
use crate::queue::{chain_buffers, DeviceQueue};
use crate::worker::{Poll, Worker};
use crate::GuestMemory;

use super::{counter, Tap};

/// Command class of multi-queue control.
pub const CLASS_MQ: u8 = 4;
/// Sets the number of queue pairs in use (little-endian u16 argument).
pub const MQ_VQ_PAIRS_SET: u8 = 0;
/// Answers written into the command's last, device-writable byte.
pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;
/// The most command bytes read: MQ's command is 4; longer ones (MAC tables) are refused.
const MAX_COMMAND: usize = 64;

/// A command, decoded from the driver-readable bytes of a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    SetQueuePairs(u16),
    /// A class or command Ferro does not offer, or one whose argument is cut short.
    Unsupported {
        class: u8,
        command: u8,
    },
    /// Not even a class and a command.
    Malformed,
}

/// Decodes a command: class, command, then its argument.
pub fn parse(bytes: &[u8]) -> Command {
    let [class, command, argument @ ..] = bytes else {
        return Command::Malformed;
    };
    match (*class, *command, argument) {
        (CLASS_MQ, MQ_VQ_PAIRS_SET, [low, high, ..]) => {
            Command::SetQueuePairs(u16::from_le_bytes([*low, *high]))
        }
        (class, command, _) => Command::Unsupported { class, command },
    }
}

/// What a command asks of the device: the answer, and the number of queue pairs to use from
/// now on if it changes. `usable` is how many pairs the driver set up (1 to the maximum).
pub fn decide(command: &Command, usable: u16) -> (u8, Option<u16>) {
    match *command {
        Command::SetQueuePairs(pairs) if (1..=usable).contains(&pairs) => (ACK_OK, Some(pairs)),
        _ => (ACK_ERR, None),
    }
}

/// Switches TAP queues so only the first `pairs` take packets from the host.
pub fn use_queue_pairs(taps: &[Arc<Tap>], pairs: u16) -> Result<(), super::tap::TapError> {
    if taps.len() < 2 {
        return Ok(()); // a single-queue device has nothing to switch
    }
    // Attach before detaching, so the device never has no queue.
    for tap in &taps[..usize::from(pairs).min(taps.len())] {
        tap.set_queue_enabled(true)?;
    }
    for tap in taps.iter().skip(usize::from(pairs)) {
        tap.set_queue_enabled(false)?;
    }
    Ok(())
}

/// The control queue's worker.
pub(super) struct CtrlWorker {
    pub(super) memory: Arc<GuestMemory>,
    pub(super) queue: DeviceQueue,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) taps: Vec<Arc<Tap>>,
    /// Queue pairs the driver enabled, counted from pair 0 without a gap.
    pub(super) usable_pairs: u16,
    pub(super) counters: Arc<Counters>,
}

impl CtrlWorker {
    /// Serves every waiting command.
    pub(super) fn serve(&mut self) -> Result<(), crate::queue::QueueBroken> {
        let mem = self.memory.clone();
        let taps = self.taps.clone();
        let usable = self.usable_pairs;
        let counters = self.counters.clone();
        self.queue.process(&mem, self.interrupt.as_ref(), |chain| {
            let Ok(buffers) = chain_buffers(chain, &mem) else {
                counters.add(counter::ERRORS, 1);
                return 0;
            };
            let Some(ack) = buffers.writable.iter().find(|s| !s.is_empty()) else {
                counters.add(counter::ERRORS, 1);
                return 0; // nowhere to answer
            };
            let mut bytes = Vec::new();
            for slice in &buffers.readable {
                let room = MAX_COMMAND - bytes.len();
                let mut part = vec![0u8; slice.len().min(room)];
                slice.copy_to(&mut part);
                bytes.extend_from_slice(&part);
            }
            let command = parse(&bytes);
            let (mut answer, pairs) = decide(&command, usable);
            if let Some(pairs) = pairs {
                if let Err(e) = use_queue_pairs(&taps, pairs) {
                    tracing::warn!("virtio-net: cannot use {pairs} queue pairs: {e}");
                    answer = ACK_ERR;
                }
            } else {
                tracing::debug!("virtio-net: refused control command {command:?}");
            }
            ack.copy_from(&[answer]);
            1
        })
    }
}

impl Worker for CtrlWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![(self.queue.notify.as_raw_fd(), 0)]
    }

    fn handle(&mut self, _token: u64, _poll: &Poll) -> io::Result<()> {
        if let Err(e) = self.serve() {
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
    fn commands_are_decoded() {
        assert_eq!(parse(&[4, 0, 3, 0]), Command::SetQueuePairs(3));
        assert_eq!(parse(&[4, 0, 0, 1]), Command::SetQueuePairs(256));
        assert_eq!(
            parse(&[4, 0, 3]),
            Command::Unsupported {
                class: 4,
                command: 0
            },
            "argument cut short"
        );
        assert_eq!(
            parse(&[0, 0, 1]),
            Command::Unsupported {
                class: 0,
                command: 0
            },
            "receive mode class, not offered"
        );
        assert_eq!(parse(&[4]), Command::Malformed);
        assert_eq!(parse(&[]), Command::Malformed);
    }

    #[test]
    fn only_pairs_the_driver_set_up_are_accepted() {
        assert_eq!(decide(&Command::SetQueuePairs(1), 4), (ACK_OK, Some(1)));
        assert_eq!(decide(&Command::SetQueuePairs(4), 4), (ACK_OK, Some(4)));
        assert_eq!(decide(&Command::SetQueuePairs(5), 4), (ACK_ERR, None));
        assert_eq!(decide(&Command::SetQueuePairs(0), 4), (ACK_ERR, None));
        assert_eq!(decide(&Command::Malformed, 4), (ACK_ERR, None));
        let other = Command::Unsupported {
            class: 1,
            command: 1,
        };
        assert_eq!(decide(&other, 4), (ACK_ERR, None));
    }
}
