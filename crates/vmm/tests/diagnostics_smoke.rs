//! KVM smoke tests of the stall report (`GET /api/v1/vm/diagnostics`) on the local /dev/kvm,
//! with tiny guests that spin making exits, spin without exits, halt, and one whose vCPU
//! thread blocks writing its output: the report shows where each vCPU is, and a thread that
//! cannot answer does not hold the report up. Every answer is checked against
//! docs/api/vmm.openapi.json.
//!
//! They need /dev/kvm. Set FERRO_SKIP_KVM_TESTS=1 to skip them on a machine without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::diagnostics::{MpState, VmDiagnostics};
use api::vmm_api::paths;
use api::VmConfig;
use arch::test_images;
use common::{asm, guest, kvm_tests_enabled, runnable};
use http_unix::Client;
use openapi_check::OpenApi;
use vmm::{Console, Error, Outcome};

/// Where a bzImage's 64-bit code starts.
const ENTRY: u64 = 0x10_0200;

/// `mov dx, 0x80` then `out dx, al; jmp back` forever: an exit per iteration.
const OUT_LOOP: &[u8] = &[0x66, 0xba, 0x80, 0x00, 0xee, 0xeb, 0xfd];
/// `cli; jmp $`: spins in the guest without ever exiting on its own.
const SILENT_LOOP: &[u8] = &[0xfa, 0xeb, 0xfe];

struct Running {
    api: OpenApi,
    client: Client,
    vm: JoinHandle<Result<Outcome, Error>>,
}

impl Running {
    fn start(config: &VmConfig, socket: &Path, out: Box<dyn Write + Send>) -> Running {
        let mut console = Console::new(Box::new(std::io::empty()), out, false).unwrap();
        let (config, path) = (config.clone(), socket.to_path_buf());
        let vm = std::thread::spawn(move || {
            vmm::run(
                &runnable(&config)?,
                &mut console,
                Some(&path),
                vmm::Faults::default(),
                false,
            )
        });
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/vmm.openapi.json");
        let running = Running {
            api: OpenApi::parse(&std::fs::read_to_string(doc).unwrap()).unwrap(),
            client: Client::new(socket, Some(Duration::from_secs(30))),
            vm,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() || running.client.request("GET", paths::VM, None).is_err() {
            assert!(Instant::now() < deadline, "the API did not come up");
            assert!(!running.vm.is_finished(), "the VMM ended early");
            std::thread::sleep(Duration::from_millis(10));
        }
        running
    }

    fn diagnostics(&self) -> VmDiagnostics {
        let response = self
            .client
            .request("GET", paths::DIAGNOSTICS, None)
            .unwrap();
        self.api
            .check("GET", paths::DIAGNOSTICS, response.status, &response.body)
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).unwrap()
    }

