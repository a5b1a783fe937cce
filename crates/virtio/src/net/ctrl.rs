//! The control virtqueue (virtio 1.x 5.1.6.5): commands from the driver. Ferro offers the
//! control queue only for multi-queue (`VIRTIO_NET_F_MQ`), so the one command it carries out
//! is choosing how many queue pairs carry traffic; every other class belongs to a feature
//! that was not negotiated and is answered `VIRTIO_NET_ERR`.
//!
//! Threading: served by its own worker thread, because the Linux driver busy-waits for each
//! answer; switching TAP queues on and off from there is safe (each is its own file).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::counters::Counters;
use crate::device::VirtioInterrupt;
use crate::queue::{chain_buffers_limited, DeviceQueue};
use crate::worker::{Poll, Worker};
use crate::GuestMemory;

use super::tap::TapError;
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
/// The most descriptors of one command (drivers use 3 or 4); a longer chain is not walked
/// further and gets no answer.
const MAX_COMMAND_DESCRIPTORS: usize = 64;

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

/// A host queue that can be switched on and off: a TAP queue, or a fake in tests.
pub trait HostQueue {
    fn set_enabled(&self, on: bool) -> Result<(), TapError>;
}

impl HostQueue for Arc<Tap> {
    fn set_enabled(&self, on: bool) -> Result<(), TapError> {
        self.set_queue_enabled(on)
    }
}

/// Switches host queues so only the first `pairs` take packets from the host.
pub fn use_queue_pairs<Q: HostQueue>(queues: &[Q], pairs: u16) -> Result<(), TapError> {
    if queues.len() < 2 {
        return Ok(()); // a single-queue device has nothing to switch
    }
    // Attach before detaching, so the device never has no queue.
    for queue in &queues[..usize::from(pairs).min(queues.len())] {
        queue.set_enabled(true)?;
    }
    for queue in queues.iter().skip(usize::from(pairs)) {
        queue.set_enabled(false)?;
    }
    Ok(())
}

/// Whether a pair's worker may place packets in its receive queue. The control worker
/// closes it while holding the lock the pair worker holds for a whole receive pass, so once
/// a command is answered no packet lands in a pair it took out of use (virtio 1.x 5.1.6.5.5).
#[derive(Debug)]
pub struct PairGate(Mutex<bool>);

impl PairGate {
    pub fn new(open: bool) -> Self {
        PairGate(Mutex::new(open))
    }

    /// Holds the gate; the value says whether it is open.
    pub fn hold(&self) -> MutexGuard<'_, bool> {
        // A poisoned gate only means a worker panicked while holding it; the bool is intact.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, open: bool) {
        *self.hold() = open;
    }
}

/// How a change of the pair count went.
#[derive(Debug, PartialEq, Eq)]
pub enum Switched {
    /// In use now (or already were).
    Done,
    /// The host refused; the previous pairs are in use again.
    Refused,
    /// The host refused, and so did going back: the device needs a reset.
    Broken,
}

/// The queue pairs in use: host queues and gates switched together, from pair 0 up.
#[derive(Debug)]
pub struct PairSwitch<Q> {
    queues: Vec<Q>,
    gates: Vec<Arc<PairGate>>,
    active: u16,
}

impl<Q: HostQueue> PairSwitch<Q> {
    /// Pair 0 alone in use: its gate open, the other host queues detached. `gates` has one
    /// per pair the driver set up; `queues` may have more (never used).
    pub fn new(queues: Vec<Q>, gates: Vec<Arc<PairGate>>) -> Result<Self, TapError> {
        use_queue_pairs(&queues, 1)?;
        for (i, gate) in gates.iter().enumerate() {
            gate.set(i == 0);
        }
        Ok(PairSwitch {
            queues,
            gates,
            active: 1,
        })
    }

    /// Pairs the driver set up: the most it may ask for.
    pub fn usable(&self) -> u16 {
        self.gates.len() as u16
    }

    pub fn active(&self) -> u16 {
        self.active
    }

