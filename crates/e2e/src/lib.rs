//! Helpers for end-to-end tests and benchmarks that boot the default test guest with `ferro run`
//! (or QEMU) and watch its console. Everything here runs on a host with real KVM, normally
//! inside `tools/testbed`.
//!
//! A [`Vm`] is a child process whose stdout and stderr are collected by two reader threads;
//! the test thread polls them with deadlines, so a hung guest fails a test instead of hanging it.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod kvm_stats;
pub mod qemu_monitor;
pub mod resume;
pub mod stall;
pub mod tap;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stall::{Probe, StallWatch, VmmProbe, STALL_LIMIT};

/// Printed by the default test guest's init once it has loaded its modules.
pub const READY: &str = "ferro-guest: ready";

/// Paths of the default test guest, from the environment `tools/testbed` sets.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// The guest's files as an ext4 image (boot it with `ferro.root=/dev/vda`).
    pub rootfs: PathBuf,
}

impl GuestImages {
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set; run this under tools/testbed"))
        };
        Ok(GuestImages {
            kernel: var("FERRO_GUEST_KERNEL")?,
            vmlinux: var("FERRO_GUEST_VMLINUX")?,
            initrd: var("FERRO_GUEST_INITRD")?,
            rootfs: var("FERRO_GUEST_ROOTFS")?,
        })
    }
}

/// The `ferro` binary to test: $FERRO_BIN, or `ferro` from PATH.
pub fn ferro_bin() -> PathBuf {
    std::env::var_os("FERRO_BIN").map_or_else(|| PathBuf::from("ferro"), PathBuf::from)
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    fn collect(&self, mut source: impl Read + Send + 'static) -> JoinHandle<()> {
        let buffer = self.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = source.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buffer
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&chunk[..n]);
            }
        })
    }
}

/// How a VMM process ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code, or 128 + signal number if a signal killed it.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A running VMM process.
pub struct Vm {
    child: Child,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    /// Where progress is read for the stall watchdog (a `ferro run` with `--api-socket`).
    probe: Option<Box<dyn Probe>>,
    watch: StallWatch,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("pid", &self.child.id()).finish()
    }
}

impl Vm {
    /// Starts `program args` with its stdin on a pipe that stays open until [`Vm::send`]'s
    /// caller closes it with [`Vm::close_stdin`] or the VM ends. A `--api-socket` in `args`
    /// arms the stall watchdog ([`stall`]) of [`Vm::wait_for`].
    pub fn spawn(program: &PathBuf, args: &[String]) -> Result<Self, String> {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdout = Buffer::default();
        let stderr = Buffer::default();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(stdout.collect(out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(stderr.collect(err));
        }
        let probe = stall::api_socket_in(args)
            .map(|socket| Box::new(VmmProbe::new(&socket)) as Box<dyn Probe>);
        Ok(Vm {
            child,
            stdout,
            stderr,
            readers,
            started,
            probe,
            watch: StallWatch::new(STALL_LIMIT, started),
        })
    }

    /// Reads this VM's progress and stall report from `probe`, calling it stalled after
    /// `limit` without progress.
    pub fn watch_with(mut self, probe: Box<dyn Probe>, limit: Duration) -> Self {
        self.probe = Some(probe);
        self.watch = StallWatch::new(limit, Instant::now());
        self
    }

    /// Writes `bytes` to the process's stdin.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let stdin = self.child.stdin.as_mut().ok_or("stdin is closed")?;
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("cannot write stdin: {e}"))
    }

    /// Closes the process's stdin (it reads EOF).
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits until stdout holds `count` occurrences of `needle`; returns the time since spawn.
    /// A guest that stalls meanwhile (see [`stall`]) fails the wait with the VMM's stall
    /// report, as does the timeout.
    pub fn wait_for(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().matches(needle).count() >= count {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers catch up with what the process wrote before it exited.
                std::thread::sleep(Duration::from_millis(50));
                if self.stdout().matches(needle).count() >= count {
                    return Ok(self.started.elapsed());
                }
                return Err(format!(
                    "exited ({status}) before printing {needle:?} {count} time(s)\n{}",
                    self.transcript()
                ));
            }
            if let Some(stall) = self.stalled() {
                return Err(format!(
                    "no {needle:?} x{count}: {stall}\n{}",
                    self.transcript()
                ));
            }
            if Instant::now() > deadline {
                let report = self
                    .probe
                    .as_ref()
                    .map(|probe| format!("\n--- stall report ---\n{}", probe.report()))
                    .unwrap_or_default();
                return Err(format!(
                    "no {needle:?} x{count} within {timeout:?}{report}\n{}",
                    self.transcript()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // The process may have ended already: nothing left to signal then.
        let _ = host_sys::signal::kill(self.child.id(), signal);
    }

    /// Waits for the process to end, killing it after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Finished, String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > deadline => {
                    let transcript = self.transcript();
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "still running after {timeout:?}; killed\n{transcript}"
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("wait failed: {e}")),
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        Ok(Finished {
            code,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Whether the guest has stalled (see [`stall`]), said with the VMM's report.
    fn stalled(&mut self) -> Option<String> {
        let probe = self.probe.as_ref()?;
        let now = Instant::now();
        let activity = if self.watch.probe_due(now) {
            probe.activity().ok()
        } else {
            None
        };
        if !self.watch.observe(now, self.stdout.len(), activity) {
            return None;
        }
        Some(format!(
            "the guest stalled: no output, no exit to the VMM and no device work for {} s\n\
             --- stall report ---\n{}",
            self.watch.still_for(now).as_secs(),
            probe.report()
        ))
    }

    fn transcript(&self) -> String {
        format!(
            "--- stdout (tail) ---\n{}\n--- stderr ---\n{}",
            last_lines(&self.stdout(), 30),
            last_lines(&self.stderr(), 30)
        )
    }
}

/// The last `count` lines of `text`.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of process `pid` outside its guest RAM: the sum of `Rss` over all mappings
/// except the ones sized like guest RAM (between `guest_ram` and `guest_ram` + 8 MiB, which
/// covers QEMU's alignment padding). Returns (total RSS, RSS outside guest RAM) in bytes.
pub fn rss_outside_guest_ram(pid: u32, guest_ram: u64) -> Result<(u64, u64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("cannot read smaps of {pid}: {e}"))?;
    let (mut total, mut outside) = (0u64, 0u64);
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let size = end.saturating_sub(start);
                in_guest_ram = size >= guest_ram && size <= guest_ram + (8 << 20);
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib * 1024;
            if !in_guest_ram {
                outside += kib * 1024;
            }
        }
    }
    Ok((total, outside))
}

