//! `ferro-bench systemd-stalls [--runs N]`: issue 23's daemon loop. A Debian 12 guest with
//! systemd as init (`tools/testbed --with-systemd-guest`, its disk in FERRO_SYSTEMD_DISK) is
//! started through `ferro daemon` and shut down with the ACPI power button (`ferro vm
//! shutdown`), N times (30). QEMU boots the same disk with the same kernel and powers it off
//! the same way (`system_powerdown`), interleaved, as the control. Each cycle counts as clean,
//! stalled (no progress for the stall limit, with the stall report) or crashed (the VMM died,
//! the guest panicked or reset, or it did not power off).
//!
//! Threading: the caller's; one guest at a time, on the same disk.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::daemon_api::{DomainState, VmDetails};
use e2e::daemon::Daemon;
use e2e::kvm_stats;
use e2e::qemu_monitor::QemuSockets;
use e2e::stall::STALL_LIMIT;
use e2e::{last_lines, GuestImages, Vm};

use crate::stalls::{classify, count_rounds, qemu_machine, Ending, Side};

const NAME: &str = "sysd";
/// Printed on ttyS0 by the guest's ferro-ready.service once multi-user.target is reached.
const READY: &str = "ferro-systemd: ready";
const CPUS: &str = "2";
const MEMORY: &str = "512M";
/// No `quiet`: systemd's progress on the console shows where a stalled boot stood. panic=-1
/// with no reboot: a guest panic ends the VMM.
const CMDLINE: &str = "console=ttyS0 ferro.root=/dev/vda panic=-1";
/// Generous: systemd's boot takes minutes in a busy nested testbed, and a guest that stops
/// making progress is caught by the stall watchdog long before.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
/// From the power button to the VMM's exit.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(120);

pub fn run(runs: usize) -> Result<(), String> {
    let images = GuestImages::from_env()?;
    let disk = std::env::var("FERRO_SYSTEMD_DISK").map_err(|_| {
        "FERRO_SYSTEMD_DISK is not set; run under tools/testbed run --with-systemd-guest"
    })?;
    kvm_stats::mount_debugfs();
    let daemon = Daemon::start("systemd")?;
    define(&daemon, &images, &disk)?;
    println!(
        "systemd loop: {runs} cycles each of ferro (through the daemon) and qemu: boot the \
         systemd guest on {disk} to {READY:?}, press the power button, wait for the VMM to \
         exit; {CPUS} vCPUs, {MEMORY}; stall limit {} s",
        STALL_LIMIT.as_secs()
    );
    count_rounds("systemd loop", runs, |side, run| match side {
        Side::Ferro => ferro_cycle(&daemon),
        Side::Qemu => qemu_cycle(&images, &disk, run),
    })
}

fn define(daemon: &Daemon, images: &GuestImages, disk: &str) -> Result<(), String> {
    let text = format!(
        "name = \"{NAME}\"\nmemory = \"{MEMORY}\"\ncpus = {CPUS}\nkernel = \"{}\"\n\
         initrd = \"{}\"\ncmdline = \"{CMDLINE}\"\n\n[[disks]]\npath = \"{disk}\"\n\
         format = \"raw\"\n",
        images.kernel.display(),
        images.initrd.display()
    );
    let path = std::env::temp_dir().join(format!("{NAME}.toml"));
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    daemon.ok(&["vm", "define", &path.display().to_string()])?;
    Ok(())
}

