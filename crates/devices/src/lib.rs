//! Legacy PC devices and the buses they sit on.
//!
//! - [`bus::Bus`]: address-range dispatch of port I/O and MMIO exits to devices;
//! - [`serial::Serial`]: a 16550A UART (vm-superio) whose interrupt is an irqfd;
//! - [`i8042::I8042`]: the keyboard controller, enough for the reset line;
//! - [`cmos::Cmos`]: the MC146818 RTC and CMOS NVRAM;
//! - [`acpi_pm::AcpiPm`]: the hardware-reduced ACPI sleep and reset registers;
//! - [`ged::Ged`]: the ACPI Generic Event Device that carries power-button presses.
//!
//! Threading: devices are shared as `Arc<Mutex<_>>`; vCPU threads call them on exits, and the
//! VMM's main thread feeds serial input. Power events leave through [`PowerEvents`] (eventfds
//! the main thread polls), so no device ever blocks a vCPU on the VMM's control loop.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// Eventfds through which devices ask the VMM to power off or reset the machine.
#[derive(Debug)]
pub struct PowerEvents {
    pub shutdown: EventFd,
    pub reset: EventFd,
}

impl PowerEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(PowerEvents {
            shutdown: EventFd::new(libc::EFD_NONBLOCK)?,
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(PowerEvents {
            shutdown: self.shutdown.try_clone()?,
            reset: self.reset.try_clone()?,
        })
    }

    pub fn request_shutdown(&self) {
        guest_log::guest_debug!("guest requested power-off");
        if let Err(e) = self.shutdown.write(1) {
            guest_log::guest_error!("cannot signal guest power-off: {e}");
        }
    }

    pub fn request_reset(&self) {
        guest_log::guest_debug!("guest requested reset");
        if let Err(e) = self.reset.write(1) {
            guest_log::guest_error!("cannot signal guest reset: {e}");
        }
    }
}