    /// Puts the first `pairs` in use (1 to [`Self::usable`]); a repeat touches nothing.
    pub fn set(&mut self, pairs: u16) -> Switched {
        if pairs == self.active {
            return Switched::Done;
        }
        let previous = self.active;
        let changing = pairs.min(previous)..pairs.max(previous);
        // Gates open before their host queues attach, and close after theirs detach. Only
        // the changing pairs' gates are taken, so a busy pair that stays in use does not
        // hold up the answer (the driver busy-waits for it).
        if pairs > previous {
            self.set_gates(changing.clone(), pairs);
        }
        let outcome = match use_queue_pairs(&self.queues, pairs) {
            Ok(()) => {
                self.active = pairs;
                Switched::Done
            }
            Err(e) => {
                guest_log::guest_warn!("virtio-net: cannot use {pairs} queue pairs: {e}");
                match use_queue_pairs(&self.queues, previous) {
                    Ok(()) => Switched::Refused,
                    Err(e) => {
                        guest_log::guest_warn!(
                            "virtio-net: cannot go back to {previous} pairs: {e}"
                        );
                        Switched::Broken
                    }
                }
            }
        };
        self.set_gates(changing, self.active);
        outcome
    }

    /// Sets the gates of `pairs` (indexes): open below `open_below`, closed from it up.
    fn set_gates(&self, pairs: std::ops::Range<u16>, open_below: u16) {
        for i in pairs {
            if let Some(gate) = self.gates.get(usize::from(i)) {
                gate.set(i < open_below);
            }
        }
    }
}

/// The control queue's worker.
pub(super) struct CtrlWorker {
    pub(super) memory: Arc<GuestMemory>,
    pub(super) queue: DeviceQueue,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) pairs: PairSwitch<Arc<Tap>>,
    pub(super) counters: Arc<Counters>,
}

