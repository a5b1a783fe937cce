//! Measurements taken inside a guest (copied into the benchmark guest's initramfs by
//! `tools/testbed`): raw block device throughput and IOPS with O_DIRECT, and TCP throughput.
//! Prints `RESULT <name> <value> <unit>` lines for `ferro-bench io` to collect, and `GUESTSTAT`
//! lines (the guest's interrupts per operation of a phase, its idle driver and clock source)
//! that tell why two VMMs differ.
//!
//! ferro-guest-bench disk DEVICE MIB SECONDS   sequential read and write of MIB MiB, then
//!                                             4 KiB random reads for SECONDS
//! ferro-guest-bench tcp-send ADDR:PORT MIB    send MIB MiB
//! ferro-guest-bench tcp-recv PORT             receive one connection, report its throughput

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// A zeroed buffer aligned for O_DIRECT: a slice of a larger allocation, starting where
/// the alignment falls.
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        const ALIGN: usize = 4096;
        let bytes = vec![0u8; len + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        if start >= ALIGN {
            std::process::exit(2);
        }
        Aligned { bytes, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

fn result(name: &str, value: f64, unit: &str) {
    println!("RESULT {name} {value:.1} {unit}");
}

/// /proc/interrupts and /proc/softirqs: each source's counts per CPU, keyed by its name.
fn interrupt_counts() -> std::collections::BTreeMap<String, Vec<u64>> {
    let mut counts = per_cpu_table("/proc/interrupts");
    counts.extend(
        per_cpu_table("/proc/softirqs")
            .into_iter()
            .map(|(name, c)| (format!("softirq {name}"), c)),
    );
    counts
}

/// A table of counts per CPU with a header line naming the CPUs (/proc/interrupts' layout).
fn per_cpu_table(path: &str) -> std::collections::BTreeMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .map_or(0, |header| header.split_whitespace().count());
    lines
        .filter_map(|line| {
            let (source, rest) = line.split_once(':')?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let counts: Vec<u64> = words
                .iter()
                .take(cpus)
                .map_while(|w| w.parse().ok())
                .collect();
            let name = words
                .get(counts.len()..)
                .map_or(String::new(), |w| w.join(" "));
            Some((format!("{}:{name}", source.trim()), counts))
        })
        .collect()
}

/// Prints the interrupts that came during `phase`, per operation and per CPU.
fn print_interrupts(
    phase: &str,
    before: &std::collections::BTreeMap<String, Vec<u64>>,
    operations: f64,
) {
    for (source, counts) in interrupt_counts() {
        let Some(earlier) = before.get(&source) else {
            continue;
        };
        let deltas: Vec<String> = counts
            .iter()
            .zip(earlier)
            .map(|(now, then)| format!("{:.2}", now.saturating_sub(*then) as f64 / operations))
            .collect();
        if deltas.iter().any(|d| d != "0.00") {
            println!("GUESTSTAT {phase} irq {source} per-op {}", deltas.join("/"));
        }
    }
}

/// The guest's TCP counters that say how a transfer went: retransmissions, timeouts, zero
/// windows (from /proc/net/snmp and /proc/net/netstat), and eth0's packet counts (keys that
/// start with a space).
fn tcp_counters() -> std::collections::BTreeMap<String, u64> {
    const WANTED: [&str; 9] = [
        "RetransSegs",
        "TCPTimeouts",
        "TCPLossProbes",
        "TCPFastRetrans",
        "TCPSlowStartRetrans",
        "TCPWinProbe",
        "TCPFromZeroWindowAdv",
        "TCPToZeroWindowAdv",
        "TCPOFOQueue",
    ];
    let mut counters = std::collections::BTreeMap::new();
    let [tx, rx] = eth0_packets();
    counters.insert(" eth0 tx".to_string(), tx);
    counters.insert(" eth0 rx".to_string(), rx);
    for path in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        // Pairs of lines: "Prefix: name name ...", then "Prefix: value value ...".
        for pair in lines.chunks_exact(2) {
            let names = pair[0].split_whitespace().skip(1);
            let values = pair[1].split_whitespace().skip(1);
            for (name, value) in names.zip(values) {
                if let (true, Ok(value)) = (WANTED.contains(&name), value.parse()) {
                    counters.insert(name.to_string(), value);
                }
            }
        }
    }
    counters
}

