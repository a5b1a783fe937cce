//! End-to-end tests of `ferro run` with the default test guest (Debian's cloud kernel and a
//! busybox initramfs). Run inside `tools/testbed`, which provides real KVM, the `ferro` binary
//! and the guest images. Tests run one at a time (each boots a VM); any libtest filter works:
//! `ferro-e2e boot`, `ferro-e2e --list`.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::resume::{self, Test};
use e2e::{ferro_bin, Finished, GuestImages, Vm, READY};
use libtest_mimic::{Arguments, Failed};

mod daemon_e2e;
mod image_trust_e2e;
mod network_e2e;
mod vm_api;

/// Upper bound for one boot to the ready line (nested, emulated hardware is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Bytes of RAM below 1 MiB that are not usable (EBDA and the legacy hole), see e820.
const LEGACY_HOLE: u64 = 0x10_0000 - 0x9_fc00;

type TestResult = Result<(), Failed>;

fn check(condition: bool, message: impl FnOnce() -> String) -> TestResult {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

fn images() -> Result<GuestImages, Failed> {
    GuestImages::from_env().map_err(Failed::from)
}

/// `ferro run` arguments for the default guest running `command` (none: just power off).
fn guest_args(images: &GuestImages, cpus: u32, memory: &str, command: Option<&str>) -> Vec<String> {
    // nokaslr: a testbed hang's vCPU dump can then be read against the guest's kallsyms.
    let mut cmdline = String::from("console=ttyS0 quiet nokaslr");
    if let Some(command) = command {
        cmdline.push_str(&format!(" ferro.run=\"{command}\""));
    }
    // Every VM has its control API: the stall watchdog of `Vm::wait_for` reads it.
    static VMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = VMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let socket = std::env::temp_dir().join(format!("ferro-e2e-{}-{n}.sock", std::process::id()));
    // Tests replace arguments by their index: the socket goes last.
    vec![
        "run".into(),
        "--kernel".into(),
        images.kernel.display().to_string(),
        "--initrd".into(),
        images.initrd.display().to_string(),
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        memory.into(),
        "--cmdline".into(),
        cmdline,
        "--api-socket".into(),
        socket.display().to_string(),
    ]
}

/// Boots, sends `input` once the guest is ready, waits for the guest to power off, and checks
/// that `ferro` exited 0.
fn boot_to_poweroff(args: &[String], input: Option<&[u8]>) -> Result<Finished, Failed> {
    let mut vm = Vm::spawn(&ferro_bin(), args)?;
    vm.wait_for(READY, 1, BOOT_TIMEOUT)?;
    if let Some(input) = input {
        vm.send(input)?;
    }
    let done = vm.wait(BOOT_TIMEOUT)?;
    check(done.code == 0, || {
        format!("exit code {}\n{}\n{}", done.code, done.stdout, done.stderr)
    })?;
    check(!done.stderr.contains("hardware virtualization"), || {
        format!("unexpected warning on a host with KVM: {}", done.stderr)
    })?;
    Ok(done)
}

/// Sum of the usable RAM in the guest's E820 map, from `dmesg` lines `BIOS-e820: [mem A-B] usable`.
fn e820_usable(dmesg: &str) -> u64 {
    dmesg
        .lines()
        .filter(|l| l.contains("BIOS-e820:") && l.trim_end().ends_with("usable"))
        .filter_map(|l| {
            let range = l.split("[mem ").nth(1)?.split(']').next()?;
            let (start, end) = range.split_once('-')?;
            let parse = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            Some(parse(end)? + 1 - parse(start)?)
        })
        .sum()
}

fn boots_with(cpus: u32, memory: &str, bytes: u64) -> TestResult {
    let images = images()?;
    let command = "echo cpus=$(nproc); dmesg | grep BIOS-e820";
    let done = boot_to_poweroff(&guest_args(&images, cpus, memory, Some(command)), None)?;
    check(done.stdout.contains(&format!("cpus={cpus}")), || {
        format!("guest did not see {cpus} CPUs:\n{}", done.stdout)
    })?;
    let usable = e820_usable(&done.stdout);
    check(usable == bytes - LEGACY_HOLE, || {
        format!(
            "guest sees {usable} bytes of RAM, expected {}:\n{}",
            bytes - LEGACY_HOLE,
            done.stdout
        )
    })?;
    check(done.stdout.contains("ferro-guest: exit 0"), || {
        "guest command failed".into()
    })
}

fn pvh_vmlinux_boots() -> TestResult {
    let images = images()?;
    let mut args = guest_args(&images, 1, "256M", Some("echo pvh-ok"));
    args[2] = images.vmlinux.display().to_string();
    let done = boot_to_poweroff(&args, None)?;
    check(done.stdout.contains("pvh-ok"), || done.stdout.clone())
}

fn poweroff_from_the_guest_exits_zero() -> TestResult {
    let images = images()?;
    let done = boot_to_poweroff(&guest_args(&images, 1, "256M", Some("poweroff -f")), None)?;
    check(!done.stdout.contains("ferro-guest: exit"), || {
        format!(
            "the command returned instead of powering off:\n{}",
            done.stdout
        )
    })
}

fn reboot_restarts_the_guest() -> TestResult {
    let images = images()?;
    let mut vm = Vm::spawn(
        &ferro_bin(),
        &guest_args(&images, 2, "256M", Some("reboot -f")),
    )?;
    vm.wait_for(READY, 2, BOOT_TIMEOUT * 2)?;
    vm.signal(libc::SIGTERM);
    let done = vm.wait(Duration::from_secs(30))?;
    check(done.code == 128 + libc::SIGTERM, || {
        format!("exit code {} after SIGTERM\n{}", done.code, done.stderr)
    })
}

fn no_reboot_turns_a_reboot_into_an_exit() -> TestResult {
    let images = images()?;
    let mut args = guest_args(&images, 1, "256M", Some("reboot -f"));
    args.push("--no-reboot".into());
    let done = boot_to_poweroff(&args, None)?;
    check(done.stdout.matches(READY).count() == 1, || {
        done.stdout.clone()
    })
}

fn guest_has_wall_clock_time() -> TestResult {
    let images = images()?;
    let done = boot_to_poweroff(
        &guest_args(&images, 1, "256M", Some("echo clock=$(date +%s)")),
        None,
    )?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let guest: i64 = done
        .stdout
        .split("clock=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no clock in output:\n{}", done.stdout))?;
    check((now - guest).abs() < 300, || {
        format!("guest clock {guest}, host clock {now}")
    })
}

