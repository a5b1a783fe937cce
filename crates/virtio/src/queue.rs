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

    /// Takes the next available chain, if any.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemory,
    ) -> Result<Option<DescriptorChain<&'m GuestMemory>>, QueueBroken> {
        if self.broken {
            return Ok(None);
        }
        match self.queue.iter(mem) {
            Ok(mut chains) => Ok(chains.next()),
            Err(e) => Err(self.broken(e)),
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
pub fn chain_buffers<'m>(
    chain: DescriptorChain<&'m GuestMemory>,
    mem: &'m GuestMemory,
) -> Result<ChainBuffers<'m>, ChainError> {
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
