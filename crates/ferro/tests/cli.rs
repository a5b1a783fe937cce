//! The `ferro` binary as users run it: exit codes, one-line errors, the no-hardware-
//! virtualization warning, and a tiny kernel booted on the local /dev/kvm.
//!
//! The KVM cases need /dev/kvm; FERRO_SKIP_KVM_TESTS=1 skips them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::process::{Command, Stdio};

use common::{ferro, hello_kernel, kvm_tests_enabled, stderr};

#[test]
fn help_documents_flags_and_exit_codes() {
    let out = ferro(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--no-reboot",
        "--rng [<OPTIONS>]",
        "--config <FILE>",
        "bytes_per_sec",
        "--log-file",
        "Exit codes",
        "Ctrl-A x",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let out = ferro(&["run", "--kernel", "/k", "--cpus", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "ferro: error: a VM needs at least one vCPU\n");
    let out = ferro(&["run", "--kernel", "/k", "--memory", "12Q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid size"), "{}", stderr(&out));
    let out = ferro(&["run", "--kernel", "/k", "--rng", "bytes_per_sec=0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("option bytes_per_sec: must be at least 1"),
        "{}",
        stderr(&out)
    );
    let out = ferro(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--kernel"), "{}", stderr(&out));
}

#[test]
fn tiny_kernel_boots_and_powers_off() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = hello_kernel(dir.path());
    let out = ferro(&[
        "run", "--kernel", &kernel, "--memory", "128M", "--cpus", "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_hw_virt = cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let warned = stderr(&out).contains("no hardware virtualization");
    assert_eq!(warned, !has_hw_virt, "{}", stderr(&out));
    assert!(stderr(&out).lines().count() <= 1, "{}", stderr(&out));
}

/// `--config` describes the whole VM; process options still combine with it, and its
/// errors are usage errors.
#[test]
fn a_config_file_runs_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(&config, r#"{"kernel": "/k", "disks": [{"volume": "p/v"}]}"#).unwrap();
    let config = config.to_str().unwrap();
    let out = ferro(&["run", "--config", config]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("resolved by the daemon"),
        "{}",
        stderr(&out)
    );
    let out = ferro(&["run", "--config", config, "--cpus", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    if !kvm_tests_enabled() {
        return;
    }
    let kernel = hello_kernel(dir.path());
    let json = serde_json::json!({"kernel": kernel, "memory": "128M", "cpus": 2});
    std::fs::write(dir.path().join("vm.json"), json.to_string()).unwrap();
    let report = dir.path().join("exit.json");
    let out = ferro(&[
        "run",
        "--config",
        config,
        "--exit-report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(std::fs::read_to_string(&report)
        .unwrap()
        .contains("powered-off"));
}

#[test]
fn missing_kernel_exits_3_with_one_error_line() {
    if !kvm_tests_enabled() {
        return;
    }
    let out = ferro(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_eq!(out.status.code(), Some(3));
    let errors: Vec<String> = stderr(&out)
        .lines()
        .filter(|l| l.contains("error"))
        .map(String::from)
        .collect();
    assert_eq!(
        errors,
        vec!["ferro: error: cannot open the kernel /nonexistent/bzImage: No such file or directory (os error 2)"]
    );
}

#[test]
fn triple_fault_exits_5_and_prints_registers() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("crash");
    std::fs::write(&kernel, arch::test_images::bzimage(&[0x0f, 0x0b])).unwrap();
    let out = ferro(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128M",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let err = stderr(&out);
    assert!(
        err.contains("ferro: error: vCPU 0: the guest triple-faulted"),
        "{err}"
    );
    assert!(err.contains("rip=") && err.contains("cr3="), "{err}");
    // Where KVM keeps the state at the fault (Intel, and this host's KVM), the dump shows the
    // faulting code; where it re-initializes the vCPU first (AMD), the dump says so.
    assert_eq!(
        err.contains("rip=000000000000fff0"),
        err.contains("its INIT state, not the state at the fault"),
        "{err}"
    );
}

#[test]
fn the_log_file_takes_stderr_and_rotates_at_its_cap() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("crash");
    std::fs::write(&kernel, arch::test_images::bzimage(&[0x0f, 0x0b])).unwrap();
    // A log at its 2 MiB cap: it is rotated when the VMM opens it.
    let log = dir.path().join("vmm.log");
    let earlier = "an earlier line\n".repeat((2 << 20) / 16);
    std::fs::write(&log, &earlier).unwrap();
    let out = ferro(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128M",
        "--log-file",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(stderr(&out), "", "everything went to the log file");
    let rotated = dir.path().join("vmm.log.1");
    assert_eq!(std::fs::read_to_string(&rotated).unwrap(), earlier);
    let text = std::fs::read_to_string(&log).unwrap();
    // The error printed on stderr at exit, and the registers, follow the log into its new file.
    assert!(
        text.contains("ferro: error: vCPU 0: the guest triple-faulted"),
        "{text}"
    );
    assert!(text.contains("rip="), "{text}");
    assert!(text.len() < 64 << 10, "{} bytes", text.len());
}

/// `vm diagnose --api-socket` asks a `ferro run` VMM directly, no daemon involved: the guest
/// halts after printing, and the report says so.
#[test]
fn diagnose_asks_a_vmm_on_its_api_socket() {
    if !kvm_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("halt");
    // Print "h", then halt for good.
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'h', 0xee, 0xf4, 0xeb, 0xfd];
    std::fs::write(&kernel, arch::test_images::bzimage(&code)).unwrap();
    let socket = dir.path().join("api.sock");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(["run", "--memory", "128M", "--kernel"])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket_arg = socket.to_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let out = ferro(&["vm", "diagnose", "--api-socket", socket_arg]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("vCPU 0: halted") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no halted report: {text}{}",
            stderr(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        text.starts_with(&format!("VM {socket_arg}: running")),
        "{text}"
    );
    let json = ferro(&["vm", "diagnose", "--api-socket", socket_arg, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["vcpus"][0]["registers"]["mp_state"], "halted");
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    // Without a VMM there, the error says where it looked; exit 5 as for an absent daemon.
    let gone = ferro(&["vm", "diagnose", "--api-socket", socket_arg]);
    assert_eq!(gone.status.code(), Some(5), "{}", stderr(&gone));
    assert!(stderr(&gone).contains(socket_arg), "{}", stderr(&gone));
    // A name and a socket together are a usage error.
    let both = ferro(&["vm", "diagnose", "web", "--api-socket", socket_arg]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}
