//! VMM processes: starting `ferro run --config` on a definition's resolved config (written to
//! the VM's runtime directory; its own process group, so the
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
    /// The resolved VM config the VMM runs (`ferro run --config`).
    pub config: PathBuf,
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
            config: dir.join("vm.json"),
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

/// Writes the config the VMM runs to `files.config`, readable by the daemon's user only (it
/// names the VM's images and devices).
pub fn write_vm_config(config: &VmConfig, files: &VmmFiles) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(config).map_err(io::Error::other)?;
    bytes.push(b'\n');
    // Replaced whole, private from its creation: a crash mid-write leaves the previous config,
    // never half of one. The caller's message names the path.
    crate::fs::write_atomic_with_mode(&files.config, &bytes, 0o600).map_err(|e| e.source)
}

/// `ferro run` arguments for a VM whose config [`write_vm_config`] wrote: the config file,
/// then where the VMM's sockets, logs and exit report go. Every value is its own argument
/// (no shell).
pub fn vmm_args(files: &VmmFiles, console_log: &Path) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "run".into(),
        "--config".into(),
        path(&files.config),
        "--api-socket".into(),
        path(&files.api_socket),
        "--console-socket".into(),
        path(&files.console_socket),
        "--console-log".into(),
        path(console_log),
        "--exit-report".into(),
        path(&files.exit_report),
        "--log-file".into(),
        path(&files.stderr),
    ]
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
    use std::os::unix::fs::PermissionsExt;

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

    /// The VMM gets one file with the whole VM, and argv only says where things go.
    #[test]
    fn the_vmm_gets_the_config_as_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 x=\"a b\"",
            "cpus": 2, "memory": "1G", "rng": true, "rng_bytes_per_sec": 4096,
            "disks": [{"path": "/d.qcow2", "readonly": true, "serial": "s1", "format": "qcow2"}],
            "nets": [{"tap": "fv3n0", "mac": "52:54:00:12:34:56"}]
        }))
        .unwrap();
        let files = VmmFiles::new(dir.path().to_path_buf());
        write_vm_config(&config, &files).unwrap();
        let mode = std::fs::metadata(&files.config)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let written: VmConfig =
            serde_json::from_slice(&std::fs::read(&files.config).unwrap()).unwrap();
        assert_eq!(written, config);
        written.into_runnable().unwrap();
        let args = vmm_args(&files, Path::new("/log"));
        let config_path = files.config.display().to_string();
        assert_eq!(&args[..3], ["run", "--config", config_path.as_str()]);
        let joined = args.join("|");
        assert!(joined.contains("--console-log|/log|"), "{joined}");
        assert!(joined.ends_with(&format!("--log-file|{}", files.stderr.display())));
        for flag in ["--kernel", "--disk", "--net", "--rng", "--cpus"] {
            assert!(
                !args.iter().any(|a| a.starts_with(flag)),
                "{flag} in {joined}"
            );
        }
    }
}
