//! Serving a virtqueue from a worker thread.
//!
//! [`DeviceQueue`] is one queue as a device's worker owns it. It keeps track of the chains the
//! device took from the driver and has not returned yet (virtio-queue does not): a driver that
//! publishes a head the device still holds, or one outside the descriptor table, breaks the
//! queue (the device then sets DEVICE_NEEDS_RESET), so a device never holds more than
//! queue-size chains and a guest cannot make it take the same buffers again and again. The
//! record is a fixed bitmap made with the queue, so it starts empty after every reset.
//!
//! Threading: a queue belongs to one worker; a device whose chains complete on other threads
//! (virtio-blk's I/O pool) keeps it behind a mutex.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory as _, Permissions, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActiveQueue, VirtioInterrupt};
use crate::queue_watch::QueueWatch;
use crate::GuestMemory;

/// The queue is unusable; the device must ask for a reset.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue {index} is broken")]
pub struct QueueBroken {
    pub index: u16,
    #[source]
    pub cause: BrokenCause,
}

/// What broke a queue.
#[derive(Debug, thiserror::Error)]
pub enum BrokenCause {
    #[error("its rings are outside guest memory or its indices are corrupt")]
    Ring(#[source] virtio_queue::Error),
    #[error("the driver published chain {0} again while the device still holds it")]
    HeadInFlight(u16),
    #[error("the driver published chain {head}, outside its {size}-entry descriptor table")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("the driver gave a buffer the device cannot use: {0}")]
    Buffer(&'static str),
    /// A device bug, never the driver's doing: fuzzing and tests check it never happens.
    #[error("the device returned chain {0}, which it does not hold")]
    NotInFlight(u16),
}

/// Whose fault broke a queue (see [`DeviceQueue::broken_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenBy {
    Driver,
    /// [`BrokenCause::NotInFlight`].
    Device,
}

/// The heads of the chains a device holds: one bit per descriptor table entry.
#[derive(Debug)]
struct InFlight {
    bits: Box<[u64]>,
    size: u16,
    count: usize,
}

impl InFlight {
    fn new(size: u16) -> Self {
        InFlight {
            bits: vec![0; usize::from(size).div_ceil(64)].into_boxed_slice(),
            size,
            count: 0,
        }
    }

    /// The word and bit of `head`, if it is a table entry.
    fn locate(&self, head: u16) -> Option<(usize, u64)> {
        (head < self.size).then(|| (usize::from(head) / 64, 1 << (head % 64)))
    }

    /// Records that the device took chain `head`.
    fn take(&mut self, head: u16) -> Result<(), BrokenCause> {
        let (word, bit) = self.locate(head).ok_or(BrokenCause::HeadOutOfRange {
            head,
            size: self.size,
        })?;
        if self.bits[word] & bit != 0 {
            return Err(BrokenCause::HeadInFlight(head));
        }
        self.bits[word] |= bit;
        self.count += 1;
        Ok(())
    }

    /// Records that the device returned chain `head`.
    fn release(&mut self, head: u16) -> Result<(), BrokenCause> {
        match self.locate(head) {
            Some((word, bit)) if self.bits[word] & bit != 0 => {
                self.bits[word] &= !bit;
                self.count -= 1;
                Ok(())
            }
            _ => Err(BrokenCause::NotInFlight(head)),
        }
    }
}

/// One queue as a device worker owns it.
#[derive(Debug)]
pub struct DeviceQueue {
    pub index: u16,
    pub queue: Queue,
    pub notify: EventFd,
    /// Set once the queue broke; a broken queue is not touched again until reset.
    broken: Option<BrokenBy>,
    in_flight: InFlight,
    watch: Arc<QueueWatch>,
}

impl From<ActiveQueue> for DeviceQueue {
    fn from(q: ActiveQueue) -> Self {
        DeviceQueue {
            in_flight: InFlight::new(q.queue.size()),
            index: q.index,
            queue: q.queue,
            notify: q.notify,
            broken: None,
            watch: q.watch,
        }
    }
}

impl DeviceQueue {
    /// Marks the queue broken by the rings' error `source`.
    fn broken(&mut self, source: virtio_queue::Error) -> QueueBroken {
        self.fail(BrokenCause::Ring(source))
    }

    /// Marks the queue broken: nothing is taken from it again until the device is reset.
    /// For devices that find a chain they cannot serve in a way the spec calls a driver error.
    pub fn fail(&mut self, cause: BrokenCause) -> QueueBroken {
        let by = match cause {
            BrokenCause::NotInFlight(_) => BrokenBy::Device,
            _ => BrokenBy::Driver,
        };
        // A device fault shows even after the driver broke the queue.
        if self.broken.is_none() || by == BrokenBy::Device {
            self.broken = Some(by);
        }
        QueueBroken {
            index: self.index,
            cause,
        }
    }

