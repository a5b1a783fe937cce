//! The interface between the transport and a device.

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::queue_watch::QueueWatch;
use crate::GuestMemory;

/// Raises interrupts for a device and reports when it needs a reset.
pub trait VirtioInterrupt: Send + Sync {
    /// The device used buffers of queue `index`.
    fn notify_queue(&self, index: u16);
    /// The device configuration changed.
    fn notify_config(&self);
    /// The device hit an error it cannot recover from (e.g. a queue in unreachable memory):
    /// sets DEVICE_NEEDS_RESET and tells the driver.
    fn needs_reset(&self);
}

/// Interrupts that go nowhere: for serving queues on the caller's thread (fuzzing, tests).
#[derive(Debug)]
pub(crate) struct Silent;

impl VirtioInterrupt for Silent {
    fn notify_queue(&self, _index: u16) {}
    fn notify_config(&self) {}
    fn needs_reset(&self) {}
}

/// One enabled queue handed to the device.
#[derive(Debug)]
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub notify: EventFd,
    /// What the stall report shows of the queue.
    pub watch: Arc<QueueWatch>,
}

/// Everything a device needs to run, given when the driver sets DRIVER_OK.
pub struct Activation {
    pub memory: Arc<GuestMemory>,
    /// The features both sides agreed on.
    pub features: u64,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues; the device needs {needed}")]
    MissingQueues { needed: usize, got: usize },
    #[error("cannot start the device's worker thread")]
    Worker(#[source] std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Device type (see [`crate::device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered to the driver (transport bits are added).
    fn features(&self) -> u64;

    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space (read-only by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts the device.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// Stops the device and forgets its queues; it may be activated again.
    fn reset(&mut self);
}

/// Copies `data.len()` bytes of a configuration structure at `offset`; out of range reads as
/// zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_clip_at_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 10, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
