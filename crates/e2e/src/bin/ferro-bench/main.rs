//! Benchmarks that boot the default test guest. Run inside `tools/testbed --with-qemu`
//! (see `tools/bench`), which provides real KVM, `ferro`, QEMU and the guest images.
//!
//! `ferro-bench boot [--runs N]`: time from process start to the guest's ready line, for
//! `ferro run` and for `qemu-system-x86_64 -enable-kvm -cpu host` on the same kernel,
//! initramfs and command line, interleaved; and each VMM's resident memory outside guest RAM
//! at that moment. Prints every run, the medians and the Ferro/QEMU ratios.
//!
//! `ferro-bench stalls [--runs N] [--cpus C]`: see [`stalls`]; counts clean, stalled and
//! crashed boots of Ferro and QEMU.
//!
//! `ferro-bench io-stalls [--runs N]`: the I/O benchmark's guest workload N times (30) with
//! each VMM under the stall watchdog, counting clean, stalled and crashed runs.
//!
//! `ferro-bench systemd-stalls [--runs N]`: see [`systemd`]; a systemd guest started and shut
//! down through the daemon N times (30), QEMU doing the same as the control.
//!
//! `ferro-bench io [--runs N] [--qemu-net-queues N]`: virtio-blk on a raw image in the host's
//! tmpfs (sequential read and write, 4 KiB random reads, O_DIRECT in the guest) and
//! virtio-net on a TAP device (TCP guest to host and host to guest), Ferro against QEMU's
//! virtio-blk-pci and virtio-net-pci (userspace backends, no vhost), measured inside the guest
//! by `ferro-guest-bench`. Ferro runs its defaults (a queue pair per vCPU); QEMU runs its own
//! (one queue pair) unless `--qemu-net-queues` gives it multi-queue on the same kind of TAP.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

mod daemon;
mod host_net;
mod io;
mod stalls;
mod systemd;
mod thread_stats;

use std::path::PathBuf;
use std::time::Duration;

use e2e::{ferro_bin, median, rss_outside_guest_ram, GuestImages, Vm, READY};

const CMDLINE: &str = "console=ttyS0 quiet";
const MEMORY_MIB: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
enum Vmm {
    Ferro,
    /// Ferro with `--seccomp off`: what confinement costs.
    FerroUnconfined,
    /// QEMU as the issue and most users run it: default machine and devices.
    Qemu,
    /// QEMU without default devices (no VGA, no NIC): its fastest direct-kernel boot.
    QemuMinimal,
}

const VMMS: [Vmm; 4] = [
    Vmm::Ferro,
    Vmm::Qemu,
    Vmm::QemuMinimal,
    Vmm::FerroUnconfined,
];

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferro => "ferro",
            Vmm::FerroUnconfined => "ferro-off",
            Vmm::Qemu => "qemu",
            Vmm::QemuMinimal => "qemu-min",
        }
    }

    fn command(self, images: &GuestImages) -> (PathBuf, Vec<String>) {
        let kernel = images.kernel.display().to_string();
        let initrd = images.initrd.display().to_string();
        let memory = format!("{MEMORY_MIB}M");
        let qemu_common = [
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-m",
            &memory,
            "-no-reboot",
            "-kernel",
            &kernel,
            "-initrd",
            &initrd,
            "-append",
            CMDLINE,
        ];
        let args: Vec<&str> = match self {
            Vmm::Ferro | Vmm::FerroUnconfined => [
                &[
                    "run",
                    "--kernel",
                    &kernel,
                    "--initrd",
                    &initrd,
                    "--cpus",
                    "1",
                    "--memory",
                    &memory,
                    "--cmdline",
                    CMDLINE,
                ][..],
                self.seccomp_args(),
            ]
            .concat(),
            Vmm::Qemu => [&qemu_common[..], &["-nographic"]].concat(),
            Vmm::QemuMinimal => [
                &qemu_common[..],
                &[
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                ],
            ]
            .concat(),
        };
        let program = match self {
            Vmm::Ferro | Vmm::FerroUnconfined => ferro_bin(),
            Vmm::Qemu | Vmm::QemuMinimal => PathBuf::from("qemu-system-x86_64"),
        };
        (program, args.into_iter().map(String::from).collect())
    }

    /// Ferro's seccomp flag: explicit on both sides, so an inherited FERRO_SECCOMP cannot
    /// make the comparison compare nothing.
    fn seccomp_args(self) -> &'static [&'static str] {
        match self {
            Vmm::FerroUnconfined => &["--seccomp", "off"],
            _ => &["--seccomp", "kill"],
        }
    }

    fn is_ferro(self) -> bool {
        matches!(self, Vmm::Ferro | Vmm::FerroUnconfined)
    }
}