/// The median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn rss_of_this_process_is_positive() {
        let (total, outside) = rss_outside_guest_ram(std::process::id(), 1 << 40).unwrap();
        assert!(total > 0);
        assert_eq!(total, outside);
    }

    #[test]
    fn a_process_that_exits_early_is_reported() {
        let mut vm = Vm::spawn(
            &PathBuf::from("sh"),
            &["-c".into(), "echo hi; exit 3".into()],
        )
        .unwrap();
        let err = vm.wait_for("never", 1, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("exited"), "{err}");
        let done = vm.wait(Duration::from_secs(5)).unwrap();
        assert_eq!((done.code, done.stdout.as_str()), (3, "hi\n"));
    }

    /// A VM whose exit count never moves, with a report that says so.
    struct Frozen;

    impl Probe for Frozen {
        fn activity(&self) -> Result<u64, String> {
            Ok(42)
        }
        fn report(&self) -> String {
            "vcpu 0: rip 0xfff0, no exit since".into()
        }
    }

    #[test]
    fn a_stalled_guest_fails_the_wait_early_with_the_report() {
        let vm = Vm::spawn(
            &PathBuf::from("sh"),
            &["-c".into(), "echo booting; sleep 30".into()],
        )
        .unwrap();
        let mut vm = vm.watch_with(Box::new(Frozen), Duration::from_millis(300));
        let started = Instant::now();
        let err = vm
            .wait_for("never", 1, Duration::from_secs(25))
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(err.contains("the guest stalled"), "{err}");
        assert!(err.contains("vcpu 0: rip 0xfff0"), "{err}");
        assert!(err.contains("booting"), "{err}");
    }

    #[test]
    fn a_timeout_carries_the_report_too() {
        let mut vm = Vm::spawn(&PathBuf::from("sleep"), &["30".into()])
            .unwrap()
            .watch_with(Box::new(Frozen), Duration::from_secs(60));
        let err = vm
            .wait_for("never", 1, Duration::from_millis(200))
            .unwrap_err();
        assert!(err.contains("within"), "{err}");
        assert!(err.contains("--- stall report ---"), "{err}");
    }

    #[test]
    fn stdin_reaches_the_process() {
        let mut vm = Vm::spawn(
            &PathBuf::from("sh"),
            &["-c".into(), "read l; echo got:$l".into()],
        )
        .unwrap();
        vm.send(b"abc\n").unwrap();
        let done = vm.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(done.stdout, "got:abc\n");
    }

    #[test]
    fn a_hanging_process_is_killed() {
        let vm = Vm::spawn(&PathBuf::from("sleep"), &["30".into()]).unwrap();
        let err = vm.wait(Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("killed"), "{err}");
    }
}