/// eth0's packet counters: TCP segments leave as fewer, larger packets when TSO works well.
fn eth0_packets() -> [u64; 2] {
    ["tx_packets", "rx_packets"].map(|name| {
        std::fs::read_to_string(format!("/sys/class/net/eth0/statistics/{name}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// The eth0 packet counts kept in a [`tcp_counters`] reading.
fn before_packets(before: &std::collections::BTreeMap<String, u64>) -> [u64; 2] {
    [" eth0 tx", " eth0 rx"].map(|key| before.get(key).copied().unwrap_or(0))
}

/// Prints the TCP counters that moved during `phase`, and eth0's packets in each direction.
fn print_tcp_counters(phase: &str, before: &std::collections::BTreeMap<String, u64>) {
    let [tx, rx] = eth0_packets();
    let [tx0, rx0] = before_packets(before);
    println!(
        "GUESTSTAT {phase} eth0 packets tx {} rx {}",
        tx.saturating_sub(tx0),
        rx.saturating_sub(rx0)
    );
    let moved: Vec<String> = tcp_counters()
        .into_iter()
        .filter(|(name, _)| !name.starts_with(' '))
        .filter_map(|(name, now)| {
            let delta = now.saturating_sub(before.get(&name).copied().unwrap_or(0));
            (delta > 0).then(|| format!("{name} {delta}"))
        })
        .collect();
    println!("GUESTSTAT {phase} tcp {}", moved.join(", "));
}

/// Each CPU's time in /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal),
/// in clock ticks.
fn cpu_times() -> Vec<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(8)
                .map(|v| v.parse().unwrap_or(0))
                .collect()
        })
        .collect()
}

/// Prints where each CPU's time went during `phase`, in milliseconds: a transfer that
/// collapses shows whether the guest was busy (and in what) or idle.
fn print_cpu_times(phase: &str, before: &[Vec<u64>]) {
    const NAMES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    let hz = host_sys::system::clock_ticks_per_second().max(1);
    for (cpu, (now, then)) in cpu_times().iter().zip(before).enumerate() {
        let spent: Vec<String> = NAMES
            .iter()
            .zip(now.iter().zip(then))
            .map(|(name, (n, t))| format!("{name} {}", n.saturating_sub(*t) * 1000 / hz))
            .collect();
        println!("GUESTSTAT {phase} cpu{cpu} ms: {}", spent.join(", "));
    }
}

/// The CPU this process last ran on (field 39 of /proc/self/stat).
fn current_cpu() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(36).map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// The guest's idle driver and clock source, which change how often it exits.
fn print_platform() {
    for path in [
        "/sys/devices/system/cpu/cpuidle/current_driver",
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    ] {
        let value = std::fs::read_to_string(path).unwrap_or_else(|_| "none\n".into());
        println!("GUESTSTAT {path} {}", value.trim());
    }
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// A small xorshift generator: enough to spread reads, no dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn disk(device: &str, mib: usize, seconds: u64) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let mut buf = Aligned::new(MIB);
    buf.as_mut().fill(0x5a);
    let start = Instant::now();
    for i in 0..mib {
        file.write_all_at(buf.as_mut(), (i * MIB) as u64)?;
    }
    file.sync_data()?;
    result(
        "disk-seq-write",
        mib_per_s(mib * MIB, start.elapsed()),
        "MiB/s",
    );
    let start = Instant::now();
    for i in 0..mib {
        file.read_exact_at(buf.as_mut(), (i * MIB) as u64)?;
    }
    result(
        "disk-seq-read",
        mib_per_s(mib * MIB, start.elapsed()),
        "MiB/s",
    );
    print_platform();
    let before = interrupt_counts();
    let mut small = Aligned::new(4096);
    let blocks = (mib * MIB / 4096) as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    let mut reads = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        let block = next_random(&mut state) % blocks;
        file.read_exact_at(small.as_mut(), block * 4096)?;
        reads += 1;
    }
    result(
        "disk-rand-read-4k",
        reads as f64 / start.elapsed().as_secs_f64(),
        "IOPS",
    );
    print_interrupts("disk-rand-read-4k", &before, reads as f64);
    Ok(())
}

/// The sender's view of a connection (the kernel's `struct tcp_info`, read by offset so any
/// kernel's longer or shorter struct works): what limited it, and how long an ACK took.
fn tcp_info(stream: &TcpStream) -> String {
    let mut info = [0u8; 256];
    let Ok(len) = host_sys::socket::tcp_info(stream, &mut info) else {
        return "tcp_info unavailable".into();
    };
    let u32_at = |offset: usize| {
        info.get(offset..offset + 4)
            .filter(|_| offset + 4 <= len)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |offset: usize| u64::from(u32_at(offset)) | (u64::from(u32_at(offset + 4)) << 32);
    format!(
        "rtt {} us, min_rtt {} us, cwnd {}, unacked {}, snd_wnd {}, pacing {} Mbit/s, busy {} ms, rwnd_limited {} ms, sndbuf_limited {} ms",
        u32_at(68),
        u32_at(148),
        u32_at(80),
        u32_at(24),
        u32_at(228),
        u64_at(104) * 8 / 1_000_000,
        u64_at(168) / 1000,
        u64_at(176) / 1000,
        u64_at(184) / 1000,
    )
}

fn tcp_send(addr: &str, mib: usize) -> std::io::Result<()> {
    let before = tcp_counters();
    let interrupts = interrupt_counts();
    let times = cpu_times();
    let mut stream = TcpStream::connect(addr)?;
    let buf = vec![0x42u8; MIB];
    let start = Instant::now();
    // Four looks during the transfer: a connection that collapses shows it in its RTT.
    let mut looks = Vec::new();
    for sent in 0..mib {
        stream.write_all(&buf)?;
        if (sent + 1) % (mib / 4).max(1) == 0 {
            looks.push(format!(
                "{} MiB at {:.2} s on cpu{}: {}",
                sent + 1,
                start.elapsed().as_secs_f64(),
                current_cpu(),
                tcp_info(&stream)
            ));
        }
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver to close: everything has arrived.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    result(
        "tcp-guest-to-host",
        mib_per_s(mib * MIB, start.elapsed()),
        "MiB/s",
    );
    print_tcp_counters("tcp-guest-to-host", &before);
    print_cpu_times("tcp-guest-to-host", &times);
    print_interrupts("tcp-guest-to-host", &interrupts, mib as f64);
    for look in looks {
        println!("GUESTSTAT tcp-guest-to-host tcp_info {look}");
    }
    Ok(())
}

fn tcp_recv(port: u16) -> std::io::Result<()> {
    let before = tcp_counters();
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("LISTENING {port}");
    let (mut stream, _) = listener.accept()?;
    let interrupts = interrupt_counts();
    let times = cpu_times();
    let mut buf = vec![0u8; MIB];
    let mut total = 0usize;
    let start = Instant::now();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    result(
        "tcp-host-to-guest",
        mib_per_s(total, start.elapsed()),
        "MiB/s",
    );
    print_tcp_counters("tcp-host-to-guest", &before);
    print_cpu_times("tcp-host-to-guest", &times);
    print_interrupts(
        "tcp-host-to-guest",
        &interrupts,
        (total / MIB).max(1) as f64,
    );
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: ferro-guest-bench disk DEVICE MIB SECONDS | tcp-send ADDR:PORT MIB | tcp-recv PORT"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize| -> usize {
        args.get(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let outcome = match args.first().map(String::as_str) {
        Some("disk") if args.len() == 4 => disk(&args[1], number(2), number(3) as u64),
        Some("tcp-send") if args.len() == 3 => tcp_send(&args[1], number(2)),
        Some("tcp-recv") if args.len() == 2 => tcp_recv(number(1) as u16),
        _ => usage(),
    };
    if let Err(e) = outcome {
        eprintln!("ferro-guest-bench: {e}");
        std::process::exit(1);
    }
}
