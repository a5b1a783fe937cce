//! `ferro-bench io`: virtio-blk and virtio-net throughput, Ferro against QEMU, measured in
//! the guest by `ferro-guest-bench`, with KVM's exit counters for each phase of the work.

use std::path::PathBuf;

use std::time::{Duration, Instant};

use e2e::qemu_monitor::QemuSockets;
use e2e::stall::{VmmProbe, STALL_LIMIT};
use e2e::{ferro_bin, median, GuestImages, Vm};

use crate::stalls::{classify, count_rounds, qemu_machine, Ending, Side};
use crate::{host_net, thread_stats};
use crate::{Vmm, TIMEOUT};
use e2e::kvm_stats::{self, Counters};

const IO_IMAGE: &str = "/tmp/ferro-bench-disk.raw";
const IO_TAP: &str = "fbench0";
const IO_HOST_ADDR: &str = "10.9.0.1";
const IO_GUEST_ADDR: &str = "10.9.0.2";
const IO_MIB: usize = 256;
const IO_RANDOM_SECONDS: u32 = 10;
const IO_METRICS: [&str; 5] = [
    "disk-seq-read",
    "disk-seq-write",
    "disk-rand-read-4k",
    "tcp-guest-to-host",
    "tcp-host-to-guest",
];

fn sh(command: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .map_err(|e| format!("{command}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command}: {status}"))
    }
}

/// The VMM under test, with QEMU's virtio-net queue pairs (1: its default, single queue).
#[derive(Debug, Clone, Copy)]
struct Contender {
    vmm: Vmm,
    qemu_net_queues: usize,
}

impl Contender {
    /// Whether its TAP device must be multi-queue: always for Ferro, which gives each vCPU
    /// a queue pair by default; for QEMU when asked for more than one queue pair.
    fn multi_queue_tap(self) -> bool {
        self.vmm.is_ferro() || self.qemu_net_queues > 1
    }
}

fn io_command(
    contender: Contender,
    images: &GuestImages,
    bench_initrd: &str,
) -> (PathBuf, Vec<String>) {
    let vmm = contender.vmm;
    let queues = contender.qemu_net_queues;
    // QEMU's multi-queue: N queues on the TAP, MQ on the device with a vector per queue
    // plus config and control.
    let (netdev_queues, device_mq) = if queues > 1 {
        (
            format!(",queues={queues}"),
            format!(",mq=on,vectors={}", 2 * queues + 2),
        )
    } else {
        (String::new(), String::new())
    };
    let kernel = images.kernel.display().to_string();
    let guest = format!(
        "ip link set eth0 up; ip addr add {IO_GUEST_ADDR}/24 dev eth0; echo {PHASES_START}; \
         ferro-guest-bench disk /dev/vda {IO_MIB} {IO_RANDOM_SECONDS}; \
         ferro-guest-bench tcp-send {IO_HOST_ADDR}:5201 {IO_MIB}; ferro-guest-bench tcp-recv 5202"
    );
    // nokaslr: a testbed hang's vCPU dump can then be read against the guest's kallsyms.
    // panic=-1 with no reboot on both sides: a guest panic ends the VMM instead of hanging.
    let cmdline = format!("console=ttyS0 quiet nokaslr panic=-1 ferro.run=\"{guest}\"");
    let args: Vec<String> = match vmm {
        Vmm::Ferro | Vmm::FerroUnconfined => [
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            bench_initrd,
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--no-reboot",
            "--cmdline",
            &cmdline,
            "--disk",
            &format!("path={IO_IMAGE},format=raw"),
            "--net",
            &format!("tap={IO_TAP}"),
        ]
        .iter()
        .chain(vmm.seccomp_args())
        .map(|s| s.to_string())
        .collect(),
        Vmm::Qemu | Vmm::QemuMinimal => [
            qemu_machine("2", "1G"),
            [
                // Named threads, for the per-thread figures.
                "-name",
                "bench,debug-threads=on",
                "-kernel",
                &kernel,
                "-initrd",
                bench_initrd,
                "-append",
                &cmdline,
                "-drive",
                &format!("file={IO_IMAGE},if=none,id=d0,format=raw"),
                "-device",
                "virtio-blk-pci,drive=d0",
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={IO_TAP},script=no,downscript=no,vhost=off{netdev_queues}"
                ),
                "-device",
                &format!("virtio-net-pci,netdev=n0,romfile={device_mq}"),
            ]
            .map(String::from)
            .to_vec(),
        ]
        .concat(),
    };
    let program = match vmm {
        Vmm::Ferro | Vmm::FerroUnconfined => ferro_bin(),
        _ => PathBuf::from("qemu-system-x86_64"),
    };
    (program, args)
}

