//! Benchmarks that boot the default test guest. Run inside `tools/testbed --with-qemu`
//! (see `tools/bench`), which provides real KVM, `ferro`, QEMU and the guest images.
//!
//! `ferro-bench boot [--runs N]`: time from process start to the guest's ready line, for
//! `ferro run` and for `qemu-system-x86_64 -enable-kvm -cpu host` on the same kernel,
//! initramfs and command line, interleaved; and each VMM's resident memory outside guest RAM
//! at that moment. Prints every run, the medians and the Ferro/QEMU ratios.
//!
//! `ferro-bench io [--runs N]`: virtio-blk on a raw image in the host's tmpfs (sequential read
//! and write, 4 KiB random reads, O_DIRECT in the guest) and virtio-net on a TAP device (TCP
//! guest to host and host to guest), Ferro against QEMU's virtio-blk-pci and virtio-net-pci
//! (userspace backends, no vhost), measured inside the guest by `ferro-guest-bench`.

mod daemon;

use std::path::PathBuf;
use std::time::Duration;

use e2e::{ferro_bin, median, rss_outside_guest_ram, GuestImages, Vm, READY};

const CMDLINE: &str = "console=ttyS0 quiet";
const MEMORY_MIB: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
enum Vmm {
    Ferro,
    /// QEMU as the issue and most users run it: default machine and devices.
    Qemu,
    /// QEMU without default devices (no VGA, no NIC): its fastest direct-kernel boot.
    QemuMinimal,
}

const VMMS: [Vmm; 3] = [Vmm::Ferro, Vmm::Qemu, Vmm::QemuMinimal];

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferro => "ferro",
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
            Vmm::Ferro => vec![
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
            ],
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
            Vmm::Ferro => ferro_bin(),
            Vmm::Qemu | Vmm::QemuMinimal => PathBuf::from("qemu-system-x86_64"),
        };
        (program, args.into_iter().map(String::from).collect())
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
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: ferro-bench boot|io|daemon [--runs N]");
    std::process::exit(2);
}

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

fn io_command(vmm: Vmm, images: &GuestImages, bench_initrd: &str) -> (PathBuf, Vec<String>) {
    let kernel = images.kernel.display().to_string();
    let guest = format!(
        "ip link set eth0 up; ip addr add {IO_GUEST_ADDR}/24 dev eth0; \
         ferro-guest-bench disk /dev/vda {IO_MIB} {IO_RANDOM_SECONDS}; \
         ferro-guest-bench tcp-send {IO_HOST_ADDR}:5201 {IO_MIB}; ferro-guest-bench tcp-recv 5202"
    );
    let cmdline = format!("console=ttyS0 quiet ferro.run=\"{guest}\"");
    let args: Vec<String> = match vmm {
        Vmm::Ferro => [
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            bench_initrd,
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--cmdline",
            &cmdline,
            "--disk",
            &format!("path={IO_IMAGE}"),
            "--net",
            &format!("tap={IO_TAP}"),
        ]
        .map(String::from)
        .to_vec(),
        Vmm::Qemu | Vmm::QemuMinimal => [
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            "2",
            "-m",
            "1G",
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
            bench_initrd,
            "-append",
            &cmdline,
            "-drive",
            &format!("file={IO_IMAGE},if=none,id=d0,format=raw"),
            "-device",
            "virtio-blk-pci,drive=d0",
            "-netdev",
            &format!("tap,id=n0,ifname={IO_TAP},script=no,downscript=no,vhost=off"),
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]
        .map(String::from)
        .to_vec(),
    };
    let program = match vmm {
        Vmm::Ferro => ferro_bin(),
        _ => PathBuf::from("qemu-system-x86_64"),
    };
    (program, args)
}

