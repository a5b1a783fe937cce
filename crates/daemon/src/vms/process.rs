//! VMM processes: starting `ferro run` for a definition (its own process group, so the
//! daemon's end does not take it down), recognising it again after a daemon restart (pid plus process start
//! time, so a recycled pid is not mistaken for it), and waiting for it to end (a pidfd, which
//! works for processes the daemon did not start).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api::VmConfig;
use serde::{Deserialize, Serialize};

/// The files of one running VMM, all in its runtime directory.
#[derive(Debug, Clone)]
pub struct VmmFiles {
    pub dir: PathBuf,
    pub api_socket: PathBuf,
    pub console_socket: PathBuf,
    /// The VMM's log and stderr (`--log-file`: rotated by the VMM, capped on disk).
    pub stderr: PathBuf,
    pub exit_report: PathBuf,
    pub record: PathBuf,
}

impl VmmFiles {
    pub fn new(dir: PathBuf) -> Self {
        VmmFiles {
            api_socket: dir.join("api.sock"),
            console_socket: dir.join("console.sock"),
            stderr: dir.join("vmm.log"),
            exit_report: dir.join("exit.json"),
            record: dir.join("vmm.json"),
            dir,
        }
    }
}

/// What identifies a VMM process across daemon restarts (`run/NAME/vmm.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
}

/// `ferro run` arguments for `definition` (a resolved VM configuration); every value is its
/// own argument (no shell).
pub fn vmm_args(definition: &VmConfig, files: &VmmFiles, console_log: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        definition.kernel.display().to_string(),
        "--cmdline".into(),
        definition.cmdline.clone(),
        "--cpus".into(),
        definition.cpus.to_string(),
        "--memory".into(),
        definition.memory.to_string(),
        "--console".into(),
        match definition.console {
            api::ConsoleKind::Serial => "serial".into(),
            api::ConsoleKind::Hvc => "hvc".into(),
        },
        "--api-socket".into(),
        files.api_socket.display().to_string(),
        "--console-socket".into(),
        files.console_socket.display().to_string(),
        "--console-log".into(),
        console_log.display().to_string(),
        "--exit-report".into(),
        files.exit_report.display().to_string(),
        "--log-file".into(),
        files.stderr.display().to_string(),
    ];
    if let Some(initrd) = &definition.initrd {
        args.extend(["--initrd".into(), initrd.display().to_string()]);
    }
    if definition.rng {
        args.push(match definition.rng_options().to_option_string() {
            limit if limit.is_empty() => "--rng".into(),
            limit => format!("--rng={limit}"),
        });
    }
    for disk in &definition.disks {
        args.extend(["--disk".into(), disk.to_option_string()]);
    }
    for net in &definition.nets {
        args.extend(["--net".into(), net.to_option_string()]);
    }
    args
}

/// Starts the VMM in a session of its own, stdin from /dev/null, stderr to its log (what it
/// prints before it opens the log itself, with `--log-file`, lands there too).
pub fn spawn_vmm(ferro: &Path, args: &[String], files: &VmmFiles) -> io::Result<u32> {
    // Appending, as the VMM does: neither overwrites the other.
    let stderr = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.stderr)?;
    let mut command = Command::new(ferro);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    // A process group of its own: signals meant for the daemon's group (Ctrl-C on a terminal,
    // a service manager stopping the daemon's group) do not reach the VM. Unlike a pre_exec
    // setsid, this lets std use posix_spawn (vfork) instead of forking the daemon.
    command.process_group(0);
    let child = command.spawn()?;
    // The daemon reaps it through its pidfd (see `reap`); the handle is not needed.
    Ok(child.id())
}

/// The start time of process `pid` (None if it does not exist).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 22)
}

/// Field `n` (1-based, as in proc(5)) of a /proc/PID/stat line; the command name may hold
/// spaces and parentheses, so fields are counted after its closing parenthesis.
pub fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// Whether the process `record` describes is still the one running.
pub fn is_alive(record: &ProcessRecord) -> bool {
    start_time(record.pid) == Some(record.start_time)
}

/// A pidfd for `pid`: readable once the process has ended.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    host_sys::process::pidfd(pid).map_err(io::Error::other)
}

/// How a child process ended, if it was the daemon's child (reaps it); None otherwise.
pub use host_sys::process::reap;

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    host_sys::signal::kill(pid, signal).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat =
            "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 98765 1000";
        assert_eq!(stat_field(stat, 3), None); // the state is not a number
        assert_eq!(stat_field(stat, 14), Some(5)); // utime
        assert_eq!(stat_field(stat, 15), Some(6)); // stime
        assert_eq!(stat_field(stat, 22), Some(98765)); // starttime
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let pid = std::process::id();
        let start_time = start_time(pid).unwrap();
        assert!(is_alive(&ProcessRecord { pid, start_time }));
        assert!(!is_alive(&ProcessRecord {
            pid,
            start_time: start_time + 1
        }));
    }

    #[test]
    fn the_rng_limit_is_passed_when_the_definition_sets_it() {
        let definition: VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "/k", "rng": true, "rng_bytes_per_sec": 4096
        }))
        .unwrap();
        let args = vmm_args(
            &definition,
            &VmmFiles::new("/run/a".into()),
            Path::new("/log"),
        );
        assert!(
            args.contains(&"--rng=bytes_per_sec=4096".to_string()),
            "{args:?}"
        );
    }

    #[test]
    fn arguments_carry_every_part_of_the_definition() {
        let definition: VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 x=\"a b\"",
            "cpus": 2, "memory": "1G", "rng": true,
            "disks": [{"path": "/d.qcow2", "readonly": true, "serial": "s1", "format": "qcow2"}],
            "nets": [{"tap": "tap0", "mac": "52:54:00:12:34:56"}]
        }))
        .unwrap();
        let files = VmmFiles::new("/run/a".into());
        let args = vmm_args(&definition, &files, Path::new("/log"));
        let joined = args.join("|");
        assert!(
            joined.contains("--cmdline|console=ttyS0 x=\"a b\"|"),
            "{joined}"
        );
        assert!(joined.contains("--memory|1G|"));
        assert!(joined.contains("--disk|path=/d.qcow2,readonly=on,serial=s1,format=qcow2"));
        assert!(joined.contains("--net|tap=tap0,mac=52:54:00:12:34:56"));
        assert!(joined.contains("--initrd|/i") && joined.contains("|--rng|"));
        assert!(joined.contains("--log-file|/run/a/vmm.log"), "{joined}");
    }
}