    /// Whether the queue broke, and whose fault it was.
    pub fn broken_by(&self) -> Option<BrokenBy> {
        self.broken
    }

    /// Chains taken from the driver and not returned yet (at most the queue size).
    pub fn in_flight(&self) -> usize {
        self.in_flight.count
    }

    /// Clears the driver's notification, noting it for the stall report if there was one.
    pub fn clear_notification(&self) {
        if self.notify.read().is_ok() {
            self.watch.notified();
        }
    }

    fn update_watch(&self) {
        self.watch.positions(
            self.queue.next_avail(),
            self.queue.next_used(),
            self.in_flight.count,
        );
    }

    /// Takes the next available chain, if any. `mem` is `&GuestMemory` for a chain used at
    /// once, or an `Arc` for one kept across events.
    pub fn pop<M>(&mut self, mem: M) -> Result<Option<DescriptorChain<M>>, QueueBroken>
    where
        M: Clone + std::ops::Deref<Target = GuestMemory>,
    {
        if self.broken.is_some() {
            return Ok(None);
        }
        let chain = match self.queue.iter(mem) {
            Ok(mut chains) => chains.next(),
            Err(e) => return Err(self.broken(e)),
        };
        if let Some(chain) = &chain {
            if let Err(cause) = self.in_flight.take(chain.head_index()) {
                return Err(self.fail(cause));
            }
            self.update_watch();
        }
        Ok(chain)
    }

    /// Takes every available chain, with the driver's notifications suppressed meanwhile and
    /// re-checked after re-enabling them (see [`DeviceQueue::process`]); clears the notifier.
    /// At most queue-size chains are in flight, so the list is bounded. If the queue breaks
    /// on the way, the chains taken by this call are dropped unserved (the device needs a reset
    /// anyway).
    pub fn pop_all<M>(&mut self, mem: M) -> Result<Vec<DescriptorChain<M>>, QueueBroken>
    where
        M: Clone + std::ops::Deref<Target = GuestMemory>,
    {
        self.clear_notification();
        let mut chains = Vec::new();
        if self.broken.is_some() {
            return Ok(chains);
        }
        loop {
            self.queue
                .disable_notification(&*mem)
                .map_err(|e| self.broken(e))?;
            while let Some(chain) = self.pop(mem.clone())? {
                chains.push(chain);
            }
            if !self
                .queue
                .enable_notification(&*mem)
                .map_err(|e| self.broken(e))?
            {
                return Ok(chains);
            }
        }
    }

    /// Returns chain `head` (taken by [`DeviceQueue::pop`]) to the driver with `len` bytes
    /// written into it.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueBroken> {
        if let Err(cause) = self.in_flight.release(head) {
            return Err(self.fail(cause));
        }
        self.queue
            .add_used(mem, head, len)
            .map_err(|e| self.broken(e))?;
        self.update_watch();
        Ok(())
    }

    /// The device ran out of chains: asks the driver to notify when it adds some. Returns true
    /// if chains arrived in the meantime (then the caller should pop again instead of waiting).
    /// Without this, a driver using event indices would never notify again. A broken queue
    /// has none to offer (its pops return nothing, so "arrived" would have the caller spin).
    pub fn wait_for_chains(&mut self, mem: &GuestMemory) -> Result<bool, QueueBroken> {
        if self.broken.is_some() {
            return Ok(false);
        }
        self.queue
            .enable_notification(mem)
            .map_err(|e| self.broken(e))
    }

    /// Whether chains are waiting.
    pub fn has_available(&self, mem: &GuestMemory) -> Result<bool, QueueBroken> {
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|source| QueueBroken {
                index: self.index,
                cause: BrokenCause::Ring(source),
            })?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Runs `process` on every available chain until the queue is empty, with the driver's
    /// notifications suppressed meanwhile (and re-checked after re-enabling them, so a chain
    /// added in between is not missed). `process` returns the bytes written into the chain.
    /// Interrupts the driver if it wants to know about the used buffers.
    pub fn process<F>(
        &mut self,
        mem: &GuestMemory,
        interrupt: &dyn VirtioInterrupt,
        mut process: F,
    ) -> Result<(), QueueBroken>
    where
        F: FnMut(DescriptorChain<&GuestMemory>) -> u32,
    {
        self.clear_notification();
        if self.broken.is_some() {
            return Ok(());
        }
        let mut used_any = false;
        loop {
            self.queue
                .disable_notification(mem)
                .map_err(|e| self.broken(e))?;
            while let Some(chain) = self.pop(mem)? {
                let head = chain.head_index();
                let len = process(chain);
                self.add_used(mem, head, len)?;
                used_any = true;
            }
            if !self
                .queue
                .enable_notification(mem)
                .map_err(|e| self.broken(e))?
            {
                break;
            }
        }
        if used_any {
            self.signal_used(mem, interrupt)?;
        }
        Ok(())
    }