    /// Polls the report until `done` holds for it.
    fn wait_for(&self, done: impl Fn(&VmDiagnostics) -> bool, what: &str) -> VmDiagnostics {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let report = self.diagnostics();
            if done(&report) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {report:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) {
        let response = self.client.request("PUT", paths::STOP, None).unwrap();
        assert_eq!(response.status, 204);
        assert_eq!(self.vm.join().unwrap().unwrap(), Outcome::Stopped);
    }
}

#[test]
fn a_spinning_vcpu_shows_its_loop_and_its_exits() {
    if !kvm_tests_enabled() {
        return;
    }
    let mut g = guest(test_images::bzimage(OUT_LOOP));
    g.config.rng = true;
    let vm = Running::start(
        &g.config,
        &g.dir.path().join("api.sock"),
        Box::new(std::io::sink()),
    );
    // Registers and exit counts are read a moment apart (a loaded host can delay the control
    // loop between them), so wait for a report where both show the loop.
    let in_loop = |r: &VmDiagnostics| {
        r.vcpus[0]
            .registers
            .as_ref()
            .is_some_and(|regs| (ENTRY + 4..ENTRY + 7).contains(&regs.rip))
    };
    let report = vm.wait_for(
        |r| r.vcpus[0].recent_exits["io_out"] > 10 && in_loop(r),
        "exits in the loop",
    );
    let vcpu = &report.vcpus[0];
    let regs = vcpu.registers.as_ref().unwrap();
    assert_eq!(regs.mp_state, MpState::Runnable);
    assert_eq!((regs.cs, regs.cpl), (0x08, 0), "{regs:?}");
    assert_ne!(regs.cr0 & 1, 0, "protected mode");
    assert!(vcpu.ms_since_last_exit.unwrap() < 1000, "{vcpu:?}");
    assert_eq!(report.exit_window_seconds, 5);
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    // COM1 untouched by the guest; the IOAPIC has its 24 pins.
    let serial = report.serial.unwrap();
    assert_eq!((serial.ier, serial.iir), (0, 1));
    assert!(!serial.thre_interrupt_pending);
    let irqchip = report.irqchip.unwrap();
    assert_eq!(irqchip.ioapic.pins.len(), 24);
    assert_eq!(irqchip.pics.len(), 2);
    // The guest has no virtio driver: its rng's one queue is listed, never started.
    let queues = &report.virtio_queues;
    assert_eq!(queues.len(), 1, "{queues:?}");
    assert_eq!((queues[0].device.as_str(), queues[0].queue), ("rng0", 0));
    assert!(!queues[0].active && queues[0].driver_avail_idx.is_none());
    // A paused vCPU answers from the pause gate, and makes no exits there.
    let paused = vm.client.request("PUT", paths::PAUSE, None).unwrap();
    assert_eq!(paused.status, 204);
    let report = vm.wait_for(|r| r.vcpus[0].registers.is_some(), "a paused answer");
    assert_eq!(report.state, api::VmState::Paused);
    let regs = report.vcpus[0].registers.as_ref().unwrap();
    assert!(
        (ENTRY + 4..ENTRY + 7).contains(&regs.rip),
        "rip {:#x}",
        regs.rip
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(vm.diagnostics().vcpus[0].ms_since_last_exit.unwrap() >= 300);
    vm.stop();
}

#[test]
fn a_vcpu_that_never_exits_still_answers_when_kicked() {
    if !kvm_tests_enabled() {
        return;
    }
    let g = guest(test_images::bzimage(SILENT_LOOP));
    let vm = Running::start(
        &g.config,
        &g.dir.path().join("api.sock"),
        Box::new(std::io::sink()),
    );
    let report = vm.wait_for(
        |r| {
            r.vcpus[0]
                .registers
                .as_ref()
                .is_some_and(|regs| regs.rip == ENTRY + 1)
        },
        "the vCPU to reach its loop",
    );
    let vcpu = &report.vcpus[0];
    let regs = vcpu.registers.as_ref().unwrap();
    assert!(!regs.interrupts_enabled(), "cli ran");
    // Only the report's own kicks made it leave the guest.
    let exits: u64 = vcpu.recent_exits.values().sum();
    assert_eq!(exits, vcpu.recent_exits["interrupted"], "{vcpu:?}");
    vm.stop();
}

#[test]
fn halted_and_waiting_vcpus_show_their_mp_state() {
    if !kvm_tests_enabled() {
        return;
    }
    let mut g = guest(test_images::bzimage(&asm::program(&[&asm::serial(b"h")])));
    g.config.cpus = 2;
    let vm = Running::start(
        &g.config,
        &g.dir.path().join("api.sock"),
        Box::new(std::io::sink()),
    );
    let report = vm.wait_for(
        |r| {
            r.vcpus[0]
                .registers
                .as_ref()
                .is_some_and(|regs| regs.mp_state == MpState::Halted)
                && r.vcpus[1].registers.is_some()
        },
        "vCPU 0 to halt and vCPU 1 to answer",
    );
    let boot = &report.vcpus[0];
    // `mov dx`, `mov al; out`, then `hlt`: RIP is past the hlt.
    assert_eq!(boot.registers.as_ref().unwrap().rip, ENTRY + 4 + 3 + 1);
    let ap = report.vcpus[1].registers.as_ref().unwrap();
    assert_eq!(ap.mp_state, MpState::Uninitialized);
    // The one byte written stays in the total; the window holds it while it is recent.
    assert!(boot.recent_exits["io_out"] <= 1, "{boot:?}");
    vm.stop();
}

/// A console writer that blocks until the test lets it go, as a full pipe or a stalled
/// terminal would.
struct BlockingWriter(Arc<Mutex<Receiver<()>>>);

impl Write for BlockingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.lock().unwrap().recv();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_vcpu_thread_blocked_in_a_device_does_not_hold_the_report_up() {
    if !kvm_tests_enabled() {
        return;
    }
    let g = guest(test_images::bzimage(&asm::program(&[&asm::serial(b"x")])));
    let (release, blocked) = mpsc::channel::<()>();
    let out = BlockingWriter(Arc::new(Mutex::new(blocked)));
    let vm = Running::start(&g.config, &g.dir.path().join("api.sock"), Box::new(out));
    let report = vm.wait_for(|r| r.vcpus[0].registers.is_none(), "the vCPU to block");
    let start = Instant::now();
    let report = {
        let again = vm.diagnostics();
        assert!(again.vcpus[0].registers.is_none());
        drop(report);
        again
    };
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "the report took {took:?}");
    let why = report.vcpus[0].unavailable.as_deref().unwrap();
    assert!(why.contains("no answer within 500 ms"), "{why}");
    assert!(report.serial.is_none());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("COM1 stayed locked")),
        "{:?}",
        report.notes
    );
    // Its exit counters still show the write it is stuck in.
    assert_eq!(report.vcpus[0].recent_exits["io_out"], 1);
    drop(release);
    vm.stop();
}