impl CtrlWorker {
    /// Serves every waiting command; true if one left the device needing a reset.
    pub(super) fn serve(&mut self) -> Result<bool, crate::queue::QueueBroken> {
        let mem = self.memory.clone();
        let counters = self.counters.clone();
        let pairs = &mut self.pairs;
        let mut broken = false;
        self.queue.process(&mem, self.interrupt.as_ref(), |chain| {
            let Ok(buffers) = chain_buffers_limited(chain, &mem, MAX_COMMAND_DESCRIPTORS) else {
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
            let answer = match decide(&command, pairs.usable()) {
                (_, Some(wanted)) => match pairs.set(wanted) {
                    Switched::Done => ACK_OK,
                    Switched::Refused => ACK_ERR,
                    Switched::Broken => {
                        broken = true;
                        ACK_ERR
                    }
                },
                (answer, None) => {
                    guest_log::guest_debug!("virtio-net: refused control command {command:?}");
                    answer
                }
            };
            ack.copy_from(&[answer]);
            1
        })?;
        Ok(broken)
    }
}

impl Worker for CtrlWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![(self.queue.notify.as_raw_fd(), 0)]
    }

    fn handle(&mut self, _token: u64, _poll: &Poll) -> io::Result<()> {
        match self.serve() {
            Ok(false) => {}
            Ok(true) => self.interrupt.needs_reset(),
            Err(e) => {
                guest_log::guest_warn!("virtio-net: {e}");
                self.interrupt.needs_reset();
            }
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

    /// A host queue that records its switches and refuses the ones told to fail.
    #[derive(Clone)]
    struct FakeQueue {
        index: usize,
        log: Arc<Mutex<Vec<(usize, bool)>>>,
        refuse: Arc<Mutex<Vec<(usize, bool)>>>,
    }

    impl HostQueue for FakeQueue {
        fn set_enabled(&self, on: bool) -> Result<(), TapError> {
            if self.refuse.lock().unwrap().contains(&(self.index, on)) {
                return Err(TapError::NotTap("fake".into()));
            }
            self.log.lock().unwrap().push((self.index, on));
            Ok(())
        }
    }

    struct Fixture {
        switch: PairSwitch<FakeQueue>,
        gates: Vec<Arc<PairGate>>,
        log: Arc<Mutex<Vec<(usize, bool)>>>,
        refuse: Arc<Mutex<Vec<(usize, bool)>>>,
    }

    impl Fixture {
        /// `queues` host queues, of which the driver set up `usable` pairs.
        fn new(queues: usize, usable: usize) -> Self {
            let log = Arc::new(Mutex::new(Vec::new()));
            let refuse = Arc::new(Mutex::new(Vec::new()));
            let fakes = (0..queues)
                .map(|index| FakeQueue {
                    index,
                    log: log.clone(),
                    refuse: refuse.clone(),
                })
                .collect();
            let gates: Vec<_> = (0..usable).map(|_| Arc::new(PairGate::new(true))).collect();
            let switch = PairSwitch::new(fakes, gates.clone()).unwrap();
            Fixture {
                switch,
                gates,
                log,
                refuse,
            }
        }

        /// The switches made since the last call.
        fn switches(&self) -> Vec<(usize, bool)> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }

        fn open_gates(&self) -> Vec<bool> {
            self.gates.iter().map(|g| *g.hold()).collect()
        }
    }

    #[test]
    fn only_the_queues_between_the_old_and_new_count_switch() {
        let mut f = Fixture::new(4, 4);
        assert_eq!(f.switch.active(), 1);
        assert_eq!(f.open_gates(), [true, false, false, false]);
        f.switches();
        assert_eq!(f.switch.set(1), Switched::Done);
        assert_eq!(f.switches(), [], "a repeat makes no host call");
        assert_eq!(f.switch.set(3), Switched::Done);
        assert_eq!(f.open_gates(), [true, true, true, false]);
        assert_eq!(f.switch.set(2), Switched::Done);
        assert_eq!(f.switch.active(), 2);
        assert_eq!(f.open_gates(), [true, true, false, false]);
        // use_queue_pairs asks every queue; the fakes log each ask, Tap skips the no-ops.
        let calls = f.switches();
        assert!(calls.contains(&(2, true)) && calls.contains(&(2, false)));
    }

    #[test]
    fn a_switch_takes_only_the_gates_of_the_pairs_that_change() {
        let Fixture {
            mut switch, gates, ..
        } = Fixture::new(4, 4);
        assert_eq!(switch.set(2), Switched::Done);
        // Pairs 0 and 1 stay in use: a receive pass holding their gates must not hold up
        // the switch from 2 to 4 and back.
        let _busy = [gates[0].hold(), gates[1].hold()];
        let (answered, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcomes = [switch.set(4), switch.set(2)];
            let _ = answered.send(outcomes);
        });
        let outcomes = answers
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the switch waited for a gate of a pair that stays in use");
        assert_eq!(outcomes, [Switched::Done, Switched::Done]);
        assert!(!*gates[2].hold() && !*gates[3].hold());
    }

    #[test]
    fn a_refused_switch_goes_back_to_the_pairs_in_use() {
        let mut f = Fixture::new(4, 4);
        assert_eq!(f.switch.set(2), Switched::Done);
        f.refuse.lock().unwrap().push((3, true));
        assert_eq!(f.switch.set(4), Switched::Refused);
        assert_eq!(f.switch.active(), 2);
        assert_eq!(f.open_gates(), [true, true, false, false]);
        let calls = f.switches();
        assert_eq!(
            calls.last(),
            Some(&(3, false)),
            "queue 2, attached on the way up, is detached again: {calls:?}"
        );
        assert!(calls.ends_with(&[(2, false), (3, false)]), "{calls:?}");
    }

    #[test]
    fn a_switch_that_cannot_be_undone_breaks_the_device() {
        let mut f = Fixture::new(3, 3);
        f.refuse.lock().unwrap().extend([(2, true), (1, false)]);
        assert_eq!(f.switch.set(3), Switched::Broken);
        assert_eq!(f.switch.active(), 1);
        assert_eq!(
            f.open_gates(),
            [true, false, false],
            "only pair 0 may receive"
        );
    }

    #[test]
    fn a_closed_gate_waits_for_the_pass_that_holds_it() {
        let gate = Arc::new(PairGate::new(true));
        let held = gate.hold();
        let closer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.set(false))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!closer.is_finished(), "closing waits for the receive pass");
        assert!(*held);
        drop(held);
        closer.join().unwrap();
        assert!(!*gate.hold());
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
