//! The ACPI Generic Event Device (GED): how a hardware-reduced platform tells the guest about
//! events such as a power-button press. The VMM sets an event bit and raises the GED's
//! interrupt; the guest's `_EVT` method (in the DSDT) reads the one-byte event register, which
//! hands over and clears the pending bits, and notifies the matching ACPI device.
//!
//! Threading: [`GedEvents`] is used from the VMM's control thread, the register from vCPU
//! threads; they share the pending bits through an atomic.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::ByteRegisters;

/// The event register, as the guest sees it.
#[derive(Debug)]
pub struct Ged {
    pending: Arc<AtomicU8>,
}

/// The host's side: raises events.
#[derive(Debug)]
pub struct GedEvents {
    pending: Arc<AtomicU8>,
    irq: EventFd,
}

/// A GED whose interrupt is `irq` (an irqfd), and the handle that raises its events.
pub fn new(irq: EventFd) -> (Ged, GedEvents) {
    let pending = Arc::new(AtomicU8::new(0));
    (
        Ged {
            pending: pending.clone(),
        },
        GedEvents { pending, irq },
    )
}

impl GedEvents {
    /// Marks `event` (one of `arch::acpi::ged_events`) pending and interrupts the guest.
    pub fn raise(&self, event: u8) -> std::io::Result<()> {
        self.pending.fetch_or(event, Ordering::AcqRel);
        self.irq.write(1)
    }
}

impl ByteRegisters for Ged {
    fn read_byte(&mut self, offset: u64) -> u8 {
        if offset == 0 {
            self.pending.swap(0, Ordering::AcqRel)
        } else {
            0
        }
    }

    fn write_byte(&mut self, _offset: u64, _value: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn a_raised_event_interrupts_and_is_read_once() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut ged, events) = new(irq.try_clone().unwrap());
        let mut byte = [0xffu8];
        ged.read(0, &mut byte);
        assert_eq!(byte, [0], "nothing pending");
        events.raise(1).unwrap();
        events.raise(1).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        ged.write(0, &[0xff]); // ignored
        ged.read(0, &mut byte);
        assert_eq!(byte, [1]);
        ged.read(0, &mut byte);
        assert_eq!(byte, [0], "reading acknowledged the event");
    }
}
