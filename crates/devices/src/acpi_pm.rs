//! Hardware-reduced ACPI registers: sleep control, sleep status and reset.
//!
//! Layout (from the FADT): offset 0 sleep control, 1 sleep status, 2 reset. Writing
//! `SLP_EN | SLP_TYP=5` (S5) powers the machine off; writing the reset value resets it.

use crate::bus::ByteRegisters;
use crate::PowerEvents;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The ACPI power-management register block.
#[derive(Debug)]
pub struct AcpiPm {
    events: PowerEvents,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl AcpiPm {
    /// `s5_sleep_type` must match the DSDT's `_S5` package; `reset_value` the FADT's.
    pub fn new(events: PowerEvents, s5_sleep_type: u8, reset_value: u8) -> Self {
        AcpiPm {
            events,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl ByteRegisters for AcpiPm {
    fn read_byte(&mut self, _offset: u64) -> u8 {
        // Sleep status reads as "awake, nothing pending"; the other registers are write-only.
        0
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == self.s5_sleep_type {
                    self.events.request_shutdown();
                } else {
                    guest_log::guest_warn!("guest asked for unsupported sleep type {sleep_type}");
                }
            }
            RESET if value == self.reset_value => self.events.request_reset(),
            SLEEP_CONTROL | SLEEP_STATUS | RESET => {}
            _ => guest_log::guest_debug!("write to unknown ACPI PM register {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn pm() -> (AcpiPm, PowerEvents) {
        let events = PowerEvents::new().unwrap();
        (AcpiPm::new(events.try_clone().unwrap(), 5, 1), events)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, events) = pm();
        pm.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN: nothing happens
        assert!(events.shutdown.read().is_err());
        pm.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert_eq!(events.shutdown.read().unwrap(), 1);
        assert!(events.reset.read().is_err());
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let (mut pm, events) = pm();
        pm.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert!(events.shutdown.read().is_err());
    }

    #[test]
    fn reset_value_resets() {
        let (mut pm, events) = pm();
        pm.write(RESET, &[2]);
        assert!(events.reset.read().is_err());
        pm.write(RESET, &[1]);
        assert_eq!(events.reset.read().unwrap(), 1);
    }

    #[test]
    fn reads_are_zero_and_empty_writes_are_harmless() {
        let (mut pm, _events) = pm();
        let mut data = [0xffu8; 2];
        pm.read(SLEEP_STATUS, &mut data);
        assert_eq!(data, [0, 0]);
        pm.write(SLEEP_CONTROL, &[]);
        pm.write(77, &[1]);
    }
}