/// How long the TCP sink waits for the guest to connect, and then for each read.
const SINK_PATIENCE: Duration = Duration::from_secs(600);

/// Accepts one connection on `listener`, or fails after `limit`.
fn accept_within(
    listener: &std::net::TcpListener,
    limit: Duration,
) -> std::io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                return Ok((stream, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Printed by the guest just before its first measured phase.
const PHASES_START: &str = "PHASES-START";
/// The order in which the guest runs the phases (indices into IO_METRICS).
const PHASE_ORDER: [usize; 5] = [1, 0, 2, 3, 4];

/// What one boot measured: the values in IO_METRICS order, and KVM's counters for each phase
/// (same order; None without debugfs).
struct IoRun {
    values: Vec<f64>,
    /// The guest's GUESTSTAT lines.
    guest_stats: Vec<String>,
    exits: Option<Vec<Counters>>,
}

/// The host's TAP device for one boot, removed afterwards: multi-queue where the contender
/// uses several queues ([`Contender::multi_queue_tap`]); otherwise single-queue, as QEMU's
/// default `-netdev tap` cannot open a multi-queue device.
struct BenchTap(bool);

impl BenchTap {
    fn new(contender: Contender) -> Result<Self, String> {
        let multi_queue = contender.multi_queue_tap();
        if multi_queue {
            e2e::tap::create_multi_queue(IO_TAP).map_err(|e| e.to_string())?;
        } else {
            sh(&format!("tunctl -t {IO_TAP} >/dev/null"))?;
        }
        let tap = BenchTap(multi_queue);
        sh(&format!(
            "ip addr add {IO_HOST_ADDR}/24 dev {IO_TAP} && ip link set {IO_TAP} up"
        ))?;
        Ok(tap)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = if self.0 {
            e2e::tap::delete_multi_queue(IO_TAP).map_err(|e| e.to_string())
        } else {
            sh(&format!("tunctl -d {IO_TAP} >/dev/null"))
        };
    }
}

/// Why one boot of the I/O workload did not give its results.
enum IoFailure {
    /// The host side could not be prepared (TAP, listener, process): nothing was tried.
    Setup(String),
    /// The guest or its VMM failed, stalled or gave no result.
    Guest(String),
}

impl From<IoFailure> for String {
    fn from(failure: IoFailure) -> String {
        match failure {
            IoFailure::Setup(e) | IoFailure::Guest(e) => e,
        }
    }
}

/// One boot running every measurement. With `watch`, the stall watchdog follows the guest:
/// Ferro's progress through its API socket, QEMU's through KVM's counters (its report from
/// its monitor, why it stopped from its QMP events).
fn io_once(
    contender: Contender,
    images: &GuestImages,
    bench_initrd: &str,
    watch: bool,
) -> Result<IoRun, IoFailure> {
    use std::io::Read;
    let _tap = BenchTap::new(contender).map_err(IoFailure::Setup)?;
    let listener = std::net::TcpListener::bind((IO_HOST_ADDR, 5201))
        .map_err(|e| IoFailure::Setup(e.to_string()))?;
    let sink = std::thread::Builder::new()
        .name("tcp-sink".into())
        .spawn(move || -> std::io::Result<()> {
            // A guest that stalls never connects, or never closes: the sink gives up after
            // a while, and lets the port go at once, so the next run can bind it.
            let (mut stream, _) = accept_within(&listener, SINK_PATIENCE)?;
            drop(listener);
            stream.set_read_timeout(Some(SINK_PATIENCE))?;
            let mut buf = vec![0u8; 1 << 20];
            while stream.read(&mut buf)? > 0 {}
            Ok(())
        })
        .map_err(|e| IoFailure::Setup(e.to_string()))?;
    let (program, mut args) = io_command(contender, images, bench_initrd);
    let ferro = contender.vmm.is_ferro();
    let api_socket = std::env::temp_dir().join("ferro-bench-io.sock");
    let qemu = QemuSockets::new("bench-io");
    if watch && ferro {
        let _ = std::fs::remove_file(&api_socket);
        args.extend(["--api-socket".into(), api_socket.display().to_string()]);
    } else if watch {
        args.splice(0..0, qemu.args());
    }
    let mut vm = Vm::spawn(&program, &args).map_err(IoFailure::Setup)?;
    vm.close_stdin();
    if !watch {
        return measure(vm, contender.vmm, sink).map_err(IoFailure::Guest);
    }
    if ferro {
        vm = vm.watch_with(Box::new(VmmProbe::new(&api_socket)), STALL_LIMIT);
        return measure(vm, contender.vmm, sink).map_err(IoFailure::Guest);
    }
    let (vm, events) = qemu.watch(vm, STALL_LIMIT).map_err(IoFailure::Setup)?;
    measure(vm, contender.vmm, sink)
        .map_err(|e| IoFailure::Guest(format!("{e}\n{}", events.explain())))
}

/// The measured phases of one boot, from the guest's first phase to its exit.
fn measure(
    mut vm: Vm,
    vmm: Vmm,
    sink: std::thread::JoinHandle<std::io::Result<()>>,
) -> Result<IoRun, String> {
    use std::io::Write;
    vm.wait_for(PHASES_START, 1, TIMEOUT)?;
    let mut samples = vec![kvm_stats::read(vm.pid())];
    let mut switches = Vec::new();
    let mut host = host_net::read(IO_TAP);
    for &metric in &PHASE_ORDER[..4] {
        switches.push(thread_stats::read(vm.pid()));
        let own_switches = thread_stats::read(std::process::id());
        vm.wait_for(&format!("RESULT {} ", IO_METRICS[metric]), 1, TIMEOUT)?;
        samples.push(kvm_stats::read(vm.pid()));
        let host_now = host_net::read(IO_TAP);
        if IO_METRICS[metric].starts_with("tcp") {
            let moved = host_net::moved(&host, &host_now);
            println!(
                "  {} host during {}: {moved}",
                vmm.name(),
                IO_METRICS[metric]
            );
        }
        host = host_now;
        // What the scheduler did per operation, by thread, for the VMM and for this
        // process (whose sink thread receives the guest's TCP stream).
        let after = thread_stats::read(vm.pid());
        let ops = operations(metric, whole_result(&vm, IO_METRICS[metric])?);
        let own_after = thread_stats::read(std::process::id());
        let mut per_op = thread_stats::per_operation(&switches[switches.len() - 1], &after, ops);
        per_op.extend(thread_stats::per_operation(&own_switches, &own_after, ops));
        println!(
            "  {} {} per {}, by thread (switches voluntary/involuntary, CPU, runnable wait): {}",
            vmm.name(),
            IO_METRICS[metric],
            if IO_METRICS[metric].contains("rand") {
                "read"
            } else {
                "MiB"
            },
            per_op.join(", ")
        );
    }
    vm.wait_for("LISTENING 5202", 1, TIMEOUT)?;
    let _ = sink.join();
    let mut stream =
        std::net::TcpStream::connect((IO_GUEST_ADDR, 5202)).map_err(|e| e.to_string())?;
    let chunk = vec![0x24u8; 1 << 20];
    for _ in 0..IO_MIB {
        stream.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    drop(stream);
    vm.wait_for("RESULT tcp-host-to-guest", 1, TIMEOUT)?;
    samples.push(kvm_stats::read(vm.pid()));
    let moved = host_net::moved(&host, &host_net::read(IO_TAP));
    println!("  {} host during tcp-host-to-guest: {moved}", vmm.name());
    let done = vm.wait(TIMEOUT)?;
    let values = IO_METRICS
        .iter()
        .map(|metric| {
            result_value(&done.stdout, metric)
                .ok_or_else(|| format!("{}: no {metric} result\n{}", vmm.name(), done.stdout))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let samples: Option<Vec<Counters>> = samples.into_iter().collect();
    let exits = samples.map(|samples| {
        let mut by_metric = vec![Counters::default(); IO_METRICS.len()];
        for (phase, &metric) in PHASE_ORDER.iter().enumerate() {
            by_metric[metric] = samples[phase + 1].since(&samples[phase]);
        }
        by_metric
    });
    let guest_stats = done
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GUESTSTAT "))
        .map(String::from)
        .collect();
    Ok(IoRun {
        values,
        guest_stats,
        exits,
    })
}

/// The value of the guest's `RESULT metric VALUE UNIT` line in `stdout`.
fn result_value(stdout: &str, metric: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("RESULT {metric} ")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
}

/// The value of `metric` once its line is complete: a serial console delivers a line a few
/// bytes at a time, so the name can be there before the number.
fn whole_result(vm: &Vm, metric: &str) -> Result<f64, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stdout = vm.stdout();
        // The line is whole once its newline has arrived.
        let line_done = stdout.split_inclusive('\n').any(|l| {
            l.ends_with('\n')
                && l.trim()
                    .strip_prefix("RESULT ")
                    .is_some_and(|r| r.starts_with(&format!("{metric} ")))
        });
        if let (true, Some(value)) = (line_done, result_value(&stdout, metric)) {
            return Ok(value);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no whole {metric} result line"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How many operations `metric` did: reads for the random phase, MiB for the others.
fn operations(metric: usize, value: f64) -> f64 {
    if IO_METRICS[metric].contains("rand") {
        value * f64::from(IO_RANDOM_SECONDS)
    } else {
        IO_MIB as f64
    }
}

/// The guest images, the benchmark's initramfs and a freshly written disk image.
fn prepare() -> Result<(GuestImages, String), String> {
    let images = GuestImages::from_env()?;
    let bench_initrd = std::env::var("FERRO_BENCH_INITRD")
        .map_err(|_| "FERRO_BENCH_INITRD is not set; run under tools/bench")?;
    // A fully allocated image, so no VMM pays for the first touch of tmpfs pages.
    sh(&format!(
        "dd if=/dev/zero of={IO_IMAGE} bs=1M count={} 2>/dev/null",
        IO_MIB * 2
    ))?;
    Ok((images, bench_initrd))
}

/// `ferro-bench io-stalls`: the I/O workload (2 vCPUs, every phase) `runs` times with each
/// VMM, interleaved, under the stall watchdog; counts how each boot ended (issue 23's loop,
/// with QEMU as the control) instead of stopping at the first failure.
pub fn count_endings(runs: usize) -> Result<(), String> {
    let (images, bench_initrd) = prepare()?;
    kvm_stats::mount_debugfs();
    println!(
        "I/O stall loop: {runs} boots each of ferro and qemu running the I/O benchmark's guest \
         workload (2 vCPUs, 1 GiB, disk and TCP phases); stall limit {} s",
        STALL_LIMIT.as_secs()
    );
    let counted = count_rounds("I/O stall loop", runs, |side, _| {
        let contender = Contender {
            vmm: match side {
                Side::Ferro => Vmm::Ferro,
                Side::Qemu => Vmm::Qemu,
            },
            qemu_net_queues: 1,
        };
        let started = Instant::now();
        match io_once(contender, &images, &bench_initrd, true) {
            Ok(_) => Ok(Ending::Clean(started.elapsed().as_secs_f64())),
            Err(IoFailure::Setup(e)) => Err(e),
            Err(IoFailure::Guest(e)) => Ok(classify(e)),
        }
    });
    let _ = sh(&format!("rm -f {IO_IMAGE}"));
    counted
}

pub fn run(runs: usize, qemu_net_queues: usize) -> Result<(), String> {
    let (images, bench_initrd) = prepare()?;
    // ferro-off (--seccomp off) shows what confinement costs.
    let vmms = [Vmm::Ferro, Vmm::Qemu, Vmm::FerroUnconfined];
    println!(
        "virtio I/O: raw {}-MiB image on the host's tmpfs, TAP {IO_TAP}; {IO_MIB} MiB transfers, {IO_RANDOM_SECONDS} s of 4 KiB random reads (QD1, O_DIRECT); 2 vCPUs, 1 GiB; {runs} runs each, interleaved; virtio-net queue pairs: ferro one per vCPU, qemu {qemu_net_queues}",
        IO_MIB * 2
    );
    kvm_stats::mount_debugfs();
    let mut values = vec![vec![Vec::new(); IO_METRICS.len()]; vmms.len()];
    // exits[vmm][metric][counter]: that counter per operation, one entry per run.
    let mut exits =
        vec![vec![vec![Vec::new(); kvm_stats::NAMES.len()]; IO_METRICS.len()]; vmms.len()];
    for run in 0..runs {
        for i in 0..vmms.len() {
            let slot = (run + i) % vmms.len();
            let contender = Contender {
                vmm: vmms[slot],
                qemu_net_queues,
            };
            let row = io_once(contender, &images, &bench_initrd, false)?;
            println!(
                "run {} {:>5}: {}",
                run + 1,
                vmms[slot].name(),
                IO_METRICS
                    .iter()
                    .zip(&row.values)
                    .map(|(m, v)| format!("{m} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for line in &row.guest_stats {
                println!("  {} {line}", vmms[slot].name());
            }
            for (metric, &value) in row.values.iter().enumerate() {
                values[slot][metric].push(value);
                let Some(counters) = &row.exits else { continue };
                let ops = operations(metric, value);
                for (c, &count) in counters[metric].0.iter().enumerate() {
                    exits[slot][metric][c].push(count as f64 / ops);
                }
            }
        }
    }
    println!(
        "{:<20} {:>12} {:>12} {:>12} {:>12} {:>16}",
        "median", "ferro", "qemu", "ferro/qemu", "ferro-off", "ferro/ferro-off"
    );
    for (m, metric) in IO_METRICS.iter().enumerate() {
        let ferro = median(&values[0][m]);
        let qemu = median(&values[1][m]);
        let unconfined = median(&values[2][m]);
        let unit = if metric.contains("rand") {
            "IOPS"
        } else {
            "MiB/s"
        };
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>12.3} {:>12.1} {:>16.3}  ({unit}; targets: ferro/qemu >= 1.0, ferro/ferro-off >= 0.97)",
            metric,
            ferro,
            qemu,
            ferro / qemu,
            unconfined,
            ferro / unconfined
        );
    }
    print_exits(&exits);
    let _ = sh(&format!("rm -f {IO_IMAGE}"));
    Ok(())
}

/// The median KVM counters per operation (per 4 KiB read, per MiB moved), Ferro and QEMU.
fn print_exits(exits: &[Vec<Vec<Vec<f64>>>]) {
    if exits[0][0][0].is_empty() {
        println!("(no KVM exit counters: debugfs is not available)");
        return;
    }
    println!("KVM counters per operation (4 KiB read, or MiB moved), medians, ferro / qemu:");
    for (m, metric) in IO_METRICS.iter().enumerate() {
        let cells: Vec<String> = kvm_stats::NAMES
            .iter()
            .enumerate()
            .map(|(c, name)| {
                let (f, q) = (median(&exits[0][m][c]), median(&exits[1][m][c]));
                format!("{name} {f:.1}/{q:.1}")
            })
            .collect();
        println!("  {metric:<20} {}", cells.join(", "));
    }
}
