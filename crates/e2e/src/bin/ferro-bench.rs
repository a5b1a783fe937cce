//! Benchmarks that boot the default test guest. Run inside `tools/testbed --with-qemu`
//! (see `tools/bench`), which provides real KVM, `ferro`, QEMU and the guest images.
//!
//! `ferro-bench boot [--runs N]`: time from process start to the guest's ready line, for
//! `ferro run` and for `qemu-system-x86_64 -enable-kvm -cpu host` on the same kernel,
//! initramfs and command line, interleaved; and each VMM's resident memory outside guest RAM
//! at that moment. Prints every run, the medians and the Ferro/QEMU ratios.

use std::path::PathBuf;
use std::time::Duration;

use e2e::{ferro_bin, median, rss_outside_guest_ram, GuestImages, Vm, READY};

const CMDLINE: &str = "console=ttyS0 quiet";
const MEMORY_MIB: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
enum Vmm {
    Ferro,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferro => "ferro",
            Vmm::Qemu => "qemu",
        }
    }

    fn command(self, images: &GuestImages) -> (PathBuf, Vec<String>) {
        let kernel = images.kernel.display().to_string();
        let initrd = images.initrd.display().to_string();
        let memory = format!("{MEMORY_MIB}M");
        match self {
            Vmm::Ferro => (
                ferro_bin(),
                [
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
                ]
                .map(String::from)
                .to_vec(),
            ),
            Vmm::Qemu => (
                PathBuf::from("qemu-system-x86_64"),
                [
                    "-enable-kvm",
                    "-cpu",
                    "host",
                    "-smp",
                    "1",
                    "-m",
                    &memory,
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    "-kernel",
                    &kernel,
                    "-initrd",
                    &initrd,
                    "-append",
                    CMDLINE,
                ]
                .map(String::from)
                .to_vec(),
            ),
        }
    }
}

/// One boot: seconds to ready, and resident bytes outside guest RAM at ready.
fn boot_once(vmm: Vmm, images: &GuestImages) -> Result<(f64, u64), String> {
    let (program, args) = vmm.command(images);
    let mut vm = Vm::spawn(&program, &args)?;
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
    let mut times = [Vec::new(), Vec::new()];
    let mut memory = [Vec::new(), Vec::new()];
    println!(
        "{:>4} {:>10} {:>10} {:>14} {:>14}",
        "run", "ferro s", "qemu s", "ferro MiB", "qemu MiB"
    );
    for run in 0..runs {
        // Alternate which VMM goes first so neither always boots on a warmer host.
        let order = if run % 2 == 0 {
            [Vmm::Ferro, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Ferro]
        };
        let mut row = [(0.0, 0u64); 2];
        for vmm in order {
            let slot = vmm as usize;
            row[slot] = boot_once(vmm, &images)?;
            times[slot].push(row[slot].0);
            memory[slot].push(row[slot].1 as f64);
        }
        println!(
            "{:>4} {:>10.3} {:>10.3} {:>14.2} {:>14.2}",
            run + 1,
            row[0].0,
            row[1].0,
            mib(row[0].1 as f64),
            mib(row[1].1 as f64)
        );
    }
    let (ferro, qemu) = (median(&times[0]), median(&times[1]));
    let (ferro_mem, qemu_mem) = (median(&memory[0]), median(&memory[1]));
    println!(
        "median boot: ferro {ferro:.3} s, qemu {qemu:.3} s, ferro/qemu {:.3} (target <= 0.6)",
        ferro / qemu
    );
    println!(
        "median memory outside guest RAM at ready: ferro {:.2} MiB (target <= 6), qemu {:.2} MiB, ferro/qemu {:.3}",
        mib(ferro_mem),
        mib(qemu_mem),
        ferro_mem / qemu_mem
    );
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: ferro-bench boot [--runs N]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("boot") => {
            let runs = match args.get(1).map(String::as_str) {
                None => 10,
                Some("--runs") => args
                    .get(2)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage()),
                Some(_) => usage(),
            };
            boot(runs)
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("ferro-bench: {e}");
        std::process::exit(1);
    }
}
