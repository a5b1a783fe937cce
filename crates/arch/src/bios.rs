//! The only "firmware" Ferro has: a reset-vector stub.
//!
//! Linux reboots a hardware-reduced ACPI machine without EFI by jumping to the BIOS reset
//! vector in real mode (it picks EFI reboot, which fails, then falls back to BIOS reboot). On a
//! PC that runs the firmware again; here the stub writes the ACPI reset register, so the VMM
//! resets the machine just as for any other reboot method.

use vm_memory::{Bytes, GuestMemoryBackend};

use crate::layout::{ports, RESET_VECTOR};

/// The real-mode stub placed at the reset vector.
pub fn reset_vector_stub() -> [u8; 9] {
    let [port_low, port_high] = ports::ACPI_RESET.to_le_bytes();
    [
        0xb0,
        ports::ACPI_RESET_VALUE, // mov al, RESET_VALUE
        0xba,
        port_low,
        port_high, // mov dx, ACPI_RESET
        0xee,      // out dx, al
        0xf4,      // hlt
        0xeb,
        0xfd, // jmp back to hlt
    ]
}

/// Writes the stub at [`RESET_VECTOR`].
pub fn write_reset_vector<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&reset_vector_stub(), RESET_VECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    #[test]
    fn stub_fits_below_1_mib_and_targets_the_reset_register() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut code = [0u8; 9];
        mem.read_slice(&mut code, RESET_VECTOR).unwrap();
        assert_eq!(code, [0xb0, 0x01, 0xba, 0x02, 0x06, 0xee, 0xf4, 0xeb, 0xfd]);
        assert!(RESET_VECTOR.0 + code.len() as u64 <= 1 << 20);
    }
}
