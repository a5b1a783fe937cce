//! KVM smoke test: a guest that repeats a write the VMM warns about (an unsupported ACPI
//! sleep type) tens of thousands of times gets a handful of log lines, not one per write.
//! A test binary of its own: it installs the process's tracing subscriber.
//!
//! Needs /dev/kvm; FERRO_SKIP_KVM_TESTS=1 skips it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Instant;

use arch::test_images;
use vmm::Outcome;

mod common;

use common::{asm, guest, kvm_tests_enabled, run, Captured};

const WRITES: u32 = 20_000;

/// `WRITES` times: SLP_EN with sleep type 3 to the ACPI sleep control register (port 0x600).
fn unsupported_sleep_loop() -> Vec<u8> {
    let mut code = vec![0xb9]; // mov ecx, WRITES
    code.extend_from_slice(&WRITES.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06]); // mov dx, 0x600
    code.extend_from_slice(&[0xb0, 0x2c]); // mov al, SLP_EN | 3 << 2
    code.extend_from_slice(&[0xee, 0xe2, 0xfd]); // out dx, al; loop back to the out
    code
}

#[test]
fn a_guest_repeating_a_bad_write_gets_a_bounded_number_of_log_lines() {
    if !kvm_tests_enabled() {
        return;
    }
    let log = Captured::default();
    let writer = log.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish(),
    )
    .unwrap();
    let g = guest(test_images::bzimage(&asm::program(&[
        &unsupported_sleep_loop(),
        &asm::serial(b"done"),
        asm::POWEROFF,
    ])));
    let start = Instant::now();
    let (result, out) = run(&g.config);
    let elapsed = start.elapsed();
    assert_eq!(result.unwrap(), Outcome::PoweredOff);
    assert_eq!(out, "done");
    let text = log.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("unsupported sleep type 3"))
        .count();
    // The budget of every window the run touched.
    let windows = elapsed.as_millis() as u64 / guest_log::WINDOW_MS + 2;
    let bound = windows * u64::from(guest_log::LINES_PER_WINDOW);
    assert!(warnings > 0, "the warning is still logged:\n{text}");
    assert!(
        warnings as u64 <= bound,
        "{warnings} warnings for {WRITES} writes in {elapsed:?} (at most {bound})"
    );
    assert!(
        text.contains(" dropped=") || elapsed.as_millis() as u64 <= guest_log::WINDOW_MS,
        "a line after the flood says how many were dropped:\n{text}"
    );
}
