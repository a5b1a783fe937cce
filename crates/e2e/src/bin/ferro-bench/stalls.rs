//! `ferro-bench stalls [--runs N] [--cpus C]`: boots the default guest again and again with
//! Ferro and with QEMU (interleaved, same kernel, initramfs, vCPUs and memory), each guest
//! printing its CPU count and powering off, and counts how each boot ended: clean, stalled
//! (no progress for the stall limit: for Ferro no output, no exit and no device work, read
//! from its API; for QEMU no output), or crashed (a panic, a fault, a triple fault, a reset,
//! a VMM error). Prints every boot that did not end cleanly with what it said last (and
//! Ferro's stall report), then the counts side by side: issue 23's loop, with QEMU as the
//! control.
//!
//! Threading: the caller's; one guest at a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::kvm_stats;
use e2e::qemu_monitor::QemuSockets;
use e2e::stall::STALL_LIMIT;
use e2e::{ferro_bin, last_lines, median, GuestImages, Vm, READY};

const MEMORY: &str = "512M";
/// The guest's whole job: say how many CPUs it sees.
const WORKLOAD: &str = "echo STALLS-DONE $(nproc)";
/// A boot that takes longer than this has failed, whatever it shows.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ferro,
    Qemu,
}

/// How one boot ended.
#[derive(Debug)]
pub(crate) enum Ending {
    Clean(f64),
    Stalled(String),
    Crashed(String),
}

/// The boots of one VMM.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) clean: Vec<f64>,
    stalled: usize,
    crashed: usize,
}

impl Tally {
    /// Counts `ending`; a boot that did not end cleanly is printed with what it said last,
    /// under `label` (e.g. "run 3 Ferro").
    pub(crate) fn record(&mut self, ending: Ending, label: &str) {
        match ending {
            Ending::Clean(seconds) => self.clean.push(seconds),
            Ending::Stalled(what) => {
                self.stalled += 1;
                println!("{label}: STALLED\n{what}");
            }
            Ending::Crashed(what) => {
                self.crashed += 1;
                println!("{label}: CRASHED\n{what}");
            }
        }
    }
}

pub fn run(runs: usize, cpus: usize) -> Result<(), String> {
    let images = GuestImages::from_env()?;
    kvm_stats::mount_debugfs();
    println!(
        "stall loop: {runs} boots each of ferro and qemu, {cpus} vCPUs, {MEMORY}, guest runs {WORKLOAD:?}; \
         stall limit {} s",
        STALL_LIMIT.as_secs()
    );
    let mut tallies = [Tally::default(), Tally::default()];
    for run in 0..runs {
        // Alternate who goes first, so neither always boots on a warmer host.
        let order = if run % 2 == 0 {
            [Vmm::Ferro, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Ferro]
        };
        for vmm in order {
            let ending = boot_once(vmm, &images, cpus, run)?;
            tallies[vmm as usize].record(ending, &format!("run {} {vmm:?}", run + 1));
        }
        println!(
            "after {} runs: ferro {}, qemu {}",
            run + 1,
            summary(&tallies[0]),
            summary(&tallies[1])
        );
    }
    println!("stall loop, {runs} boots each, {cpus} vCPUs:");
    for (vmm, tally) in [Vmm::Ferro, Vmm::Qemu].iter().zip(&tallies) {
        println!(
            "  {:<5} {} (median clean boot {:.2} s)",
            format!("{vmm:?}").to_lowercase(),
            summary(tally),
            median(&tally.clean)
        );
    }
    Ok(())
}

pub(crate) fn summary(tally: &Tally) -> String {
    format!(
        "{} clean, {} stalled, {} crashed",
        tally.clean.len(),
        tally.stalled,
        tally.crashed
    )
}

