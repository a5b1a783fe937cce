//! The 8042 keyboard controller, reduced to what a guest without a keyboard uses: self-tests,
//! the command byte, and the CPU reset line (command 0xFE, or output-port bit 0 cleared).
//!
//! Ports: offset 0 is the data port (0x60), offset 4 the status/command port (0x64).

use crate::bus::ByteRegisters;
use crate::PowerEvents;

const DATA_PORT: u64 = 0;
const COMMAND_PORT: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
const STATUS_UNLOCKED: u8 = 1 << 4;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const COMMAND_BYTE_KBD_DISABLED: u8 = 1 << 4;
const COMMAND_BYTE_AUX_DISABLED: u8 = 1 << 5;
const OUTPUT_PORT_RESET_DEASSERTED: u8 = 1 << 0;
const SELF_TEST_PASSED: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;

/// The keyboard controller.
#[derive(Debug)]
pub struct I8042 {
    events: PowerEvents,
    command_byte: u8,
    output_port: u8,
    /// A command waiting for its data byte on port 0x60.
    pending: Option<u8>,
    output: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    pub fn new(events: PowerEvents) -> Self {
        I8042 {
            events,
            command_byte: 0,
            output_port: OUTPUT_PORT_RESET_DEASSERTED,
            pending: None,
            output: None,
            last_was_command: false,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, command: u8) {
        match command {
            CMD_READ_COMMAND_BYTE => self.output = Some(self.command_byte),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT => self.pending = Some(command),
            CMD_DISABLE_AUX => self.command_byte |= COMMAND_BYTE_AUX_DISABLED,
            CMD_ENABLE_AUX => self.command_byte &= !COMMAND_BYTE_AUX_DISABLED,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_PASSED),
            CMD_INTERFACE_TEST => self.output = Some(0),
            CMD_DISABLE_KBD => self.command_byte |= COMMAND_BYTE_KBD_DISABLED,
            CMD_ENABLE_KBD => self.command_byte &= !COMMAND_BYTE_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.output = Some(self.output_port),
            CMD_PULSE_RESET => self.events.request_reset(),
            other => guest_log::guest_debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_COMMAND_BYTE) => self.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_DEASSERTED == 0 {
                    self.events.request_reset();
                }
            }
            // A byte for the (absent) keyboard: acknowledge it so drivers do not time out.
            _ => self.output = Some(KBD_ACK),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_PORT => self.output.take().unwrap_or(0),
            COMMAND_PORT => self.status(),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            DATA_PORT => {
                self.last_was_command = false;
                self.data(value);
            }
            COMMAND_PORT => {
                self.last_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn kbd() -> (I8042, PowerEvents) {
        let events = PowerEvents::new().unwrap();
        (I8042::new(events.try_clone().unwrap()), events)
    }

    fn read(k: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        k.read(port, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_resets() {
        let (mut k, events) = kbd();
        k.write(COMMAND_PORT, &[CMD_PULSE_RESET]);
        assert_eq!(events.reset.read().unwrap(), 1);
    }

    #[test]
    fn clearing_output_port_bit0_resets() {
        let (mut k, events) = kbd();
        k.write(COMMAND_PORT, &[CMD_WRITE_OUTPUT_PORT]);
        k.write(DATA_PORT, &[0x03]);
        assert!(events.reset.read().is_err());
        k.write(COMMAND_PORT, &[CMD_WRITE_OUTPUT_PORT]);
        k.write(DATA_PORT, &[0x02]);
        assert_eq!(events.reset.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_command_byte_round_trip() {
        let (mut k, _events) = kbd();
        assert_eq!(read(&mut k, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        k.write(COMMAND_PORT, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut k, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut k, DATA_PORT), SELF_TEST_PASSED);
        assert_eq!(read(&mut k, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        k.write(COMMAND_PORT, &[CMD_WRITE_COMMAND_BYTE]);
        k.write(DATA_PORT, &[0x47]);
        k.write(COMMAND_PORT, &[CMD_READ_COMMAND_BYTE]);
        assert_eq!(read(&mut k, DATA_PORT), 0x47);
        k.write(COMMAND_PORT, &[CMD_DISABLE_KBD]);
        k.write(COMMAND_PORT, &[CMD_READ_COMMAND_BYTE]);
        assert_eq!(read(&mut k, DATA_PORT), 0x57);
    }

    #[test]
    fn keyboard_bytes_are_acknowledged() {
        let (mut k, events) = kbd();
        k.write(DATA_PORT, &[0xff]);
        assert_eq!(read(&mut k, DATA_PORT), KBD_ACK);
        assert!(events.reset.read().is_err());
    }
}
