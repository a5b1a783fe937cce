//! The COM1 16550A UART: vm-superio's model, an irqfd as its interrupt line, and an eventfd
//! that tells the console feeder when the guest has drained the receive FIFO.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::ByteRegisters;

/// Raises the UART's interrupt line by writing to its irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `drained` whenever the guest empties the receive FIFO.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            guest_log::guest_warn!("cannot signal serial input drain: {e}");
        }
    }
}

type Uart = vm_superio::Serial<IrqTrigger, InputDrained, Box<dyn Write + Send>>;

/// The guest's serial port.
pub struct Serial {
    uart: Uart,
    output_failed: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART interrupting through `irq`, writing what the guest sends to `out`.
    pub fn new(irq: EventFd, drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::with_events(IrqTrigger(irq), InputDrained(drained), out),
            output_failed: false,
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the FIFO (0 when full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::warn!("serial input: {e}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The registers that decide the UART's interrupts, read without side effects (reading
    /// IIR through the port would clear a latched THR-empty interrupt).
    pub fn registers(&self) -> UartRegisters {
        let state = self.uart.state();
        UartRegisters {
            ier: state.interrupt_enable,
            iir: state.interrupt_identification,
            lsr: state.line_status,
            lcr: state.line_control,
            mcr: state.modem_control,
            input_bytes: state.in_buffer.len(),
        }
    }
}

/// A snapshot of the UART's interrupt-related registers (for the stall report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UartRegisters {
    pub ier: u8,
    pub iir: u8,
    pub lsr: u8,
    pub lcr: u8,
    pub mcr: u8,
    /// Bytes waiting in the receive FIFO.
    pub input_bytes: usize,
}

impl UartRegisters {
    /// IIR says a THR-empty interrupt is latched, waiting for the guest to read IIR.
    pub fn thre_interrupt_pending(&self) -> bool {
        self.iir & 0b1111 == 0b0010
    }
}

impl ByteRegisters for Serial {
    fn read_byte(&mut self, offset: u64) -> u8 {
        u8::try_from(offset).map_or(0xff, |offset| self.uart.read(offset))
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            // Report a broken console once; the guest must not notice.
            if !self.output_failed {
                guest_log::guest_warn!("serial output lost: {e}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, EventFd, EventFd, Shared) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let s = Serial::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (s, irq, drained, out)
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn registers_show_a_latched_thr_empty_interrupt_until_iir_is_read() {
        let (mut s, irq, _drained, _out) = serial();
        assert!(!s.registers().thre_interrupt_pending());
        s.write(IER, &[0x02]);
        let regs = s.registers();
        assert_eq!((regs.ier, regs.lsr & 0x20), (0x02, 0x20));
        assert!(regs.thre_interrupt_pending(), "{regs:?}");
        assert_eq!(irq.read().unwrap(), 1);
        let mut iir = [0u8];
        s.read(2, &mut iir);
        assert!(!s.registers().thre_interrupt_pending());
        s.enqueue_input(b"ab");
        assert_eq!(s.registers().input_bytes, 2);
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut s, _irq, _drained, out) = serial();
        for b in b"hi\n" {
            s.write(DATA, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_raises_the_interrupt_and_drain_is_signalled() {
        let (mut s, irq, drained, _out) = serial();
        s.write(IER, &[0x01]); // receive-data interrupt on
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        s.read(LSR, &mut byte);
        assert_eq!(byte[0] & 1, 1, "data ready");
        s.read(DATA, &mut byte);
        assert_eq!(byte[0], b'a');
        assert!(drained.read().is_err(), "not drained yet");
        s.read(DATA, &mut byte);
        assert_eq!(byte[0], b'b');
        assert_eq!(drained.read().unwrap(), 1);
    }

    #[test]
    fn a_full_fifo_accepts_nothing_more() {
        let (mut s, _irq, _drained, _out) = serial();
        let cap = s.input_capacity();
        assert_eq!(s.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(s.enqueue_input(b"y"), 0);
        assert_eq!(s.input_capacity(), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut s, _irq, _drained, _out) = serial();
        s.write(3, &[]);
        s.read(u64::MAX, &mut []);
        let mut wide = [0xffu8; 4];
        s.read(LSR, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        s.write(1000, &[1]);
    }
}
