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

pub use arch::test_images::asm;

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

/// `config` checked as `ferro run` checks it, its refusal as the VMM's error.
pub fn runnable(config: &VmConfig) -> Result<api::RunnableConfig, Error> {
    Ok(config.clone().into_runnable()?)
}

/// Runs `config` with no console input; returns the outcome and the serial output.
pub fn run(config: &VmConfig) -> (Result<Outcome, Error>, String) {
    let out = Captured::default();
    let mut console =
        Console::new(Box::new(std::io::empty()), Box::new(out.clone()), false).unwrap();
    let result = runnable(config)
        .and_then(|config| vmm::run(&config, &mut console, None, vmm::Faults::default(), false));
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
    let result = runnable(config).and_then(|config| {
        vmm::run(
            &config,
            &mut console,
            Some(socket),
            vmm::Faults::default(),
            false,
        )
    });
    (result, out.text())
}
