//! The daemon and CLI with the default guest (real Linux): define and start through the CLI,
//! see it in `vm list`, use its live console, read its stats, suspend and resume, shut it down
//! gracefully (ACPI power button, the guest's acpid), restart the daemon while a VM runs and
//! manage it afterwards, a SIGKILLed VMM reported as crashed, autostart after a daemon restart,
//! destroy; and two VMs on linked clones of one pool volume, whose writes stay apart.

use std::time::Duration;

use api::daemon_api::{DomainState, VmDetails, VmStats};
use e2e::daemon::{alive, Daemon};
use e2e::{ferro_bin, Vm, READY};

use crate::{check, images, TestResult, BOOT_TIMEOUT};

fn details(d: &Daemon, name: &str) -> Result<VmDetails, String> {
    let out = d.ok(&["vm", "info", name, "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("vm info: {e}: {out}"))
}

pub(crate) fn wait_for_state(
    d: &Daemon,
    name: &str,
    state: DomainState,
) -> Result<VmDetails, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let details = details(d, name)?;
        if details.state == state {
            return Ok(details);
        }
        if std::time::Instant::now() > deadline || details.state == DomainState::Crashed {
            return Err(format!(
                "{name} is {}, not {state} ({})",
                details.state,
                details.reason.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn manage_the_default_guest() -> TestResult {
    let images = images()?;
    let mut d = Daemon::start("e2e")?;
    d.define_guest(&images, "web", "256M", "sh", "")?;
    d.define_guest(&images, "other", "256M", "sleep 600", "autostart = true\n")?;
    d.ok(&["vm", "start", "web"])?;
    d.wait_for_console("web", READY, 1, BOOT_TIMEOUT)?;
    let list = d.ok(&["vm", "list"])?;
    check(
        list.lines()
            .any(|l| l.starts_with("web ") && l.contains("running")),
        || list.clone(),
    )?;

    // The live console: a shell answers.
    let socket = d.socket().display().to_string();
    let mut console = Vm::spawn(
        &ferro_bin(),
        &["vm", "console", "web", "--socket", &socket].map(String::from),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    console.send(b"echo live-$((40+2))\n")?;
    console.wait_for("live-42", 1, Duration::from_secs(60))?;
    drop(console);

    let stats: VmStats = serde_json::from_str(&d.ok(&["vm", "stats", "web", "--json"])?)
        .map_err(|e| e.to_string())?;
    check(
        stats.cpu_time_ns > 0 && stats.vcpu_time_ns[0] > 0 && stats.rss_bytes > 0,
        || format!("{stats:?}"),
    )?;
    d.ok(&["vm", "suspend", "web"])?;
    check(details(&d, "web")?.state == DomainState::Paused, || {
        "not paused".into()
    })?;
    d.ok(&["vm", "resume", "web"])?;

    d.ok(&["vm", "shutdown", "web", "--timeout", "120"])?;
    let off = details(&d, "web")?;
    check(
        off.state == DomainState::Shutoff && off.reason.as_deref() == Some("powered-off"),
        || format!("{off:?}"),
    )?;
    let log = std::fs::read_to_string(d.console_log_path("web")).unwrap_or_default();
    check(log.contains("ferro-guest: power button"), || log.clone())?;

    // The daemon restarts while the VM runs; autostart brings the other one up.
    d.ok(&["vm", "start", "web"])?;
    d.wait_for_console("web", READY, 2, BOOT_TIMEOUT)?;
    let pid = details(&d, "web")?.pid.ok_or("no pid")?;
    d.stop()?;
    check(alive(pid), || "stopping the daemon killed the VM".into())?;
    d.restart()?;
    let found = details(&d, "web")?;
    check(
        found.state == DomainState::Running && found.pid == Some(pid),
        || format!("{found:?}"),
    )?;
    wait_for_state(&d, "other", DomainState::Running)?;
    d.wait_for_console("other", READY, 1, BOOT_TIMEOUT)?;
    d.ok(&["vm", "suspend", "web"])?;
    d.ok(&["vm", "resume", "web"])?;

    host_sys::signal::kill(pid, libc::SIGKILL).map_err(|e| e.to_string())?;
    let crashed = wait_for_state(&d, "web", DomainState::Crashed)?;
    check(crashed.reason.is_some(), || format!("{crashed:?}"))?;

    d.ok(&["vm", "destroy", "other"])?;
    check(details(&d, "other")?.state == DomainState::Shutoff, || {
        "other still runs".into()
    })
}

/// Writes `data` at `offset` of the file at `path`.
fn write_at(path: &std::path::Path, offset: u64, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all_at(data, offset).map_err(|e| e.to_string())
}

/// Two VMs on two linked clones of one base volume: what one writes, the other and the base
/// do not see.
pub fn linked_clones_keep_writes_apart() -> TestResult {
    let images = images()?;
    let d = Daemon::start("clones")?;
    let dir = d.start_pool("p")?;
    d.ok(&[
        "vol", "create", "base.raw", "--pool", "p", "--size", "16M", "--format", "raw",
    ])?;
    write_at(&dir.join("base.raw"), 1 << 20, b"BASE-DATA")?;
    for clone in ["a.qcow2", "b.qcow2"] {
        d.ok(&["vol", "clone", "base.raw", clone, "--pool", "p", "--linked"])?;
    }
    let read_back = "echo HEAD $(dd if=/dev/vda bs=1 skip=1048576 count=9 2>/dev/null)";
    let write = format!(
        "printf CLONE-A-X | dd of=/dev/vda bs=1 seek=1048576 conv=notrunc,fsync 2>/dev/null; {read_back}"
    );
    d.define_guest(
        &images,
        "va",
        "256M",
        &write,
        "[[disks]]\nvolume = \"p/a.qcow2\"\n",
    )?;
    d.define_guest(
        &images,
        "vb",
        "256M",
        read_back,
        "[[disks]]\nvolume = \"p/b.qcow2\"\n",
    )?;
    for (vm, expected) in [("va", "HEAD CLONE-A-X"), ("vb", "HEAD BASE-DATA")] {
        d.ok(&["vm", "start", vm])?;
        wait_for_state(&d, vm, DomainState::Shutoff)?;
        let log = std::fs::read_to_string(d.console_log_path(vm)).unwrap_or_default();
        check(log.contains(expected), || {
            format!("{vm}: no {expected:?} in\n{log}")
        })?;
    }
    let base = std::fs::read(dir.join("base.raw")).map_err(|e| e.to_string())?;
    check(&base[1 << 20..(1 << 20) + 9] == b"BASE-DATA", || {
        "the base volume changed".into()
    })
}