/// One boot running every measurement; returns the values in IO_METRICS order.
fn io_once(vmm: Vmm, images: &GuestImages, bench_initrd: &str) -> Result<Vec<f64>, String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((IO_HOST_ADDR, 5201)).map_err(|e| e.to_string())?;
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        while stream.read(&mut buf)? > 0 {}
        Ok(())
    });
    let (program, args) = io_command(vmm, images, bench_initrd);
    let mut vm = Vm::spawn(&program, &args)?;
    vm.close_stdin();
    vm.wait_for("LISTENING 5202", 1, TIMEOUT * 2)?;
    let _ = sink.join();
    let mut stream =
        std::net::TcpStream::connect((IO_GUEST_ADDR, 5202)).map_err(|e| e.to_string())?;
    let chunk = vec![0x24u8; 1 << 20];
    for _ in 0..IO_MIB {
        stream.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    drop(stream);
    vm.wait_for("RESULT tcp-host-to-guest", 1, TIMEOUT)?;
    let done = vm.wait(TIMEOUT)?;
    IO_METRICS
        .iter()
        .map(|metric| {
            done.stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("RESULT {metric} ")))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("{}: no {metric} result\n{}", vmm.name(), done.stdout))
        })
        .collect()
}

fn io(runs: usize) -> Result<(), String> {
    let images = GuestImages::from_env()?;
    let bench_initrd = std::env::var("FERRO_BENCH_INITRD")
        .map_err(|_| "FERRO_BENCH_INITRD is not set; run under tools/bench")?;
    // A fully allocated image, so no VMM pays for the first touch of tmpfs pages.
    sh(&format!(
        "dd if=/dev/zero of={IO_IMAGE} bs=1M count={} 2>/dev/null",
        IO_MIB * 2
    ))?;
    sh(&format!(
        "tunctl -t {IO_TAP} >/dev/null && ip addr add {IO_HOST_ADDR}/24 dev {IO_TAP} && ip link set {IO_TAP} up"
    ))?;
    let vmms = [Vmm::Ferro, Vmm::Qemu];
    println!(
        "virtio I/O: raw {}-MiB image on the host's tmpfs, TAP {IO_TAP}; {IO_MIB} MiB transfers, {IO_RANDOM_SECONDS} s of 4 KiB random reads (QD1, O_DIRECT); 2 vCPUs, 1 GiB; {runs} runs each, interleaved",
        IO_MIB * 2
    );
    let mut values = vec![vec![Vec::new(); IO_METRICS.len()]; vmms.len()];
    for run in 0..runs {
        for i in 0..vmms.len() {
            let slot = (run + i) % vmms.len();
            let row = io_once(vmms[slot], &images, &bench_initrd)?;
            println!(
                "run {} {:>5}: {}",
                run + 1,
                vmms[slot].name(),
                IO_METRICS
                    .iter()
                    .zip(&row)
                    .map(|(m, v)| format!("{m} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (metric, value) in row.into_iter().enumerate() {
                values[slot][metric].push(value);
            }
        }
    }
    println!(
        "{:<20} {:>12} {:>12} {:>12}",
        "median", "ferro", "qemu", "ferro/qemu"
    );
    for (m, metric) in IO_METRICS.iter().enumerate() {
        let ferro = median(&values[0][m]);
        let qemu = median(&values[1][m]);
        let unit = if metric.contains("rand") {
            "IOPS"
        } else {
            "MiB/s"
        };
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>12.3}  ({unit}, target >= 1.0)",
            metric,
            ferro,
            qemu,
            ferro / qemu
        );
    }
    let _ = sh(&format!("tunctl -d {IO_TAP} >/dev/null; rm -f {IO_IMAGE}"));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = |default: usize| match args.get(1).map(String::as_str) {
        None => default,
        Some("--runs") => args
            .get(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage()),
        Some(_) => usage(),
    };
    let result = match args.first().map(String::as_str) {
        Some("boot") => boot(runs(10)),
        Some("io") => io(runs(5)),
        Some("daemon") => daemon::run(runs(8)),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("ferro-bench: {e}");
        std::process::exit(1);
    }
}