    /// Interrupts the driver if it asked to hear about the buffers used so far.
    pub fn signal_used(
        &mut self,
        mem: &GuestMemory,
        interrupt: &dyn VirtioInterrupt,
    ) -> Result<(), QueueBroken> {
        if self
            .queue
            .needs_notification(mem)
            .map_err(|e| self.broken(e))?
        {
            self.watch.interrupted();
            interrupt.notify_queue(self.index);
        }
        Ok(())
    }
}

/// A chain's buffers: what the device may read, then what it may write.
#[derive(Debug, Default)]
pub struct ChainBuffers<'m> {
    pub readable: Vec<VolatileSlice<'m, ()>>,
    pub writable: Vec<VolatileSlice<'m, ()>>,
}

/// Why a chain's buffers cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    #[error("the chain has more than {0} descriptors")]
    TooLong(usize),
}

/// Splits a chain into guest-memory slices, checking the order of its descriptors.
pub fn chain_buffers<'m, M>(
    chain: DescriptorChain<M>,
    mem: &'m GuestMemory,
) -> Result<ChainBuffers<'m>, ChainError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    chain_buffers_limited(chain, mem, usize::MAX)
}

/// [`chain_buffers`] for a chain of at most `max_descriptors` descriptors: the walk stops at
/// the first one past it, so a longer chain costs no more than that many.
pub fn chain_buffers_limited<'m, M>(
    chain: DescriptorChain<M>,
    mem: &'m GuestMemory,
    max_descriptors: usize,
) -> Result<ChainBuffers<'m>, ChainError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut buffers = ChainBuffers::default();
    for (count, desc) in chain.enumerate() {
        if count >= max_descriptors {
            return Err(ChainError::TooLong(max_descriptors));
        }
        let writable = desc.is_write_only();
        if !writable && !buffers.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let slices = mem
            .get_slices(desc.addr(), desc.len() as usize, access)
            .map_err(|_| ChainError::BadAddress)?;
        for slice in slices {
            let slice = slice.map_err(|_| ChainError::BadAddress)?;
            if writable {
                buffers.writable.push(slice);
            } else {
                buffers.readable.push(slice);
            }
        }
    }
    Ok(buffers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn device_queue(index: u16, queue: Queue) -> DeviceQueue {
        DeviceQueue::from(ActiveQueue {
            index,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            watch: QueueWatch::detached(),
        })
    }

    /// A 16-entry queue whose descriptors 0..16 are one-buffer chains; the first `published`
    /// of them are on the available ring. (The used ring is moved out of the mock's avail
    /// ring, whose second half it overlaps.)
    fn queue_of_buffers(
        mem: &GuestMemory,
        published: u16,
    ) -> (MockSplitQueue<'_, GuestMemory>, DeviceQueue) {
        let mock = MockSplitQueue::new(mem, 16);
        let buffers: Vec<_> = (0..16u64)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 0x100, 0x100, 2, 0)))
            .collect();
        mock.add_desc_chains(&buffers, 0).unwrap();
        mock.avail().idx().store(published);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_used_ring_address(Some(0x8000), Some(0));
        (mock, device_queue(0, queue))
    }

    /// The driver puts `head` on the available ring of a 16-entry queue (again).
    fn publish(mock: &MockSplitQueue<GuestMemory>, head: u16) {
        let idx = mock.avail().idx().load();
        let slot = mock.avail().ring().ref_at(usize::from(idx % 16)).unwrap();
        slot.store(head);
        mock.avail().idx().store(idx.wrapping_add(1));
    }

    #[test]
    fn a_head_the_device_holds_cannot_be_published_again_a_returned_one_can() {
        let mem = memory();
        let (mock, mut dq) = queue_of_buffers(&mem, 1);
        let chain = dq.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), 0);
        dq.add_used(&mem, 0, 0).unwrap();
        publish(&mock, 0);
        assert_eq!(
            dq.pop(&mem).unwrap().unwrap().head_index(),
            0,
            "returned: fine"
        );
        assert_eq!(dq.in_flight(), 1);
        // Chain 0 is held; the driver publishes it again.
        publish(&mock, 0);
        let err = dq.pop(&mem).unwrap_err();
        assert!(matches!(err.cause, BrokenCause::HeadInFlight(0)), "{err:?}");
        assert_eq!(dq.broken_by(), Some(BrokenBy::Driver));
        publish(&mock, 1);
        assert!(
            dq.pop(&mem).unwrap().is_none(),
            "a broken queue is left alone"
        );
    }

    #[test]
    fn the_device_holds_at_most_queue_size_chains() {
        let mem = memory();
        let (mock, mut dq) = queue_of_buffers(&mem, 16);
        for head in 0..16 {
            assert_eq!(dq.pop(&mem).unwrap().unwrap().head_index(), head);
        }
        assert_eq!(dq.in_flight(), 16);
        // A 17th outstanding chain can only be one the device holds.
        publish(&mock, 9);
        assert!(matches!(
            dq.pop(&mem).unwrap_err().cause,
            BrokenCause::HeadInFlight(9)
        ));
        assert_eq!(dq.in_flight(), 16);
        // A head past the descriptor table is refused when it is published.
        let (mock, mut dq) = queue_of_buffers(&mem, 0);
        publish(&mock, 16);
        assert!(matches!(
            dq.pop(&mem).unwrap_err().cause,
            BrokenCause::HeadOutOfRange { head: 16, size: 16 }
        ));
        assert_eq!(dq.in_flight(), 0);
    }

    #[test]
    fn a_broken_queue_offers_no_chains_to_wait_for() {
        let mem = memory();
        let (mock, mut dq) = queue_of_buffers(&mem, 2);
        // An available index more than a ring ahead: corrupt.
        mock.avail().idx().store(100);
        assert!(dq.pop(&mem).is_err());
        assert!(
            !dq.wait_for_chains(&mem).unwrap(),
            "nothing to pop, so nothing arrived (a caller would spin)"
        );
    }

    #[test]
    fn returning_a_chain_the_device_does_not_hold_is_a_device_fault() {
        let mem = memory();
        let (_mock, mut dq) = queue_of_buffers(&mem, 2);
        let chain = dq.pop(&mem).unwrap().unwrap();
        dq.add_used(&mem, chain.head_index(), 0).unwrap();
        let err = dq.add_used(&mem, chain.head_index(), 0).unwrap_err();
        assert!(matches!(err.cause, BrokenCause::NotInFlight(0)), "{err:?}");
        assert_eq!(dq.broken_by(), Some(BrokenBy::Device));
    }

    /// The stall report sees the device's positions, the chains it holds, the notification it
    /// cleared and the interrupt it sent.
    #[test]
    fn the_watch_follows_the_device() {
        let mem = memory();
        let (_mock, mut dq) = queue_of_buffers(&mem, 3);
        let watch = QueueWatch::detached();
        dq.watch = watch.clone();
        dq.notify.write(1).unwrap();
        let chains = dq.pop_all(&mem).unwrap();
        assert_eq!(chains.len(), 3);
        dq.add_used(&mem, 0, 0).unwrap();
        dq.signal_used(&mem, &crate::device::Silent).unwrap();
        let seen = watch.snapshot("rng0", 0);
        assert_eq!((seen.next_avail, seen.next_used, seen.in_flight), (3, 1, 2));
        assert_eq!((seen.notifications, seen.interrupts), (1, 1));
        assert!(seen.ms_since_interrupt.is_some());
        // No notification pending: clearing counts nothing.
        dq.clear_notification();
        assert_eq!(watch.snapshot("rng0", 0).notifications, 1);
    }

    #[test]
    fn running_dry_asks_the_driver_to_notify() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let buffer =
            |i: u64| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 0x100, 0x100, 2, 0));
        mock.add_desc_chains(&[buffer(0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut dq = device_queue(0, queue);
        assert!(dq.pop(&mem).unwrap().is_some());
        assert!(dq.pop(&mem).unwrap().is_none());
        assert!(!dq.wait_for_chains(&mem).unwrap(), "nothing new yet");
        // The device published avail_event = 1 (after the used ring), so the driver will kick.
        let avail_event: u16 = mem
            .read_obj(mock.used_addr().unchecked_add(4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 1);
        mock.add_desc_chains(&[buffer(1)], 1).unwrap();
        assert!(dq.wait_for_chains(&mem).unwrap(), "a chain arrived");
        assert!(dq.pop(&mem).unwrap().is_some());
    }

    #[test]
    fn a_ring_outside_memory_breaks_the_queue_once() {
        let mem = memory();
        let mut queue = Queue::new(16).unwrap();
        queue.set_avail_ring_address(Some(0xffff_0000), Some(0x10));
        queue.set_ready(true);
        let mut dq = device_queue(3, queue);
        let err = dq.pop(&mem).unwrap_err();
        assert_eq!(err.index, 3);
        assert!(
            dq.pop(&mem).unwrap().is_none(),
            "a broken queue is left alone"
        );
    }
}
