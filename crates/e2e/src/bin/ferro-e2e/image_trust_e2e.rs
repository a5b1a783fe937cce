//! A guest that writes a qcow2 header naming a host file into its raw disk must not read that
//! file after a restart: not through the daemon (the volume's format is recorded when it is
//! made), not through `ferro run` with `format=raw`; and a disk whose format `ferro run` had to
//! probe refuses the write outright.

use e2e::daemon::Daemon;

use crate::{
    boot_to_poweroff, check, guest_args, guest_value, host, images, with_devices, Scratch,
    TestResult,
};

/// MD5 of 512 zero bytes: a sector the guest never wrote, read as raw data.
const ZERO_SECTOR_MD5: &str = "bf619eac0cdf3f68d496ea9344137e8b";
/// Where the guest looks (8 MiB): zeros on its raw disk, the host file through a qcow2 header.
const PEEK_SECTOR: u64 = 16384;

/// Prints the MD5 of the sector at 8 MiB, then copies the payload disk (the hostile qcow2
/// header) over the start of its own disk and prints dd's status.
fn peek_then_write() -> String {
    format!(
        "echo PEEK $(dd if=/dev/vda bs=512 skip={PEEK_SECTOR} count=1 2>/dev/null | md5sum); \
         dd if=/dev/vdb of=/dev/vda bs=64k conv=fsync 2>/dev/null; echo WROTE $?"
    )
}

/// A host file the guest must never see, and a 1 MiB payload disk holding a qcow2 image
/// (16 MiB) that names it as backing file.
fn hostile_payload(scratch: &Scratch) -> Result<String, libtest_mimic::Failed> {
    let secret = scratch.0.join("secret").display().to_string();
    host(&format!("yes HOST-SECRET | head -c 16777216 > {secret}"))?;
    let evil = scratch.0.join("evil.qcow2").display().to_string();
    let ferro = crate::ferro_bin().display().to_string();
    host(&format!(
        "{ferro} img create -f qcow2 -b {secret} -F raw {evil} 16M && truncate -s 1M {evil}"
    ))?;
    Ok(evil)
}

fn check_peeks(log: &str, boots: usize) -> TestResult {
    let peeks: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("PEEK "))
        .collect();
    check(peeks.len() == boots, || {
        format!("{boots} PEEK lines expected:\n{log}")
    })?;
    check(peeks.iter().all(|p| p.starts_with(ZERO_SECTOR_MD5)), || {
        format!("the guest read something other than its own zeros:\n{log}")
    })
}

/// Through the daemon: a raw volume stays raw across restarts.
pub fn raw_volume_stays_raw_after_a_restart() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("trust-daemon")?;
    let payload = hostile_payload(&scratch)?;
    let d = Daemon::start("trust")?;
    d.start_pool("p")?;
    d.ok(&[
        "vol", "create", "disk.raw", "--pool", "p", "--size", "16M", "--format", "raw",
    ])?;
    d.define_guest(
        &images,
        "hostile",
        "256M",
        &peek_then_write(),
        &format!(
            "[[disks]]\nvolume = \"p/disk.raw\"\n\
             [[disks]]\npath = \"{payload}\"\nformat = \"raw\"\nreadonly = true\n"
        ),
    )?;
    for boot in 1..=2 {
        d.ok(&["vm", "start", "hostile"])?;
        crate::daemon_e2e::wait_for_state(&d, "hostile", api::daemon_api::DomainState::Shutoff)?;
        let log = std::fs::read_to_string(d.console_log_path("hostile")).unwrap_or_default();
        check(
            log.lines().filter(|l| l.trim() == "WROTE 0").count() == boot,
            || format!("boot {boot}: the guest could not write its own raw disk:\n{log}"),
        )?;
        check_peeks(&log, boot)?;
    }
    let info = d.ok(&["vol", "info", "disk.raw", "--pool", "p"])?;
    check(info.contains("raw") && !info.contains("qcow2"), || {
        info.clone()
    })
}

/// Through `ferro run ... format=raw`: the same.
pub fn raw_disk_stays_raw_with_format_raw() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("trust-run")?;
    let payload = hostile_payload(&scratch)?;
    let disk = scratch.file("disk.raw", "16M")?;
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(&peek_then_write())),
        &[
            "--disk",
            &format!("path={disk},format=raw"),
            "--disk",
            &format!("path={payload},format=raw,readonly=on"),
        ],
    );
    for _ in 0..2 {
        let done = boot_to_poweroff(&args, None)?;
        check(guest_value(&done.stdout, "WROTE")? == "0", || {
            done.stdout.clone()
        })?;
        check_peeks(&done.stdout, 1)?;
    }
    let head = std::fs::read(&disk).map_err(|e| e.to_string())?;
    check(head.starts_with(b"QFI\xfb"), || {
        "the guest's write to its own raw disk did not land".into()
    })
}

/// `ferro run` without a format: a warning, and the disguising write fails in the guest.
pub fn probed_raw_disk_refuses_a_disguise() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("trust-probed")?;
    let payload = hostile_payload(&scratch)?;
    let disk = scratch.file("disk.raw", "16M")?;
    // Then a write past sector 0, which must still work.
    let command = format!(
        "{}; printf LATER | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null; \
         echo LATER $?",
        peek_then_write()
    );
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(&command)),
        &[
            "--disk",
            &format!("path={disk}"),
            "--disk",
            &format!("path={payload},format=raw,readonly=on"),
        ],
    );
    let done = boot_to_poweroff(&args, None)?;
    check(done.stderr.contains("no format given"), || {
        format!("no warning about probing:\n{}", done.stderr)
    })?;
    check(guest_value(&done.stdout, "WROTE")? != "0", || {
        format!("the guest's disguising write succeeded:\n{}", done.stdout)
    })?;
    let head = std::fs::read(&disk).map_err(|e| e.to_string())?;
    check(!head.starts_with(b"QFI\xfb"), || {
        "a qcow2 header landed on the probed raw disk".into()
    })?;
    check(
        guest_value(&done.stdout, "LATER")? == "0" && &head[4096..4101] == b"LATER",
        || format!("a write past sector 0 failed:\n{}", done.stdout),
    )
}
