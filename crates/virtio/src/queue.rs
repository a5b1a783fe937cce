//! Serving a virtqueue from a worker thread.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory as _, Permissions, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActiveQueue, VirtioInterrupt};
use crate::GuestMemory;

/// The queue is unusable: its rings point outside guest memory or its indices are corrupt.
/// The device must ask for a reset.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue {index} is broken")]
pub struct QueueBroken {
    pub index: u16,
    #[source]
    pub source: virtio_queue::Error,
}

/// One queue as a device worker owns it.
#[derive(Debug)]
pub struct DeviceQueue {
    pub index: u16,
    pub queue: Queue,
    pub notify: EventFd,
    /// Set once the queue broke; a broken queue is not touched again until reset.
    broken: bool,
}

impl From<ActiveQueue> for DeviceQueue {
    fn from(q: ActiveQueue) -> Self {
        DeviceQueue {
            index: q.index,
            queue: q.queue,
            notify: q.notify,
            broken: false,
        }
    }
}

impl DeviceQueue {
    fn broken(&mut self, source: virtio_queue::Error) -> QueueBroken {
        self.broken = true;
        QueueBroken {
            index: self.index,
            source,
        }
    }

    /// Takes the next available chain, if any. `mem` is `&GuestMemory` for a chain used at
    /// once, or an `Arc` for one kept across events.
    pub fn pop<M>(&mut self, mem: M) -> Result<Option<DescriptorChain<M>>, QueueBroken>
    where
        M: Clone + std::ops::Deref<Target = GuestMemory>,
    {
        if self.broken {
            return Ok(None);
        }
        match self.queue.iter(mem) {
            Ok(mut chains) => Ok(chains.next()),
            Err(e) => Err(self.broken(e)),
        }
    }

    /// Takes every available chain, with the driver's notifications suppressed meanwhile and
    /// re-checked after re-enabling them (see [`DeviceQueue::process`]); clears the notifier.
    pub fn pop_all<M>(&mut self, mem: M) -> Result<Vec<DescriptorChain<M>>, QueueBroken>
    where
        M: Clone + std::ops::Deref<Target = GuestMemory>,
    {
        let _ = self.notify.read();
        let mut chains = Vec::new();
        if self.broken {
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

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueBroken> {
        self.queue
            .add_used(mem, head, len)
            .map_err(|e| self.broken(e))
    }

    /// Puts a chain back so the next [`DeviceQueue::pop`] returns it again (the backend could
    /// not take it now).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// The device ran out of chains: asks the driver to notify when it adds some. Returns true
    /// if chains arrived in the meantime (then the caller should pop again instead of waiting).
    /// Without this, a driver using event indices would never notify again.
    pub fn wait_for_chains(&mut self, mem: &GuestMemory) -> Result<bool, QueueBroken> {
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
                source,
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
        let _ = self.notify.read();
        if self.broken {
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
}

/// Splits a chain into guest-memory slices, checking the order of its descriptors.
pub fn chain_buffers<'m, M>(
    chain: DescriptorChain<M>,
    mem: &'m GuestMemory,
) -> Result<ChainBuffers<'m>, ChainError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut buffers = ChainBuffers::default();
    for desc in chain {
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

    #[test]
    fn running_dry_asks_the_driver_to_notify() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let buffer =
            |i: u64| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 0x100, 0x100, 2, 0));
        mock.add_desc_chains(&[buffer(0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut dq = DeviceQueue {
            index: 0,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            broken: false,
        };
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
        let mut dq = DeviceQueue {
            index: 3,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            broken: false,
        };
        let err = dq.pop(&mem).unwrap_err();
        assert_eq!(err.index, 3);
        assert!(
            dq.pop(&mem).unwrap().is_none(),
            "a broken queue is left alone"
        );
    }
}