fn console_input_reaches_the_guest() -> TestResult {
    let images = images()?;
    let args = guest_args(&images, 1, "256M", Some("read line; echo got:$line"));
    let done = boot_to_poweroff(&args, Some(b"hello from the host\n"))?;
    check(done.stdout.contains("got:hello from the host"), || {
        done.stdout.clone()
    })
}

/// Runs `ferro` with `args` and expects exit `code` and a one-line error on stderr.
fn expect_error(args: &[String], code: i32, message: &str) -> TestResult {
    let mut vm = Vm::spawn(&ferro_bin(), args)?;
    vm.close_stdin();
    let done = vm.wait(Duration::from_secs(60))?;
    check(done.code == code, || {
        format!(
            "{args:?}: exit code {}, expected {code}\n{}{}",
            done.code, done.stdout, done.stderr
        )
    })?;
    let errors: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.contains("error"))
        .collect();
    check(errors.len() == 1 && errors[0].contains(message), || {
        format!(
            "{args:?}: expected one error line with {message:?}, got:\n{}",
            done.stderr
        )
    })
}

fn bad_inputs_give_their_errors() -> TestResult {
    let images = images()?;
    let with = |field: usize, value: &str| {
        let mut args = guest_args(&images, 1, "256M", None);
        args[field] = value.into();
        args
    };
    let dir = std::env::temp_dir().join(format!("ferro-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let text = dir.join("not-a-kernel");
    std::fs::write(&text, "#!/bin/sh\necho hello\n".repeat(200)).map_err(|e| e.to_string())?;
    let huge_initrd = dir.join("huge-initrd");
    let file = std::fs::File::create(&huge_initrd).map_err(|e| e.to_string())?;
    file.set_len(300 << 20).map_err(|e| e.to_string())?;

    expect_error(
        &with(2, "/nonexistent/vmlinuz"),
        3,
        "cannot open the kernel",
    )?;
    expect_error(
        &with(2, &text.display().to_string()),
        3,
        "not a Linux kernel",
    )?;
    expect_error(&with(2, "/"), 3, "cannot read the kernel image")?;
    expect_error(
        &with(4, "/nonexistent/initrd"),
        3,
        "cannot open the initramfs",
    )?;
    expect_error(
        &with(4, &huge_initrd.display().to_string()),
        3,
        "does not fit",
    )?;
    expect_error(&with(6, "0"), 2, "at least one vCPU")?;
    expect_error(&with(6, "65"), 2, "at most 64")?;
    expect_error(&with(8, "64M"), 2, "too small")?;
    expect_error(&with(8, "100T"), 2, "the host has only")?;
    expect_error(&with(8, "lots"), 2, "invalid size")?;
    expect_error(
        &with(10, &"x".repeat(5000)),
        2,
        "command line is 5000 bytes",
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn kvm_without_permission_is_reported() -> TestResult {
    let images = images()?;
    let kvm = std::path::Path::new("/dev/kvm");
    let original = std::fs::metadata(kvm)
        .map_err(|e| e.to_string())?
        .permissions();
    std::fs::set_permissions(kvm, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let output = std::process::Command::new(ferro_bin())
        .args(guest_args(&images, 1, "256M", None))
        .uid(65534)
        .gid(65534)
        .output();
    std::fs::set_permissions(kvm, original).map_err(|e| e.to_string())?;
    let output = output.map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    check(output.status.code() == Some(4), || {
        format!("exit {:?}: {stderr}", output.status)
    })?;
    check(
        stderr.contains("cannot open /dev/kvm") && stderr.contains("ermission denied"),
        || stderr.to_string(),
    )
}

/// Runs a shell command on the (outer) host; fails the test if it fails.
fn host(command: &str) -> Result<String, Failed> {
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .map_err(|e| format!("{command}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command}: exit {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The md5 of the first `len` bytes of `path` on the host.
fn host_md5(path: &str, len: u64) -> Result<String, Failed> {
    let out = host(&format!("head -c {len} {path} | md5sum"))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The md5 a guest printed after `marker` (a line `MARKER <md5>`).
fn guest_value(stdout: &str, marker: &str) -> Result<String, Failed> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(marker).map(|v| v.trim().to_string()))
        .ok_or_else(|| format!("no {marker:?} in the guest's output:\n{stdout}").into())
}

/// A scratch directory on the host, removed afterwards.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self, Failed> {
        let dir = std::env::temp_dir().join(format!("ferro-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(Scratch(dir))
    }

    fn file(&self, name: &str, size: &str) -> Result<String, Failed> {
        let path = self.0.join(name).display().to_string();
        host(&format!("truncate -s {size} {path}"))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn with_devices(mut args: Vec<String>, devices: &[&str]) -> Vec<String> {
    args.extend(devices.iter().map(|d| d.to_string()));
    args
}

const MIB_64: u64 = 64 << 20;

fn block_data_reaches_the_image() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("blk")?;
    let disk = scratch.file("disk.raw", "128M")?;
    let command = "head -c 67108864 /dev/urandom > /tmp/d; dd if=/tmp/d of=/dev/vda bs=1M 2>/dev/null; sync; echo GUEST-MD5 $(md5sum < /tmp/d)";
    let args = with_devices(
        guest_args(&images, 1, "512M", Some(command)),
        &["--disk", &format!("path={disk},format=raw")],
    );
    let done = boot_to_poweroff(&args, None)?;
    let guest = guest_value(&done.stdout, "GUEST-MD5")?;
    let guest = guest.split_whitespace().next().unwrap_or_default();
    let image = host_md5(&disk, MIB_64)?;
    check(guest == image, || {
        format!("guest wrote {guest}, the image holds {image}")
    })
}

fn block_synced_data_survives_sigkill() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("kill")?;
    let disk = scratch.file("disk.raw", "64M")?;
    let command = "head -c 4194304 /dev/urandom > /tmp/d; dd if=/tmp/d of=/dev/vda bs=64k 2>/dev/null; sync; echo GUEST-MD5 $(md5sum < /tmp/d); echo SYNCED; sleep 600";
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(command)),
        &["--disk", &format!("path={disk},format=raw")],
    );
    let mut vm = Vm::spawn(&ferro_bin(), &args)?;
    vm.wait_for("SYNCED", 1, BOOT_TIMEOUT)?;
    let stdout = vm.stdout();
    vm.signal(libc::SIGKILL);
    let done = vm.wait(Duration::from_secs(30))?;
    check(done.code == 128 + libc::SIGKILL, || {
        format!("exit {}", done.code)
    })?;
    let guest = guest_value(&stdout, "GUEST-MD5")?;
    let guest = guest.split_whitespace().next().unwrap_or_default();
    let image = host_md5(&disk, 4 << 20)?;
    check(guest == image, || {
        format!("guest synced {guest}, the image holds {image}")
    })
}

fn block_read_only_disk_refuses_writes() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("ro")?;
    let disk = scratch.file("ro.raw", "16M")?;
    host(&format!(
        "printf ferro-read-only | dd of={disk} conv=notrunc 2>/dev/null"
    ))?;
    let before = host_md5(&disk, 16 << 20)?;
    let command = "echo RO $(cat /sys/block/vda/ro); dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null && echo WRITE-OK || echo WRITE-REFUSED; echo HEAD $(head -c 15 /dev/vda)";
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(command)),
        &["--disk", &format!("path={disk},format=raw,readonly=on")],
    );
    let done = boot_to_poweroff(&args, None)?;
    check(guest_value(&done.stdout, "RO")? == "1", || {
        done.stdout.clone()
    })?;
    check(done.stdout.contains("WRITE-REFUSED"), || {
        done.stdout.clone()
    })?;
    check(
        guest_value(&done.stdout, "HEAD")? == "ferro-read-only",
        || done.stdout.clone(),
    )?;
    check(host_md5(&disk, 16 << 20)? == before, || {
        "the read-only image changed".into()
    })
}

fn block_two_disks_with_serials() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("two")?;
    let a = scratch.file("a.raw", "32M")?;
    let b = scratch.file("b.raw", "48M")?;
    // Two vCPUs: vda gets a request queue per vCPU, vdb the one queue it asks for.
    let command = "for d in vda vdb; do echo DISK-$d $(cat /sys/block/$d/size) $(cat /sys/block/$d/serial); echo QUEUES-$d $(ls /sys/block/$d/mq | wc -l); done; echo one > /tmp/x; dd if=/tmp/x of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null; sync";
    let args = with_devices(
        guest_args(&images, 2, "256M", Some(command)),
        &[
            "--disk",
            &format!("path={a},format=raw,serial=first-disk"),
            "--disk",
            &format!("path={b},format=raw,serial=second,num_queues=1"),
        ],
    );
    let done = boot_to_poweroff(&args, None)?;
    for (disk, queues) in [("vda", "2"), ("vdb", "1")] {
        check(
            guest_value(&done.stdout, &format!("QUEUES-{disk}"))? == queues,
            || format!("{disk} should have {queues} queues\n{}", done.stdout),
        )?;
    }
    check(
        guest_value(&done.stdout, "DISK-vda")? == "65536 first-disk",
        || done.stdout.clone(),
    )?;
    check(
        guest_value(&done.stdout, "DISK-vdb")? == "98304 second",
        || done.stdout.clone(),
    )?;
    check(host(&format!("head -c 3 {b}"))? == "one", || {
        "vdb's data is not in the second image".into()
    })
}

/// Reads `len` bytes at `offset` of an image through the block crate (any format).
fn image_bytes(path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Failed> {
    let mut image =
        block::open(std::path::Path::new(path), true, None).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; len];
    image
        .read_at(offset, &[vm_memory::VolatileSlice::from(&mut bytes[..])])
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn block_qcow2_overlay_keeps_the_base_unchanged() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("qcow2")?;
    let base = scratch.file("base.raw", "64M")?;
    host(&format!(
        "head -c 8388608 /dev/urandom | dd of={base} conv=notrunc 2>/dev/null"
    ))?;
    let payload = scratch.file("payload.raw", "4M")?;
    host(&format!(
        "head -c 4194304 /dev/urandom | dd of={payload} conv=notrunc 2>/dev/null"
    ))?;
    let base_before = host_md5(&base, 64 << 20)?;
    let overlay = scratch.0.join("overlay.qcow2").display().to_string();
    let ferro = ferro_bin().display().to_string();
    host(&format!("{ferro} img create -b base.raw -F raw {overlay}"))?;
    // The guest sees the base through the overlay, then writes into the middle of it.
    let command = "echo BASE-MD5 $(head -c 8388608 /dev/vda | md5sum); \
        dd if=/dev/vdb of=/dev/vda bs=64k seek=64 conv=fsync 2>/dev/null; \
        dd if=/dev/vdb of=/dev/vda bs=512 seek=1 count=3 conv=fsync 2>/dev/null; \
        echo SIZE $(cat /sys/block/vda/size)";
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(command)),
        &[
            "--disk",
            &format!("path={overlay},format=qcow2"),
            "--disk",
            &format!("path={payload},format=raw,readonly=on"),
        ],
    );
    let done = boot_to_poweroff(&args, None)?;
    let seen = guest_value(&done.stdout, "BASE-MD5")?;
    let expected = host_md5(&base, 8 << 20)?;
    check(
        seen.split_whitespace().next() == Some(expected.as_str()),
        || format!("the guest read {seen} through the overlay, the base holds {expected}"),
    )?;
    check(guest_value(&done.stdout, "SIZE")? == "131072", || {
        done.stdout.clone()
    })?;
    check(host_md5(&base, 64 << 20)? == base_before, || {
        "the base changed".into()
    })?;
    let payload_bytes = std::fs::read(&payload).map_err(|e| e.to_string())?;
    check(
        image_bytes(&overlay, 4 << 20, 4 << 20)? == payload_bytes,
        || "the overlay does not hold what the guest wrote at 4 MiB".into(),
    )?;
    // A partial-cluster write keeps the rest of the cluster from the base.
    let head = image_bytes(&overlay, 0, 65536)?;
    let base_head = image_bytes(&base, 0, 65536)?;
    check(
        head[..512] == base_head[..512]
            && head[512..2048] == payload_bytes[..1536]
            && head[2048..] == base_head[2048..],
        || "the first cluster mixes base and new data wrongly".into(),
    )?;
    let info = host(&format!("{ferro} img info --json {overlay}"))?;
    let thin = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"actual-size\": "))
        .and_then(|v| v.trim_end_matches(',').parse::<u64>().ok())
        .is_some_and(|size| size < 8 << 20);
    check(thin, || format!("the overlay is not thin: {info}"))
}

