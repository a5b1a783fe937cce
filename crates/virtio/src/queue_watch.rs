//! What the stall report shows of a virtqueue: how far the device has consumed the available
//! ring and filled the used ring, the chains it holds, and when the driver last notified the
//! queue and the device last interrupted the driver, next to the indexes the driver has
//! published in guest memory. A driver index ahead of the device with no recent notification
//! points at a lost kick; a used index ahead of what the driver read, with no recent interrupt,
//! at a lost interrupt.
//!
//! Threading: the transport (on vCPU threads) activates and resets a watch; the device's worker
//! records through its [`crate::queue::DeviceQueue`] (relaxed atomics, a clock read only per
//! notification or interrupt); the VMM's control loop reads a [`QueueWatch::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use api::diagnostics::VirtioQueueDiagnostics;
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// A time not recorded yet.
const NEVER: u64 = u64::MAX;

/// Where an active queue's rings are, to read the driver's side at report time.
#[derive(Debug)]
struct Rings {
    memory: Arc<GuestMemory>,
    avail: GuestAddress,
    used: GuestAddress,
}

/// One queue's positions and timestamps, shared by its transport, worker and the VMM.
#[derive(Debug)]
pub struct QueueWatch {
    origin: Instant,
    size: AtomicU64,
    next_avail: AtomicU64,
    next_used: AtomicU64,
    in_flight: AtomicU64,
    notifications: AtomicU64,
    interrupts: AtomicU64,
    /// Nanoseconds since `origin`, or [`NEVER`].
    last_notification: AtomicU64,
    last_interrupt: AtomicU64,
    rings: Mutex<Option<Rings>>,
}

impl Default for QueueWatch {
    fn default() -> Self {
        QueueWatch {
            origin: Instant::now(),
            size: AtomicU64::new(0),
            next_avail: AtomicU64::new(0),
            next_used: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            last_notification: AtomicU64::new(NEVER),
            last_interrupt: AtomicU64::new(NEVER),
            rings: Mutex::new(None),
        }
    }
}

impl QueueWatch {
    /// A watch nobody reads (tests, fuzzing, devices driven without a transport).
    pub fn detached() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    fn rings(&self) -> std::sync::MutexGuard<'_, Option<Rings>> {
        self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The driver started the queue: `size` entries, rings at `avail` and `used`.
    pub(crate) fn activate(
        &self,
        size: u16,
        memory: Arc<GuestMemory>,
        avail: GuestAddress,
        used: GuestAddress,
    ) {
        for value in [&self.next_avail, &self.next_used, &self.in_flight] {
            value.store(0, Ordering::Relaxed);
        }
        self.size.store(u64::from(size), Ordering::Relaxed);
        *self.rings() = Some(Rings {
            memory,
            avail,
            used,
        });
    }

    /// The device was reset: the queue is gone until the driver starts it again.
    pub(crate) fn deactivate(&self) {
        *self.rings() = None;
    }

    /// The device's positions after it took or returned a chain.
    pub(crate) fn positions(&self, next_avail: u16, next_used: u16, in_flight: usize) {
        self.next_avail
            .store(u64::from(next_avail), Ordering::Relaxed);
        self.next_used
            .store(u64::from(next_used), Ordering::Relaxed);
        self.in_flight.store(in_flight as u64, Ordering::Relaxed);
    }

    /// The driver's notification (ioeventfd) was seen by the worker.
    pub(crate) fn notified(&self) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        self.last_notification.store(self.now(), Ordering::Relaxed);
    }

    /// The device interrupted the driver for this queue.
    pub(crate) fn interrupted(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
        self.last_interrupt.store(self.now(), Ordering::Relaxed);
    }

    /// The queue as the report shows it; `device` names its device (`block0`), `index` is the
    /// queue's number.
    pub fn snapshot(&self, device: &str, index: u16) -> VirtioQueueDiagnostics {
        let now = self.now();
        let ago = |at: &AtomicU64| {
            let at = at.load(Ordering::Relaxed);
            (at != NEVER).then(|| now.saturating_sub(at) / 1_000_000)
        };
        let rings = self.rings();
        // The idx fields follow the 2-byte flags of each ring.
        let read_idx = |rings: &Rings, ring: GuestAddress| {
            rings
                .memory
                .read_obj::<u16>(GuestAddress(ring.0.wrapping_add(2)))
                .ok()
        };
        VirtioQueueDiagnostics {
            device: device.to_string(),
            queue: index,
            active: rings.is_some(),
            size: self.size.load(Ordering::Relaxed) as u16,
            next_avail: self.next_avail.load(Ordering::Relaxed) as u16,
            next_used: self.next_used.load(Ordering::Relaxed) as u16,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            driver_avail_idx: rings.as_ref().and_then(|r| read_idx(r, r.avail)),
            used_idx: rings.as_ref().and_then(|r| read_idx(r, r.used)),
            notifications: self.notifications.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            ms_since_notification: ago(&self.last_notification),
            ms_since_interrupt: ago(&self.last_interrupt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_shows_positions_times_and_the_driver_indexes() {
        let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap());
        let watch = QueueWatch::detached();
        let idle = watch.snapshot("block0", 0);
        assert!(!idle.active);
        assert_eq!(
            (idle.driver_avail_idx, idle.ms_since_notification),
            (None, None)
        );

        memory.write_obj(7u16, GuestAddress(0x2002)).unwrap(); // avail.idx
        memory.write_obj(5u16, GuestAddress(0x3002)).unwrap(); // used.idx
        watch.activate(16, memory, GuestAddress(0x2000), GuestAddress(0x3000));
        watch.positions(6, 5, 1);
        watch.notified();
        let queue = watch.snapshot("block0", 1);
        assert_eq!(
            (queue.device.as_str(), queue.queue, queue.active, queue.size),
            ("block0", 1, true, 16)
        );
        assert_eq!(
            (queue.next_avail, queue.next_used, queue.in_flight),
            (6, 5, 1)
        );
        assert_eq!((queue.driver_avail_idx, queue.used_idx), (Some(7), Some(5)));
        assert_eq!((queue.notifications, queue.interrupts), (1, 0));
        assert!(queue.ms_since_notification.unwrap() < 1000);
        assert_eq!(queue.ms_since_interrupt, None);

        watch.deactivate();
        assert!(!watch.snapshot("block0", 1).active);
    }
}
