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

/// The two contenders of a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Ferro,
    Qemu,
}

impl Side {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Side::Ferro => "ferro",
            Side::Qemu => "qemu",
        }
    }
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
struct Tally {
    clean: Vec<f64>,
    stalled: usize,
    crashed: usize,
}

impl Tally {
    /// Counts `ending`; a boot that did not end cleanly is printed with what it said last,
    /// under `label` (e.g. "run 3 Ferro").
    fn record(&mut self, ending: Ending, label: &str) {
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
    count_rounds(&format!("stall loop, {cpus} vCPUs"), runs, |side, run| {
        boot_once(side, &images, cpus, run)
    })
}

/// Runs `rounds` rounds of one boot per side, who goes first alternating (so neither always
/// boots on a warmer host), and counts how each ended: every failure is printed as it comes,
/// the counts after each round, and the totals under `title` at the end. `once(side, round)`
/// gives one boot's ending; its error stops the loop (the host side failed, not a guest).
pub(crate) fn count_rounds(
    title: &str,
    rounds: usize,
    mut once: impl FnMut(Side, usize) -> Result<Ending, String>,
) -> Result<(), String> {
    let mut tallies = [Tally::default(), Tally::default()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Ferro, Side::Qemu]
        } else {
            [Side::Qemu, Side::Ferro]
        };
        for side in order {
            let ending = once(side, round)?;
            tallies[side as usize].record(ending, &format!("run {} {}", round + 1, side.name()));
        }
        println!(
            "after {} runs: ferro {}, qemu {}",
            round + 1,
            summary(&tallies[0]),
            summary(&tallies[1])
        );
    }
    println!("{title}, {rounds} runs each:");
    for (side, tally) in [Side::Ferro, Side::Qemu].iter().zip(&tallies) {
        println!(
            "  {:<5} {} (median clean run {:.2} s)",
            side.name(),
            summary(tally),
            median(&tally.clean)
        );
    }
    Ok(())
}

/// QEMU's arguments shared by the loops: KVM with the host's CPU, `cpus` vCPUs and `memory`,
/// no default devices, the serial console on stdio, and an exit instead of a reset.
pub(crate) fn qemu_machine(cpus: &str, memory: &str) -> Vec<String> {
    [
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        cpus,
        "-m",
        memory,
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ]
    .map(String::from)
    .to_vec()
}

fn summary(tally: &Tally) -> String {
    format!(
        "{} clean, {} stalled, {} crashed",
        tally.clean.len(),
        tally.stalled,
        tally.crashed
    )
}

fn command(
    vmm: Side,
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
        Side::Ferro => {
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
        Side::Qemu => {
            let mut args = qemu.args();
            args.extend(qemu_machine(&cpus, MEMORY));
            args.extend(
                ["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline].map(String::from),
            );
            args
        }
    };
    let program = match vmm {
        Side::Ferro => ferro_bin(),
        Side::Qemu => PathBuf::from("qemu-system-x86_64"),
    };
    (program, args)
}

fn boot_once(vmm: Side, images: &GuestImages, cpus: usize, run: usize) -> Result<Ending, String> {
    let qemu = QemuSockets::new(&format!("stalls-{run}"));
    let (program, args) = command(vmm, images, cpus, run, &qemu);
    let started = Instant::now();
    let mut vm = Vm::spawn(&program, &args)?;
    vm.close_stdin();
    if vmm == Side::Ferro {
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