fn pci_ids_are_the_virtio_ones() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("ids")?;
    let disk = scratch.file("d.raw", "8M")?;
    let command =
        "for d in /sys/bus/pci/devices/*; do echo PCI $(cat $d/vendor):$(cat $d/device); done";
    let args = with_devices(
        guest_args(&images, 1, "256M", Some(command)),
        &[
            "--disk",
            &format!("path={disk},format=raw"),
            "--net",
            "tap=fe2eids0",
            "--rng",
        ],
    );
    let done = boot_to_poweroff(&args, None)?;
    for id in [
        "0x1b36:0x0008",
        "0x1af4:0x1042",
        "0x1af4:0x1041",
        "0x1af4:0x1044",
    ] {
        check(done.stdout.contains(&format!("PCI {id}")), || {
            format!("no PCI device {id}:\n{}", done.stdout)
        })?;
    }
    check(
        !std::path::Path::new("/sys/class/net/fe2eids0").exists(),
        || "the TAP device Ferro created is still there".into(),
    )
}

fn rng_feeds_hwrng() -> TestResult {
    let images = images()?;
    let command =
        "echo RNG $(cat /sys/class/misc/hw_random/rng_current) $(head -c 4096 /dev/hwrng | wc -c)";
    let args = with_devices(guest_args(&images, 1, "256M", Some(command)), &["--rng"]);
    let done = boot_to_poweroff(&args, None)?;
    check(
        guest_value(&done.stdout, "RNG")? == "virtio_rng.0 4096",
        || done.stdout.clone(),
    )
}

