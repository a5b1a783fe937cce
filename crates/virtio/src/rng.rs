//! virtio-rng (entropy device, virtio 1.x section 5.4): fills the driver's buffers with bytes
//! from the host's getrandom, within a budget of bytes per period ([`budget`]) so a guest
//! asking without pause cannot keep a host core busy.
//!
//! Threading: one worker thread. When the budget is spent it stops watching the queue's
//! notifications and sleeps on a timer until the budget is filled again; requests wait in the
//! ring meanwhile.

pub mod budget;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

pub use budget::{EntropyLimit, MIN_REQUEST_COST};

use crate::counters::Counters;
use crate::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::queue::{DeviceQueue, QueueBroken};
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};
use budget::Budget;
use sandbox::ThreadKind;

const QUEUE_SIZE: u16 = 256;
/// Largest amount served per request; drivers ask for far less.
const MAX_REQUEST: usize = 64 << 10;

/// The device's counters (indexes into [`COUNTER_NAMES`]).
pub mod counter {
    pub const REQUESTS: usize = 0;
    pub const BYTES: usize = 1;
    /// Times the device waited for its budget to be filled again.
    pub const THROTTLED: usize = 2;
}

/// Names of the counters, in index order.
pub const COUNTER_NAMES: &[&str] = &["requests", "bytes", "throttled"];

/// Fresh counters for an entropy device.
pub fn new_counters() -> Arc<Counters> {
    Counters::new("rng", COUNTER_NAMES)
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    worker: Option<WorkerHandle>,
    counters: Arc<Counters>,
    limit: EntropyLimit,
}

impl Rng {
    pub fn new(counters: Arc<Counters>, limit: EntropyLimit) -> Self {
        Rng {
            worker: None,
            counters,
            limit,
        }
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_REFILL: u64 = 1;

struct RngWorker {
    memory: Arc<GuestMemory>,
    queue: DeviceQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    counters: Arc<Counters>,
    budget: Budget,
    /// Fires when the spent budget is filled again (non-blocking).
    refill: TimerFd,
    /// The budget is spent: notifications are not watched until `refill` fires.
    throttled: bool,
}

/// How a pass over the queue ended.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// The ring is empty; the driver will notify.
    Drained,
    /// The budget is spent; it is filled again after this long.
    OutOfBudget(Duration),
}

/// Fills the writable part of a chain with random bytes; returns how many were written.
/// Public for fuzzing: the device's worker calls it on every chain.
pub fn fill(chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
    fill_at_most(chain, mem, MAX_REQUEST)
}

/// [`fill`], writing at most `max` bytes.
fn fill_at_most(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    max: usize,
) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let len = writer.available_bytes().min(max);
    let mut buf = vec![0u8; len];
    if let Err(e) = host_sys::random::fill(&mut buf) {
        guest_log::guest_warn!("getrandom failed: {e}");
        return 0;
    }
    match writer.write_all(&buf) {
        Ok(()) => len as u32,
        Err(_) => writer.bytes_written() as u32,
    }
}

impl RngWorker {
    fn new(
        memory: Arc<GuestMemory>,
        queue: DeviceQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        counters: Arc<Counters>,
        limit: EntropyLimit,
    ) -> io::Result<Self> {
        let refill = TimerFd::new()?;
        host_sys::file::set_nonblocking(&refill)?;
        Ok(RngWorker {
            memory,
            queue,
            interrupt,
            counters,
            budget: Budget::new(limit, Instant::now()),
            refill,
            throttled: false,
        })
    }

    /// Serves chains while the budget at `now` lasts.
    fn serve(&mut self, now: Instant) -> Result<Served, QueueBroken> {
        let mem = self.memory.clone();
        let mut used_any = false;
        let served = loop {
            let available = self.budget.available(now);
            if available == 0 {
                // Only requests waiting make the device wait for its budget.
                let waiting =
                    self.queue.has_available(&mem)? || self.queue.wait_for_chains(&mem)?;
                break if waiting {
                    Served::OutOfBudget(self.budget.wait(now))
                } else {
                    Served::Drained
                };
            }
            let Some(chain) = self.queue.pop(&*mem)? else {
                if self.queue.wait_for_chains(&mem)? {
                    continue;
                }
                break Served::Drained;
            };
            let head = chain.head_index();
            let max = usize::try_from(available).unwrap_or(usize::MAX);
            let written = fill_at_most(chain, &mem, max.min(MAX_REQUEST));
            self.budget.charge(u64::from(written));
            self.counters.add(counter::REQUESTS, 1);
            self.counters.add(counter::BYTES, u64::from(written));
            self.queue.add_used(&mem, head, written)?;
            used_any = true;
        };
        if used_any {
            self.queue.signal_used(&mem, self.interrupt.as_ref())?;
        }
        Ok(served)
    }

    /// Sleeps until the budget is filled again, ignoring the driver's notifications meanwhile.
    fn throttle(&mut self, wait: Duration, poll: &Poll) -> io::Result<()> {
        // A zero duration would disarm the timer.
        self.refill
            .reset(wait.max(Duration::from_millis(1)), None)?;
        poll.watch(self.queue.notify.as_raw_fd(), TOKEN_QUEUE, false)?;
        self.throttled = true;
        self.counters.add(counter::THROTTLED, 1);
        Ok(())
    }
}

impl Worker for RngWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![
            (self.queue.notify.as_raw_fd(), TOKEN_QUEUE),
            (self.refill.as_raw_fd(), TOKEN_REFILL),
        ]
    }

    fn handle(&mut self, token: u64, poll: &Poll) -> io::Result<()> {
        match token {
            TOKEN_REFILL => {
                let _ = self.refill.wait(); // non-blocking: clears the expiry
                if !self.throttled {
                    return Ok(());
                }
                self.throttled = false;
                poll.watch(self.queue.notify.as_raw_fd(), TOKEN_QUEUE, true)?;
            }
            // A notification reported with the timer's in one batch, after the throttle.
            _ if self.throttled => return Ok(()),
            _ => {}
        }
        self.queue.clear_notification();
        match self.serve(Instant::now()) {
            Ok(Served::Drained) => Ok(()),
            Ok(Served::OutOfBudget(wait)) => self.throttle(wait, poll),
            Err(e) => {
                guest_log::guest_warn!("virtio-rng: {e}");
                self.interrupt.needs_reset();
                Ok(())
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Some(queue) = activation.queues.into_iter().next() else {
            return Err(ActivateError::MissingQueues { needed: 1, got: 0 });
        };
        let worker = RngWorker::new(
            activation.memory,
            queue.into(),
            activation.interrupt,
            self.counters.clone(),
            self.limit,
        )
        .map_err(ActivateError::Worker)?;
        self.worker =
            Some(WorkerHandle::spawn(ThreadKind::Rng, worker).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

#[cfg(test)]
mod tests;