fn command(
    vmm: Vmm,
    images: &GuestImages,
    cpus: usize,
    run: usize,
    qemu: &QemuSockets,
) -> (PathBuf, Vec<String>) {
    // panic=-1: a guest panic resets at once, and both VMMs are told to exit on a reset.
    let cmdline = format!("console=ttyS0 quiet panic=-1 ferro.run=\"{WORKLOAD}\"");
    let kernel = images.kernel.display().to_string();
    let initrd = images.initrd.display().to_string();
    let cpus = cpus.to_string();
    let args: Vec<String> = match vmm {
        // The socket arms the stall watchdog of `Vm::wait_for`.
        Vmm::Ferro => {
            let socket = std::env::temp_dir().join(format!("ferro-stalls-{run}.sock"));
            let _ = std::fs::remove_file(&socket);
            [
                "run",
                "--kernel",
                &kernel,
                "--initrd",
                &initrd,
                "--cpus",
                &cpus,
                "--memory",
                MEMORY,
                "--no-reboot",
                "--cmdline",
                &cmdline,
                "--api-socket",
                &socket.display().to_string(),
            ]
            .map(String::from)
            .to_vec()
        }
        Vmm::Qemu => [
            &qemu.args()[..],
            &[
                "-enable-kvm",
                "-cpu",
                "host",
                "-smp",
                &cpus,
                "-m",
                MEMORY,
                "-no-reboot",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-kernel",
                &kernel,
                "-initrd",
                &initrd,
                "-append",
                &cmdline,
            ]
            .map(String::from),
        ]
        .concat(),
    };
    let program = match vmm {
        Vmm::Ferro => ferro_bin(),
        Vmm::Qemu => PathBuf::from("qemu-system-x86_64"),
    };
    (program, args)
}

fn boot_once(vmm: Vmm, images: &GuestImages, cpus: usize, run: usize) -> Result<Ending, String> {
    let qemu = QemuSockets::new(&format!("stalls-{run}"));
    let (program, args) = command(vmm, images, cpus, run, &qemu);
    let started = Instant::now();
    let mut vm = Vm::spawn(&program, &args)?;
    vm.close_stdin();
    if vmm == Vmm::Ferro {
        return run_to_end(vm, cpus, started);
    }
    // QEMU's progress is read from KVM's counters, its report from its monitor, and why it
    // stopped from its QMP events.
    let (vm, events) = qemu.watch(vm, STALL_LIMIT)?;
    Ok(match run_to_end(vm, cpus, started)? {
        Ending::Crashed(what) => Ending::Crashed(format!("{what}\n{}", events.explain())),
        ending => ending,
    })
}

/// Waits for the guest's ready line, its workload's line and the VMM's clean exit.
fn run_to_end(mut vm: Vm, cpus: usize, started: Instant) -> Result<Ending, String> {
    let done = format!("STALLS-DONE {cpus}");
    if let Err(e) = vm
        .wait_for(READY, 1, BOOT_LIMIT)
        .and_then(|_| vm.wait_for(&done, 1, BOOT_LIMIT))
    {
        return Ok(classify(e));
    }
    let seconds = started.elapsed().as_secs_f64();
    let finished = match vm.wait(Duration::from_secs(60)) {
        Ok(finished) => finished,
        // The error carries the process's transcript, already cut to its tail.
        Err(e) => return Ok(Ending::Stalled(e)),
    };
    if finished.code != 0 {
        return Ok(Ending::Crashed(format!(
            "exit code {} after the workload\n{}\n{}",
            finished.code,
            last_lines(&finished.stdout, 30),
            last_lines(&finished.stderr, 30)
        )));
    }
    Ok(Ending::Clean(seconds))
}

/// A wait that failed: a stall if the watchdog said so, else a crash (the VMM ended, or the
/// guest never got there). Its text is kept whole: it carries the stall report.
pub(crate) fn classify(error: String) -> Ending {
    if error.contains("the guest stalled") {
        Ending::Stalled(error)
    } else {
        Ending::Crashed(error)
    }
}
