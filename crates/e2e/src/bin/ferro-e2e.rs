//! End-to-end tests of `ferro run` with the default test guest (Debian's cloud kernel and a
//! busybox initramfs). Run inside `tools/testbed`, which provides real KVM, the `ferro` binary
//! and the guest images. Tests run one at a time (each boots a VM); any libtest filter works:
//! `ferro-e2e boot`, `ferro-e2e --list`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{ferro_bin, Finished, GuestImages, Vm, READY};
use libtest_mimic::{Arguments, Failed, Trial};

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
    let mut cmdline = String::from("console=ttyS0 quiet");
    if let Some(command) = command {
        cmdline.push_str(&format!(" ferro.run=\"{command}\""));
    }
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

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("boot::one_cpu_256m", || boots_with(1, "256M", 256 << 20)),
        Trial::test("boot::two_cpus_1g", || boots_with(2, "1G", 1 << 30)),
        Trial::test("boot::four_cpus_512m", || boots_with(4, "512M", 512 << 20)),
        Trial::test("boot::minimum_memory_128m", || {
            boots_with(1, "128M", 128 << 20)
        }),
        Trial::test("boot::memory_above_4g", || {
            boots_with(1, "3584M", 3584 << 20)
        }),
        Trial::test("boot::pvh_vmlinux", pvh_vmlinux_boots),
        Trial::test(
            "power::poweroff_exits_zero",
            poweroff_from_the_guest_exits_zero,
        ),
        Trial::test(
            "power::reboot_restarts_the_guest",
            reboot_restarts_the_guest,
        ),
        Trial::test(
            "power::no_reboot_exits",
            no_reboot_turns_a_reboot_into_an_exit,
        ),
        Trial::test("devices::wall_clock_time", guest_has_wall_clock_time),
        Trial::test("devices::console_input", console_input_reaches_the_guest),
        Trial::test("errors::bad_inputs", bad_inputs_give_their_errors),
        Trial::test("errors::kvm_permission", kvm_without_permission_is_reported),
    ];
    // Each test boots a VM; running them one at a time keeps timings and memory predictable.
    let args = Arguments {
        test_threads: Some(1),
        ..args
    };
    libtest_mimic::run(&args, trials).exit();
}