fn hvc_console_shell_answers() -> TestResult {
    let images = images()?;
    let args = vec![
        "run".into(),
        "--kernel".into(),
        images.kernel.display().to_string(),
        "--initrd".into(),
        images.initrd.display().to_string(),
        "--console".into(),
        "hvc".into(),
        "--cmdline".into(),
        "console=hvc0 quiet ferro.run=\"sh -l\"".into(),
    ];
    let mut vm = Vm::spawn(&ferro_bin(), &args)?;
    vm.wait_for(READY, 1, BOOT_TIMEOUT)?;
    vm.send(b"echo $((6*7))-from-$(tty); cat /sys/bus/pci/devices/*/device\n")?;
    vm.wait_for("42-from-/dev/hvc0", 1, Duration::from_secs(60))?;
    vm.wait_for("0x1043", 1, Duration::from_secs(30))?;
    vm.send(b"poweroff -f\n")?;
    let done = vm.wait(Duration::from_secs(60))?;
    check(done.code == 0, || {
        format!("exit {}: {}", done.code, done.stderr)
    })
}

/// A multi-queue TAP device with an address on the host, removed afterwards.
struct HostTap(&'static str);

impl HostTap {
    fn multi_queue(name: &'static str, address: &str) -> Result<Self, Failed> {
        e2e::tap::create_multi_queue(name).map_err(|e| format!("create TAP {name}: {e}"))?;
        let tap = HostTap(name);
        host(&format!(
            "ip addr add {address} dev {name} && ip link set {name} up"
        ))?;
        Ok(tap)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = e2e::tap::delete_multi_queue(self.0);
    }
}

fn net_ping_and_32m_tcp_both_ways() -> TestResult {
    let images = images()?;
    let scratch = Scratch::new("net")?;
    // Multi-queue, so the guest's two vCPUs get a queue pair each.
    let _tap = HostTap::multi_queue("fe2enet0", "10.9.0.1/24")?;
    let to_guest = scratch.0.join("to-guest").display().to_string();
    let from_guest = scratch.0.join("from-guest").display().to_string();
    host(&format!("head -c 33554432 /dev/urandom > {to_guest}"))?;
    // busybox nc half-closes when its stdin ends, and its peer then stops sending: keep the
    // listener's stdin open until the transfer is over.
    let listener = std::process::Command::new("sh")
        .args(["-c", &format!("nc -l -p 5001 > {from_guest}")])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let command = "echo QUEUES $(ls /sys/class/net/eth0/queues); ip link set eth0 up; ip addr add 10.9.0.2/24 dev eth0; ping -c 3 10.9.0.1 >/dev/null && echo PING-OK; head -c 33554432 /dev/urandom > /tmp/d; echo SENT-MD5 $(md5sum < /tmp/d); nc 10.9.0.1 5001 < /tmp/d; echo SENT; nc -l -p 5002 > /tmp/in; echo RECEIVED-MD5 $(md5sum < /tmp/in)";
    let args = with_devices(
        guest_args(&images, 2, "512M", Some(command)),
        &["--net", "tap=fe2enet0,mac=52:54:00:e2:e0:01"],
    );
    let mut vm = Vm::spawn(&ferro_bin(), &args)?;
    let mut listener = ChildGuard(listener);
    vm.wait_for("SENT", 2, BOOT_TIMEOUT * 2)?;
    drop(listener.0.stdin.take());
    let _ = listener.0.wait();
    // The guest listens once it has sent; retry until its listener is up.
    let mut sent = false;
    for _ in 0..30 {
        if host(&format!("nc -w 5 10.9.0.2 5002 < {to_guest}")).is_ok() {
            sent = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    check(sent, || "cannot connect to the guest".into())?;
    vm.wait_for("RECEIVED-MD5", 1, Duration::from_secs(120))?;
    let done = vm.wait(BOOT_TIMEOUT)?;
    check(done.stdout.contains("PING-OK"), || {
        format!("ping failed:\n{}", done.stdout)
    })?;
    // The driver took a queue pair per vCPU through the control queue.
    let queues = guest_value(&done.stdout, "QUEUES")?;
    check(queues.starts_with("rx-0 rx-1 tx-0 tx-1"), || {
        format!("guest queues: {queues}")
    })?;
    let sent_md5 = guest_value(&done.stdout, "SENT-MD5")?;
    let got = host_md5(&from_guest, 32 << 20)?;
    let got_len = std::fs::metadata(&from_guest).map(|m| m.len()).unwrap_or(0);
    check(sent_md5.starts_with(&got), || {
        format!(
            "guest sent {sent_md5}, host got {got_len} bytes: {got}\n{}",
            done.stdout
        )
    })?;
    let received = guest_value(&done.stdout, "RECEIVED-MD5")?;
    let expected = host_md5(&to_guest, 32 << 20)?;
    check(received.starts_with(&expected), || {
        format!("host sent {expected}, guest got {received}")
    })
}

/// Kills a child process when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let args = Arguments::from_args();
    const TESTS: &[Test] = &[
        ("boot::one_cpu_256m", || boots_with(1, "256M", 256 << 20)),
        ("boot::two_cpus_1g", || boots_with(2, "1G", 1 << 30)),
        ("boot::four_cpus_512m", || boots_with(4, "512M", 512 << 20)),
        ("boot::minimum_memory_128m", || {
            boots_with(1, "128M", 128 << 20)
        }),
        ("boot::memory_above_4g", || {
            boots_with(1, "3584M", 3584 << 20)
        }),
        ("boot::pvh_vmlinux", pvh_vmlinux_boots),
        (
            "power::poweroff_exits_zero",
            poweroff_from_the_guest_exits_zero,
        ),
        (
            "power::reboot_restarts_the_guest",
            reboot_restarts_the_guest,
        ),
        (
            "power::no_reboot_exits",
            no_reboot_turns_a_reboot_into_an_exit,
        ),
        ("devices::wall_clock_time", guest_has_wall_clock_time),
        ("devices::console_input", console_input_reaches_the_guest),
        ("errors::bad_inputs", bad_inputs_give_their_errors),
        ("errors::kvm_permission", kvm_without_permission_is_reported),
        (
            "virtio::block_data_reaches_the_image",
            block_data_reaches_the_image,
        ),
        (
            "virtio::block_synced_data_survives_sigkill",
            block_synced_data_survives_sigkill,
        ),
        (
            "virtio::block_read_only",
            block_read_only_disk_refuses_writes,
        ),
        ("virtio::block_two_disks", block_two_disks_with_serials),
        (
            "virtio::block_qcow2_overlay",
            block_qcow2_overlay_keeps_the_base_unchanged,
        ),
        ("virtio::pci_ids", pci_ids_are_the_virtio_ones),
        ("virtio::rng", rng_feeds_hwrng),
        ("virtio::hvc_console", hvc_console_shell_answers),
        ("virtio::net_ping_and_tcp", net_ping_and_32m_tcp_both_ways),
        (
            "api::pause_resume_and_power_button",
            vm_api::pause_resume_and_power_button,
        ),
        ("api::reset_and_stop", vm_api::reset_and_stop),
        (
            "api::lost_serial_interrupt_is_caught",
            vm_api::a_lost_serial_interrupt_is_caught_by_the_watchdog,
        ),
        (
            "daemon::manage_the_default_guest",
            daemon_e2e::manage_the_default_guest,
        ),
        (
            "daemon::linked_clones_keep_writes_apart",
            daemon_e2e::linked_clones_keep_writes_apart,
        ),
        (
            "security::raw_volume_stays_raw_after_a_restart",
            image_trust_e2e::raw_volume_stays_raw_after_a_restart,
        ),
        (
            "security::raw_disk_stays_raw_with_format_raw",
            image_trust_e2e::raw_disk_stays_raw_with_format_raw,
        ),
        (
            "security::probed_raw_disk_refuses_a_disguise",
            image_trust_e2e::probed_raw_disk_refuses_a_disguise,
        ),
        (
            "network::nat_and_isolated_networks",
            network_e2e::nat_and_isolated_networks,
        ),
    ];
    let trials = resume::trials(TESTS);
    // Each test boots a VM; running them one at a time keeps timings and memory predictable.
    let args = Arguments {
        test_threads: Some(1),
        ..args
    };
    libtest_mimic::run(&args, trials).exit();
}