fn details(daemon: &Daemon) -> Result<VmDetails, String> {
    let out = daemon.ok(&["vm", "info", NAME, "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("vm info: {e}: {out}"))
}

/// One start, boot and shutdown through the daemon. The console log is appended across
/// starts, so this boot is up once it holds one ready line more than before the start.
fn ferro_cycle(daemon: &Daemon) -> Result<Ending, String> {
    let ready_before = console_log(daemon).matches(READY).count();
    let started = Instant::now();
    daemon.ok(&["vm", "start", NAME])?;
    if let Err(e) = daemon.wait_for_console(NAME, READY, ready_before + 1, BOOT_LIMIT) {
        let ending = ferro_failure(daemon, e)?;
        // Whatever it stands in, the next cycle starts from a stopped VM.
        let _ = daemon.cli(&["vm", "destroy", NAME]);
        return Ok(ending);
    }
    daemon.ok(&["vm", "shutdown", NAME])?;
    let deadline = Instant::now() + SHUTDOWN_LIMIT;
    loop {
        let vm = details(daemon)?;
        match vm.state {
            DomainState::Shutoff => return Ok(Ending::Clean(started.elapsed().as_secs_f64())),
            DomainState::Crashed => {
                return Ok(Ending::Crashed(format!(
                    "crashed while shutting down: {}\n{}",
                    vm.reason.unwrap_or_default(),
                    console_tail(daemon)
                )))
            }
            _ if Instant::now() > deadline => {
                let report = daemon.cli(&["vm", "diagnose", NAME])?.stdout;
                let _ = daemon.cli(&["vm", "destroy", NAME]);
                return Ok(Ending::Stalled(format!(
                    "still {} {} s after the power button\n--- stall report ---\n{report}\n{}",
                    vm.state,
                    SHUTDOWN_LIMIT.as_secs(),
                    console_tail(daemon)
                )));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A boot that did not reach READY: a crash when the daemon says the VMM died or ended (a
/// guest panic, a triple fault), else what the wait said (a stall, with its report).
fn ferro_failure(daemon: &Daemon, error: String) -> Result<Ending, String> {
    let vm = details(daemon)?;
    Ok(match vm.state {
        DomainState::Crashed | DomainState::Shutoff => Ending::Crashed(format!(
            "{} before {READY:?}: {}\n{}",
            vm.state,
            vm.reason.unwrap_or_default(),
            console_tail(daemon)
        )),
        _ => classify(error),
    })
}

fn console_log(daemon: &Daemon) -> String {
    std::fs::read_to_string(daemon.console_log_path(NAME)).unwrap_or_default()
}

fn console_tail(daemon: &Daemon) -> String {
    format!(
        "--- console (tail) ---\n{}",
        last_lines(&console_log(daemon), 30)
    )
}

/// One boot and power-off of the same disk under QEMU.
fn qemu_cycle(images: &GuestImages, disk: &str, run: usize) -> Result<Ending, String> {
    let qemu = QemuSockets::new(&format!("systemd-{run}"));
    let kernel = images.kernel.display().to_string();
    let initrd = images.initrd.display().to_string();
    let mut args = qemu.args();
    args.extend(qemu_machine(CPUS, MEMORY));
    args.extend(
        [
            "-kernel",
            &kernel,
            "-initrd",
            &initrd,
            "-append",
            CMDLINE,
            "-drive",
            &format!("file={disk},if=virtio,format=raw"),
        ]
        .map(String::from),
    );
    let started = Instant::now();
    let mut vm = Vm::spawn(&PathBuf::from("qemu-system-x86_64"), &args)?;
    vm.close_stdin();
    let (mut vm, events) = qemu.watch(vm, STALL_LIMIT)?;
    if let Err(e) = vm.wait_for(READY, 1, BOOT_LIMIT) {
        return Ok(match classify(e) {
            Ending::Crashed(what) => Ending::Crashed(format!("{what}\n{}", events.explain())),
            ending => ending,
        });
    }
    monitor_command(qemu.monitor(), "system_powerdown")?;
    match vm.wait(SHUTDOWN_LIMIT) {
        Ok(done) => {
            // A clean power-off is the guest's own shutdown, not a reset or a panic.
            let why = events.explain();
            if done.code == 0 && why.ends_with("reason guest-shutdown") {
                return Ok(Ending::Clean(started.elapsed().as_secs_f64()));
            }
            Ok(Ending::Crashed(format!(
                "exit code {} after the power button; {why}\n{}\n{}",
                done.code,
                last_lines(&done.stdout, 30),
                last_lines(&done.stderr, 30)
            )))
        }
        Err(e) => Ok(Ending::Stalled(format!(
            "not off {} s after the power button\n{e}",
            SHUTDOWN_LIMIT.as_secs()
        ))),
    }
}

/// Sends one command to QEMU's human monitor; its answer is not needed.
fn monitor_command(socket: &Path, command: &str) -> Result<(), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| format!("{command}: {e}"))?;
    // Give the monitor the command before the connection closes.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}
