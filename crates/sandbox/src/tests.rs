//! Unit tests of the lists, and of filters at work. A filter cannot be taken off a thread, and
//! a violation kills the process, so each test that installs one runs in a child process: the
//! test binary again, told by `SANDBOX_TEST_CASE` which case to play.

use std::process::Command;

use super::*;

const CASE: &str = "SANDBOX_TEST_CASE";
const REPORT: &str = "SANDBOX_TEST_REPORT";

#[test]
fn every_kind_compiles_under_kill_and_log_and_off_installs_nothing() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let program = filter(kind, mode).unwrap();
            assert!(!program.is_empty(), "{kind:?}");
            // The kernel refuses programs longer than BPF_MAXINSNS.
            assert!(
                program.len() <= 4096,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
        assert!(filter(kind, SeccompMode::Off).unwrap().is_empty());
    }
}

#[test]
fn a_kinds_number_is_its_place_in_all() {
    for (i, kind) in ThreadKind::ALL.iter().enumerate() {
        assert_eq!(*kind as usize, i, "{kind:?}");
    }
}

#[test]
fn the_spawner_allows_whatever_any_kind_does() {
    let spawner = ThreadKind::Spawner.allowed(1).unwrap();
    for kind in ThreadKind::ALL {
        let allowed = kind.allowed(1).unwrap();
        for call in allowed.calls() {
            assert!(spawner.mentions(call), "{kind:?}'s call {call} is missing");
            if allowed.allows_always(call) {
                assert!(spawner.allows_always(call), "{kind:?}'s call {call}");
            }
        }
    }
}

#[test]
fn no_kind_but_the_spawner_starts_threads_or_any_kind_processes() {
    for kind in ThreadKind::ALL {
        let allowed = kind.allowed(1).unwrap();
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
        ] {
            assert!(!allowed.mentions(call), "{kind:?} allows {call}");
        }
        if kind != ThreadKind::Spawner {
            assert!(!allowed.mentions(libc::SYS_clone), "{kind:?}");
            assert!(!allowed.mentions(libc::SYS_clone3), "{kind:?}");
        }
    }
    let spawner = ThreadKind::Spawner.allowed(1).unwrap();
    assert!(
        !spawner.allows_always(libc::SYS_clone),
        "clone needs CLONE_THREAD"
    );
}

#[test]
fn only_the_main_thread_opens_files_to_read_and_nobody_makes_sockets() {
    for kind in ThreadKind::ALL {
        let allowed = kind.allowed(1).unwrap();
        assert!(!allowed.allows_always(libc::SYS_openat), "{kind:?}");
        assert!(!allowed.mentions(libc::SYS_open), "{kind:?}");
        assert!(!allowed.mentions(libc::SYS_socket), "{kind:?}");
        assert!(!allowed.mentions(libc::SYS_connect), "{kind:?}");
        assert!(
            !allowed.allows_always(libc::SYS_ioctl),
            "{kind:?}: ioctls are by number"
        );
        assert!(
            !allowed.allows_always(libc::SYS_tgkill),
            "{kind:?}: own process only"
        );
    }
}

#[test]
fn device_workers_make_no_ioctl_but_the_net_control_path() {
    for kind in [
        ThreadKind::Block,
        ThreadKind::BlockIo,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::VirtioConsole,
        ThreadKind::Api,
        ThreadKind::Console,
    ] {
        assert!(
            !kind.allowed(1).unwrap().mentions(libc::SYS_ioctl),
            "{kind:?}"
        );
    }
    assert!(ThreadKind::NetControl
        .allowed(1)
        .unwrap()
        .mentions(libc::SYS_ioctl));
}

/// Runs `case` in a child test process; returns its exit status, stderr and exit report.
fn play(case: &str) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile_dir();
    let report = dir.join("exit.json");
    std::fs::write(&report, b"").unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::child_case",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE, case)
        .env(REPORT, &report)
        .output()
        .unwrap();
    let report_text = std::fs::read_to_string(&report).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        report_text,
    )
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sandbox-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signal_of(status: std::process::ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}

/// The child side: does nothing unless `SANDBOX_TEST_CASE` names a case.
#[test]
fn child_case() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    let report = std::fs::OpenOptions::new()
        .write(true)
        .open(std::env::var(REPORT).unwrap())
        .unwrap();
    report_to(std::os::fd::IntoRawFd::into_raw_fd(report));
    let socket = || {
        // SAFETY: socket takes no pointers; the descriptor is closed at once if made.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: `fd` is ours and not used again.
            unsafe { libc::close(fd) };
        }
        fd
    };
    match case.as_str() {
        "vcpu-socket" => {
            set_mode(SeccompMode::Kill).unwrap();
            confine_current_thread(ThreadKind::Vcpu).unwrap();
            socket();
            unreachable!("the filter let socket() through");
        }
        "log-socket" => {
            set_mode(SeccompMode::Log).unwrap();
            confine_current_thread(ThreadKind::Vcpu).unwrap();
            assert!(socket() >= 0, "log mode must let the call through");
        }
        "worker-via-spawner" => {
            set_mode(SeccompMode::Kill).unwrap();
            start_spawner(&[]).unwrap();
            confine_current_thread(ThreadKind::Vmm).unwrap();
            // Normal work in each kind's thread: allocate, lock, time, an eventfd read.
            for kind in ThreadKind::ALL {
                let worked = spawn(kind, "worker", || {
                    let v: Vec<u8> = vec![7; 1 << 20];
                    let m = std::sync::Mutex::new(v.len());
                    let _ = std::time::Instant::now();
                    assert_eq!(*m.lock().unwrap(), 1 << 20);
                })
                .unwrap()
                .join();
                assert!(worked.is_ok(), "{kind:?}");
            }
            // A block worker that opens a socket dies, and names its kind.
            let _ = spawn(ThreadKind::Block, "virtio-blk", move || {
                socket();
            })
            .unwrap()
            .join();
            std::thread::sleep(std::time::Duration::from_secs(5));
            unreachable!("the worker's socket() did not kill the process");
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn a_call_outside_the_list_kills_with_sigsys_and_a_report_naming_it() {
    let (status, stderr, report) = play("vcpu-socket");
    assert_eq!(
        signal_of(status),
        Some(libc::SIGSYS),
        "{status:?}\n{stderr}"
    );
    let expected = "seccomp: the vcpu thread made system call socket (41), which its filter \
                    does not allow; the VMM was killed (SIGSYS)";
    assert!(
        stderr.contains(&format!("ferro: error: {expected}")),
        "{stderr}"
    );
    assert_eq!(
        report,
        format!("{{\"code\":159,\"outcome\":\"error\",\"error\":\"{expected}\"}}\n")
    );
}

#[test]
fn log_mode_lets_the_call_through() {
    let (status, stderr, report) = play("log-socket");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_eq!(report, "");
}

#[test]
fn spawned_threads_work_under_their_filter_and_are_held_to_it() {
    let (status, stderr, _) = play("worker-via-spawner");
    assert_eq!(
        signal_of(status),
        Some(libc::SIGSYS),
        "{status:?}\n{stderr}"
    );
    assert!(
        stderr.contains("the virtio-blk thread made system call socket (41)"),
        "{stderr}"
    );
}