/// One boot: seconds to ready, and resident bytes outside guest RAM at ready.
fn boot_once(vmm: Vmm, images: &GuestImages) -> Result<(f64, u64), String> {
    let (program, args) = vmm.command(images);
    let mut vm = Vm::spawn(&program, &args)?;
    // QEMU's -nographic reads its monitor escape from stdin; leave nothing there.
    vm.close_stdin();
    let ready = vm.wait_for(READY, 1, TIMEOUT)?;
    let (_, overhead) = rss_outside_guest_ram(vm.pid(), MEMORY_MIB << 20)?;
    let done = vm.wait(TIMEOUT)?;
    if done.code != 0 {
        return Err(format!(
            "{} exited with {}: {}",
            vmm.name(),
            done.code,
            done.stderr
        ));
    }
    Ok((ready.as_secs_f64(), overhead))
}

fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}

fn boot(runs: usize) -> Result<(), String> {
    let images = GuestImages::from_env()?;
    println!("boot to {READY:?}: 1 vCPU, {MEMORY_MIB} MiB, cmdline {CMDLINE:?}, {runs} runs each, interleaved");
    println!("kernel {}", images.kernel.display());
    for vmm in VMMS {
        let (program, args) = vmm.command(&images);
        println!(
            "{:>8}: {} {}",
            vmm.name(),
            program.display(),
            args.join(" ")
        );
    }
    let mut times = vec![Vec::new(); VMMS.len()];
    let mut memory = vec![Vec::new(); VMMS.len()];
    print!("{:>4}", "run");
    for vmm in VMMS {
        print!(" {:>9} s", vmm.name());
    }
    for vmm in VMMS {
        print!(" {:>8} MiB", vmm.name());
    }
    println!();
    for run in 0..runs {
        // Rotate the order so no VMM always boots first (or last) on a warmer host.
        let mut row = vec![(0.0, 0u64); VMMS.len()];
        for i in 0..VMMS.len() {
            let slot = (run + i) % VMMS.len();
            row[slot] = boot_once(VMMS[slot], &images)?;
            times[slot].push(row[slot].0);
            memory[slot].push(row[slot].1 as f64);
        }
        print!("{:>4}", run + 1);
        for (time, _) in &row {
            print!(" {time:>11.3}");
        }
        for (_, bytes) in &row {
            print!(" {:>12.2}", mib(*bytes as f64));
        }
        println!();
    }
    let medians: Vec<f64> = times.iter().map(|t| median(t)).collect();
    let memory: Vec<f64> = memory.iter().map(|m| median(m)).collect();
    println!(
        "median boot: ferro {:.3} s, qemu {:.3} s, qemu-min {:.3} s",
        medians[0], medians[1], medians[2]
    );
    println!(
        "ratio ferro/qemu {:.3} (target <= 0.6), ferro/qemu-min {:.3}",
        medians[0] / medians[1],
        medians[0] / medians[2]
    );
    println!(
        "median memory outside guest RAM at ready: ferro {:.2} MiB (target <= 6), qemu {:.2} MiB, qemu-min {:.2} MiB",
        mib(memory[0]),
        mib(memory[1]),
        mib(memory[2])
    );
    println!(
        "confinement (seccomp on vs --seccomp off): boot ratio {:.3} (target <= 1.03), memory {:+.2} MiB (target <= 0.5)",
        medians[0] / medians[3],
        mib(memory[0] - memory[3])
    );
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: ferro-bench boot|io|io-stalls|daemon|stalls|systemd-stalls [--runs N] (io also: [--qemu-net-queues N]; \
         stalls also: [--cpus C])"
    );
    std::process::exit(2);
}

/// The value of option `name` in `options` (pairs of flag and number), or `default`.
fn option(options: &[String], name: &str, default: usize) -> usize {
    let mut value = default;
    for pair in options.chunks(2) {
        match pair {
            [flag, n] if flag == name => value = n.parse().unwrap_or_else(|_| usage()),
            [flag, _] if flag.starts_with("--") => {}
            _ => usage(),
        }
    }
    value
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = args.get(1..).unwrap_or_default();
    let known = |names: &[&str]| {
        if options
            .iter()
            .step_by(2)
            .any(|f| !names.contains(&f.as_str()))
        {
            usage();
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("boot") => {
            known(&["--runs"]);
            boot(option(options, "--runs", 10))
        }
        Some("io") => {
            known(&["--runs", "--qemu-net-queues"]);
            io::run(
                option(options, "--runs", 5),
                option(options, "--qemu-net-queues", 1),
            )
        }
        Some("daemon") => {
            known(&["--runs"]);
            daemon::run(option(options, "--runs", 8))
        }
        Some("io-stalls") => {
            known(&["--runs"]);
            io::count_endings(option(options, "--runs", 30))
        }
        Some("systemd-stalls") => {
            known(&["--runs"]);
            systemd::run(option(options, "--runs", 30))
        }
        Some("stalls") => {
            known(&["--runs", "--cpus"]);
            stalls::run(option(options, "--runs", 30), option(options, "--cpus", 2))
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("ferro-bench: {e}");
        std::process::exit(1);
    }
}
