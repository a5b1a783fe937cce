//! A `ferro daemon` for end-to-end tests and benchmarks: started on a temporary socket and
//! state directory, driven through the `ferro` CLI, with the default guest defined from
//! [`GuestImages`].

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stall::{DaemonVmProbe, Probe, StallWatch, STALL_LIMIT};
use crate::{ferro_bin, GuestImages};

/// A daemon process and its directories.
#[derive(Debug)]
pub struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

/// What a CLI command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Daemon {
    /// Starts a daemon in a fresh directory under the system's temporary directory.
    pub fn start(tag: &str) -> Result<Daemon, String> {
        let dir = std::env::temp_dir().join(format!("ferro-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut daemon = Daemon { dir, child: None };
        daemon.restart()?;
        Ok(daemon)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("ferro.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where the tests' VM files are, which the daemon must accept in definitions: its own
    /// directory, the temporary directory, and those of the testbed's guest images.
    fn file_dirs(&self) -> Vec<PathBuf> {
        let images = [
            "FERRO_GUEST_KERNEL",
            "FERRO_GUEST_VMLINUX",
            "FERRO_GUEST_INITRD",
            "FERRO_GUEST_ROOTFS",
            "FERRO_BENCH_INITRD",
            "FERRO_SYSTEMD_DISK",
        ];
        let image_dirs = images.iter().filter_map(|var| {
            let path = PathBuf::from(std::env::var_os(var)?);
            path.parent().map(Path::to_path_buf)
        });
        [self.dir.clone(), std::env::temp_dir()]
            .into_iter()
            .chain(image_dirs)
            .collect()
    }

    /// Starts the daemon (again) and waits until it answers.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop()?;
        let child = Command::new(ferro_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(
                self.file_dirs()
                    .iter()
                    .flat_map(|dir| [OsStr::new("--file-dir"), dir.as_os_str()]),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["vm", "list"])?.code != 0 {
            if Instant::now() > deadline {
                return Err("the daemon did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM; its VMs keep running.
    pub fn stop(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            host_sys::signal::kill(child.id(), libc::SIGTERM).map_err(|e| e.to_string())?;
            let status = child.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("the daemon exited with {status}"));
            }
        }
        Ok(())
    }

    /// Runs `ferro ARGS` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput, String> {
        let out = Command::new(ferro_bin())
            .args(args)
            .env("FERRO_SOCKET", self.socket())
            .output()
            .map_err(|e| format!("cannot run ferro: {e}"))?;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `ferro ARGS` and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.cli(args)?;
        if out.code != 0 {
            return Err(format!(
                "ferro {args:?}: exit {}: {}{}",
                out.code, out.stdout, out.stderr
            ));
        }
        Ok(out.stdout)
    }

    /// Writes a definition of the default guest running `command` and defines it.
    pub fn define_guest(
        &self,
        images: &GuestImages,
        name: &str,
        memory: &str,
        command: &str,
        extra: &str,
    ) -> Result<(), String> {
        let path = self.dir.join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nmemory = \"{memory}\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
             cmdline = 'console=ttyS0 quiet ferro.run=\"{command}\"'\n{extra}",
            images.kernel.display(),
            images.initrd.display()
        );
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        self.ok(&["vm", "define", &path.display().to_string()])?;
        Ok(())
    }

    /// Defines and starts a pool `name` in the state directory; returns its directory.
    pub fn start_pool(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.state_dir().join(format!("pool-{name}"));
        let file = self.dir.join(format!("pool-{name}.toml"));
        let text = format!("name = \"{name}\"\npath = \"{}\"\n", dir.display());
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        self.ok(&["pool", "define", &file.display().to_string()])?;
        self.ok(&["pool", "start", name])?;
        Ok(dir)
    }

    /// The console log of VM `name`.
    pub fn console_log_path(&self, name: &str) -> PathBuf {
        self.state_dir()
            .join("logs")
            .join(format!("{name}.console.log"))
    }

    /// Waits until VM `name`'s console log holds `count` occurrences of `needle`; a guest
    /// that stalls meanwhile (see [`crate::stall`]) fails the wait with its stall report.
    pub fn wait_for_console(
        &self,
        name: &str,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let path = self.console_log_path(name);
        let probe = DaemonVmProbe::new(&self.socket(), name);
        let mut watch = StallWatch::new(STALL_LIMIT, start);
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.matches(needle).count() >= count {
                return Ok(start.elapsed());
            }
            let now = Instant::now();
            let activity = watch
                .probe_due(now)
                .then(|| probe.activity().ok())
                .flatten();
            if watch.observe(now, log.len(), activity) {
                return Err(format!(
                    "{name}: no {needle:?} x{count}: the guest stalled (no output, no exit to \
                     the VMM and no device work for {} s)\n--- stall report ---\n{}\n--- log ---\n{log}",
                    watch.still_for(now).as_secs(),
                    probe.report()
                ));
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "{name}: no {needle:?} x{count} in {timeout:?}\n--- stall report ---\n{}\n\
                     --- log ---\n{log}",
                    probe.report()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's resident memory in bytes.
    pub fn rss(&self) -> Result<u64, String> {
        let pid = self.pid().ok_or("the daemon is not running")?;
        rss_of(pid)
    }
}

/// VmRSS of process `pid` in bytes.
pub fn rss_of(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no VmRSS".into())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(out) = self.cli(&["vm", "list", "--json"]) {
                if let Ok(vms) = serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout) {
                    for vm in vms {
                        if let Some(name) = vm["name"].as_str() {
                            let _ = self.cli(&["vm", "destroy", name]);
                        }
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
