//! The guest drives the legacy devices with arbitrary port accesses: none of them may panic,
//! whatever the order, width or value.
#![no_main]

use std::sync::{Arc, Mutex};

use arch::layout::ports;
use devices::bus::Bus;
use devices::PowerEvents;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fn bus() -> Bus {
    let power = PowerEvents::new().expect("eventfd");
    let serial = devices::serial::Serial::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        Box::new(std::io::sink()),
    );
    let bus = Bus::new();
    let clone = || power.try_clone().expect("eventfd");
    bus.insert(Arc::new(Mutex::new(serial)), ports::COM1.into(), 8)
        .expect("bus");
    bus.insert(
        Arc::new(Mutex::new(devices::i8042::I8042::new(clone()))),
        ports::I8042.into(),
        5,
    )
    .expect("bus");
    bus.insert(
        Arc::new(Mutex::new(devices::cmos::Cmos::new(256 << 20, 0))),
        ports::CMOS.into(),
        2,
    )
    .expect("bus");
    bus.insert(
        Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new(clone(), 5, 1))),
        ports::ACPI_PM.into(),
        4,
    )
    .expect("bus");
    bus
}

const PORTS: [u16; 4] = [ports::COM1, ports::I8042, ports::CMOS, ports::ACPI_PM];

fuzz_target!(|data: &[u8]| {
    let bus = bus();
    // Each access: [device and offset, width and direction, value].
    for access in data.chunks_exact(3) {
        let port = u64::from(PORTS[usize::from(access[0] >> 6)]) + u64::from(access[0] & 0x7);
        let width = 1usize << (access[1] & 0x3);
        let mut buf = [access[2]; 8];
        if access[1] & 0x80 != 0 {
            bus.write(port, &buf[..width]);
        } else {
            bus.read(port, &mut buf[..width]);
        }
    }
});
