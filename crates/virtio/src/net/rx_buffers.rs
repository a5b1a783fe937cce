//! The receive chains the device took from the driver and has not used yet. Each chain's
//! buffers are resolved once, when it is taken, into host (address, length) segments, so a
//! packet is read from the TAP straight into them without walking every chain again for every
//! packet (small packets such as TCP acknowledgements would otherwise pay for 32 chains).
//!
//! Threading: owned by the net device's worker, which also holds the guest memory the
//! segments point into; the memory is never unmapped while a worker runs.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::VolatileSlice;

use super::tap::Tap;
use crate::GuestMemory;

/// Most segments one read takes (the kernel's IOV_MAX).
const IOV_MAX: usize = 1024;

/// A chain taken from the driver, and the bytes it holds.
#[derive(Debug)]
pub struct RxChain {
    pub chain: DescriptorChain<Arc<GuestMemory>>,
    pub room: usize,
    segments: usize,
}

/// The chains taken, in the driver's order.
#[derive(Debug, Default)]
pub struct RxBuffers {
    chains: VecDeque<RxChain>,
    /// Host address and length of every buffer of every chain, in order.
    segments: Vec<(usize, usize)>,
    room: usize,
}

impl RxBuffers {
    /// Bytes the chains hold together.
    pub fn room(&self) -> usize {
        self.room
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Adds `chain`, whose device-writable buffers are `buffers`.
    pub fn push(
        &mut self,
        chain: DescriptorChain<Arc<GuestMemory>>,
        buffers: &[VolatileSlice<'_, ()>],
    ) {
        let room = block::slices_len(buffers) as usize;
        for slice in buffers.iter().filter(|s| !s.is_empty()) {
            self.segments
                .push((slice.ptr_guard_mut().as_ptr() as usize, slice.len()));
        }
        let segments = buffers.iter().filter(|s| !s.is_empty()).count();
        self.room += room;
        self.chains.push_back(RxChain {
            chain,
            room,
            segments,
        });
    }

    /// Removes the first chains that together hold `len` bytes (or all, if they hold less).
    pub fn claim(&mut self, len: usize) -> Vec<RxChain> {
        let mut claimed = Vec::new();
        let mut covered = 0;
        let mut segments = 0;
        while covered < len {
            let Some(chain) = self.chains.pop_front() else {
                break;
            };
            covered += chain.room;
            segments += chain.segments;
            self.room -= chain.room;
            claimed.push(chain);
        }
        self.segments.drain(..segments);
        claimed
    }

    /// Removes every chain.
    pub fn take_all(&mut self) -> Vec<RxChain> {
        self.segments.clear();
        self.room = 0;
        self.chains.drain(..).collect()
    }

    /// Reads one packet from `tap` into the chains, from the first on; None when the TAP has
    /// nothing waiting. The caller makes sure the chains can hold the largest packet.
    pub fn read_packet(&self, tap: &Tap) -> io::Result<Option<usize>> {
        let iovecs: Vec<libc::iovec> = self
            .segments
            .iter()
            .take(IOV_MAX)
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        loop {
            // The segments point into guest memory that the worker's Arc keeps mapped.
            let n = tap.read_packet_into(&iovecs);
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }
}
