//! `ferro run --seccomp`: every VMM thread runs under a filter of its kind from before the guest
//! runs, and a call outside a filter ends the VMM with SIGSYS and a report naming it. Tiny
//! guests on the local /dev/kvm (FERRO_SKIP_KVM_TESTS=1 skips them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{ferro, hello_kernel, kvm_tests_enabled, stderr};
use std::time::{Duration, Instant};

/// A field of /proc/<path>/status.
fn status_field(path: &Path, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(path.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// Each thread's name, seccomp mode, filter count and no_new_privs, of the running `pid`.
fn threads(pid: u32) -> Vec<(String, String, usize, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            Some((
                std::fs::read_to_string(path.join("comm"))
                    .ok()?
                    .trim()
                    .to_string(),
                status_field(&path, "Seccomp")?,
                status_field(&path, "Seccomp_filters")?.parse().ok()?,
                status_field(&path, "NoNewPrivs")?,
            ))
        })
        .collect()
}

/// Runs a guest that prints and then halts for good, with an API and a console socket (so
/// their threads exist); returns its threads once the guest has printed.
fn halted_vm_threads(seccomp: &str) -> Vec<(String, String, usize, String)> {
    halted_vm(&["--seccomp", seccomp]).0
}

/// As [`halted_vm_threads`], with `args`; also returns /proc/PID/limits.
fn halted_vm(args: &[&str]) -> (Vec<(String, String, usize, String)>, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("halt");
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'h', 0xee, 0xf4, 0xeb, 0xfd];
    std::fs::write(&kernel, arch::test_images::bzimage(&code)).unwrap();
    let log = dir.path().join("console.log");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(["run", "--memory", "128M", "--cpus", "2"])
        .args(args)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--api-socket")
        .arg(dir.path().join("api.sock"))
        .arg("--console-socket")
        .arg(dir.path().join("console.sock"))
        .arg("--console-log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log).unwrap_or_default() != "h" {
        assert!(Instant::now() < deadline, "the guest never printed");
        assert!(vmm.try_wait().unwrap().is_none(), "the VMM ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    // vCPU threads start one after another: the guest may print before the last one runs.
    let cpus = |seen: &[(String, String, usize, String)]| {
        seen.iter().filter(|t| t.0.starts_with("vcpu")).count()
    };
    let mut seen = threads(vmm.id());
    while cpus(&seen) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        seen = threads(vmm.id());
    }
    // KVM's own kernel workers (kvm-nx-lpage-recovery) live in the process too; no code of
    // the VMM runs on them.
    seen.retain(|t| !t.0.starts_with("kvm-"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vmm.id())).unwrap();
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    (seen, limits)
}

/// The soft and hard value of one line of /proc/PID/limits.
fn limit(limits: &str, name: &str) -> (String, String) {
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (fields[0].to_string(), fields[1].to_string())
}

#[test]
fn the_vmm_runs_with_bounded_files_and_no_core_dumps_unless_asked() {
    if !kvm_tests_enabled() {
        return;
    }
    let (_, limits) = halted_vm(&[]);
    let zero = ("0".to_string(), "0".to_string());
    assert_eq!(limit(&limits, "Max core file size"), zero, "{limits}");
    // No disk or NIC: the base 1024 plus room for the rng and console devices.
    let files = "2176".to_string();
    assert_eq!(
        limit(&limits, "Max open files"),
        (files.clone(), files),
        "{limits}"
    );
    let bytes = (1u64 << 30).to_string();
    assert_eq!(
        limit(&limits, "Max file size"),
        (bytes.clone(), bytes),
        "{limits}"
    );
    let (_, limits) = halted_vm(&["--core-dumps"]);
    let unlimited = ("unlimited".to_string(), "unlimited".to_string());
    assert_eq!(limit(&limits, "Max core file size"), unlimited, "{limits}");
}

#[test]
fn every_thread_runs_under_a_filter_once_the_guest_runs() {
    if !kvm_tests_enabled() {
        return;
    }
    // This test may itself run under filters (a container's): count from there.
    let own = Path::new("/proc/thread-self");
    let inherited: usize = status_field(own, "Seccomp_filters")
        .unwrap()
        .parse()
        .unwrap();
    let seen = halted_vm_threads("kill");
    let names: Vec<&str> = seen.iter().map(|t| t.0.as_str()).collect();
    for expected in ["ferro", "spawner", "vcpu0", "vcpu1", "api", "console-hub"] {
        assert!(
            names.contains(&expected),
            "no {expected} thread in {names:?}"
        );
    }
    for (name, mode, filters, no_new_privs) in &seen {
        assert_eq!(mode, "2", "{name}: Seccomp");
        assert!(*filters > inherited, "{name}: {filters} filters");
        assert_eq!(no_new_privs, "1", "{name}: NoNewPrivs");
    }

    let off = halted_vm_threads("off");
    for (name, _, filters, _) in &off {
        assert_eq!(
            *filters, inherited,
            "{name} has a filter under --seccomp off"
        );
    }
}

#[test]
fn a_forbidden_call_kills_the_vmm_with_a_report_naming_it() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = hello_kernel(dir.path());
    let report = dir.path().join("exit.json");
    let out = ferro(&[
        "run",
        "--kernel",
        &kernel,
        "--memory",
        "128M",
        "--fault",
        "forbidden-syscall",
        "--exit-report",
        report.to_str().unwrap(),
    ]);
    let signal = std::os::unix::process::ExitStatusExt::signal(&out.status);
    assert_eq!(
        signal,
        Some(libc::SIGSYS),
        "{:?}: {}",
        out.status,
        stderr(&out)
    );
    let said = "seccomp: the vcpu thread made system call socket (41), which its filter does \
                not allow; the VMM was killed (SIGSYS)";
    assert!(stderr(&out).contains(said), "{}", stderr(&out));
    let report: api::vmm_api::ExitReport =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report.outcome, "error");
    assert_eq!(report.error.as_deref(), Some(said));
    // Nothing of the guest's output came after the call.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn log_mode_lets_the_forbidden_call_through() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = hello_kernel(dir.path());
    let out = ferro(&[
        "run",
        "--kernel",
        &kernel,
        "--memory",
        "128M",
        "--seccomp",
        "log",
        "--fault",
        "forbidden-syscall",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}
