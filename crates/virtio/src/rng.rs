//! virtio-rng (entropy device, virtio 1.x section 5.4): fills the driver's buffers with bytes
//! from the host's getrandom.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::counters::Counters;
use crate::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::queue::DeviceQueue;
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};

const QUEUE_SIZE: u16 = 256;
/// Largest amount served per request; drivers ask for far less.
const MAX_REQUEST: usize = 64 << 10;

/// The device's counters (indexes into [`COUNTER_NAMES`]).
pub mod counter {
    pub const REQUESTS: usize = 0;
    pub const BYTES: usize = 1;
}

/// Names of the counters, in index order.
pub const COUNTER_NAMES: &[&str] = &["requests", "bytes"];

/// Fresh counters for an entropy device.
pub fn new_counters() -> Arc<Counters> {
    Counters::new("rng", COUNTER_NAMES)
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    worker: Option<WorkerHandle>,
    counters: Arc<Counters>,
}

impl Rng {
    pub fn new(counters: Arc<Counters>) -> Self {
        Rng {
            worker: None,
            counters,
        }
    }
}

struct RngWorker {
    memory: Arc<GuestMemory>,
    queue: DeviceQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    counters: Arc<Counters>,
}

/// Fills the writable part of a chain with random bytes; returns how many were written.
/// Public for fuzzing: the device's worker calls it on every chain.
pub fn fill(chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let len = writer.available_bytes().min(MAX_REQUEST);
    let mut buf = vec![0u8; len];
    if let Err(e) = getrandom::fill(&mut buf) {
        guest_log::guest_warn!("getrandom failed: {e}");
        return 0;
    }
    match writer.write_all(&buf) {
        Ok(()) => len as u32,
        Err(_) => writer.bytes_written() as u32,
    }
}

impl Worker for RngWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![(self.queue.notify.as_raw_fd(), 0)]
    }

    fn handle(&mut self, _token: u64, _poll: &Poll) -> io::Result<()> {
        let mem = self.memory.clone();
        let counters = &self.counters;
        let result = self.queue.process(&mem, self.interrupt.as_ref(), |chain| {
            let written = fill(chain, &mem);
            counters.add(counter::REQUESTS, 1);
            counters.add(counter::BYTES, u64::from(written));
            written
        });
        if let Err(e) = result {
            guest_log::guest_warn!("virtio-rng: {e}");
            self.interrupt.needs_reset();
        }
        Ok(())
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
        let worker = RngWorker {
            memory: activation.memory,
            queue: queue.into(),
            interrupt: activation.interrupt,
            counters: self.counters.clone(),
        };
        self.worker =
            Some(WorkerHandle::spawn("virtio-rng", worker).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_every_writable_byte() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let queue = MockSplitQueue::new(&mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        let chain = queue
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 100, w, 0)),
                RawDescriptor::from(Descriptor::new(0x11_0000, 28, w, 0)),
            ])
            .unwrap();
        assert_eq!(fill(chain, &mem), 128);
        let mut bytes = [0u8; 100];
        mem.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(bytes.iter().any(|&b| b != 0));
        // A chain with nothing writable gets nothing.
        let readable = queue
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x10_0000, 64, 0, 0))])
            .unwrap();
        assert_eq!(fill(readable, &mem), 0);
    }
}
