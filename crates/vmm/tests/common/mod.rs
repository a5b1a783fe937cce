//! Shared by the KVM smoke tests: tiny x86 guests, a console that captures the guest's
//! output, and a temporary directory holding the guest's kernel.

#![allow(dead_code)] // each test binary uses its own part

use std::io::Write;
use std::sync::{Arc, Mutex};

use api::{ByteSize, VmConfig};
use vmm::{Console, Error, Outcome};

pub fn kvm_tests_enabled() -> bool {
    if std::env::var_os("FERRO_SKIP_KVM_TESTS").is_some() {
        return false;
    }
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing (set FERRO_SKIP_KVM_TESTS=1 to skip KVM tests)"
    );
    true
}

/// Tiny x86 programs; every instruction used encodes the same in 32- and 64-bit mode.
pub mod asm {
    pub fn serial(text: &[u8]) -> Vec<u8> {
        let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
        for &byte in text {
            code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
        }
        code
    }

    /// Writes SLP_TYP=5 | SLP_EN to the ACPI sleep control register.
    pub const POWEROFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee];
    /// Writes the reset value to the ACPI reset register.
    pub const ACPI_RESET: &[u8] = &[0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee];
    /// Pulses the reset line through the keyboard controller.
    pub const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64];
    /// `ud2` with an IDT too small for any vector: #UD, #DF, triple fault.
    pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
    pub const HALT_FOREVER: &[u8] = &[0xf4, 0xeb, 0xfd];

    /// Prints the KVM signature from CPUID leaf 0x40000000 (EBX = "KVMK").
    pub fn print_cpuid_signature() -> Vec<u8> {
        let mut code = vec![0xb8, 0x00, 0x00, 0x00, 0x40]; // mov eax, 0x40000000
        code.extend_from_slice(&[0x0f, 0xa2]); // cpuid (clobbers edx)
        code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for _ in 0..3 {
            code.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
        }
        code.push(0xee);
        code
    }

    pub fn program(parts: &[&[u8]]) -> Vec<u8> {
        let mut code: Vec<u8> = parts.concat();
        code.extend_from_slice(HALT_FOREVER);
        code
    }
}

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub struct Guest {
    pub dir: tempfile::TempDir,
    pub config: VmConfig,
}

pub fn guest(image: Vec<u8>) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, image).unwrap();
    let config = VmConfig {
        memory: ByteSize::mib(128),
        ..VmConfig::new(kernel)
    };
    Guest { dir, config }
}

/// Runs `config` with no console input; returns the outcome and the serial output.
pub fn run(config: &VmConfig) -> (Result<Outcome, Error>, String) {
    let out = Captured::default();
    let mut console =
        Console::new(Box::new(std::io::empty()), Box::new(out.clone()), false).unwrap();
    let result = vmm::run(config, &mut console, None);
    (result, out.text())
}

/// Like [`run`], with the control API on `socket`.
pub fn run_with_api(
    config: &VmConfig,
    socket: &std::path::Path,
) -> (Result<Outcome, Error>, String) {
    let out = Captured::default();
    let mut console =
        Console::new(Box::new(std::io::empty()), Box::new(out.clone()), false).unwrap();
    let result = vmm::run(config, &mut console, Some(socket));
    (result, out.text())
}
