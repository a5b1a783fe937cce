//! Helpers the `ferro` binary's test files share: running it, and a tiny guest kernel.

#![allow(dead_code)] // each test file uses its own share of these

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `ferro` with `args`, stdin empty and FERRO_SECCOMP not inherited.
pub fn ferro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(args)
        .env_remove("FERRO_SECCOMP")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The KVM cases need /dev/kvm; FERRO_SKIP_KVM_TESTS=1 skips them.
pub fn kvm_tests_enabled() -> bool {
    std::env::var_os("FERRO_SKIP_KVM_TESTS").is_none()
}

/// Writes a kernel whose 64-bit code prints "hi\n" on COM1, then powers off through ACPI;
/// returns its path.
pub fn hello_kernel(dir: &Path) -> String {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in b"hi\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd]);
    let path = dir.join("hello");
    std::fs::write(&path, arch::test_images::bzimage(&code)).unwrap();
    path.display().to_string()
}
