//! `ferro-bench daemon`: what managing VMs through the daemon costs, in one testbed run.
//! - start latency: `ferro vm start` until the guest's ready line is in its console log,
//!   against `ferro run` until the ready line is on its stdout (interleaved runs, medians;
//!   target ratio <= 1.1);
//! - the daemon's resident memory with 0 and with 10 running VMs (target < 20 MiB);
//! - 10 VMs started at once (10 CLI processes in parallel), all reaching ready;
//! - `ferro vm start` until the guest's DHCP lease on a nat network shows in
//!   `ferro net leases` (the guest runs udhcpc right after its ready line).

use std::time::{Duration, Instant};

use e2e::daemon::Daemon;
use e2e::{ferro_bin, median, GuestImages, Vm, READY};

const TIMEOUT: Duration = Duration::from_secs(300);
const MEMORY: &str = "256M";
const MANY: usize = 10;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// `ferro run` to ready, in seconds.
fn direct_once(images: &GuestImages) -> Result<f64, String> {
    let args: Vec<String> = [
        "run",
        "--kernel",
        &images.kernel.display().to_string(),
        "--initrd",
        &images.initrd.display().to_string(),
        "--memory",
        MEMORY,
        "--cmdline",
        "console=ttyS0 quiet ferro.run=\"sleep 600\"",
    ]
    .map(String::from)
    .to_vec();
    let mut vm = Vm::spawn(&ferro_bin(), &args)?;
    vm.close_stdin();
    let ready = vm.wait_for(READY, 1, TIMEOUT)?;
    vm.signal(libc::SIGTERM);
    vm.wait(TIMEOUT)?;
    Ok(ready.as_secs_f64())
}

/// `ferro vm start` to ready in the console log, in seconds, and when `vm start` returned
/// (the VM is destroyed after).
fn daemon_once(d: &Daemon, run: usize) -> Result<(f64, f64), String> {
    let start = Instant::now();
    d.ok(&["vm", "start", "bench"])?;
    let started = start.elapsed().as_secs_f64();
    d.wait_for_console("bench", READY, run, TIMEOUT)?;
    let elapsed = start.elapsed().as_secs_f64();
    d.ok(&["vm", "destroy", "bench"])?;
    Ok((elapsed, started))
}

pub fn run(runs: usize) -> Result<(), String> {
    let images = GuestImages::from_env()?;
    let d = Daemon::start("bench")?;
    let idle_rss = d.rss()?;
    let mut round_trips = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        d.ok(&["vm", "list"])?;
        round_trips.push(start.elapsed().as_secs_f64());
    }
    println!(
        "CLI round trip (ferro vm list, process start included): median {:.3} s",
        median(&round_trips)
    );
    d.define_guest(&images, "bench", MEMORY, "sleep 600", "")?;
    println!("start to {READY:?}: 1 vCPU, {MEMORY}, {runs} runs each, interleaved");
    println!(
        "{:>4} {:>12} {:>12} {:>16}",
        "run", "vm start s", "ferro run s", "(start returned)"
    );
    let (mut via_daemon, mut direct) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        // Alternate which goes first so neither always meets a warmer host.
        let ((a, returned), b) = if run % 2 == 0 {
            let b = direct_once(&images)?;
            (daemon_once(&d, run)?, b)
        } else {
            let a = daemon_once(&d, run)?;
            (a, direct_once(&images)?)
        };
        println!("{run:>4} {a:>12.3} {b:>12.3} {returned:>16.3}");
        via_daemon.push(a);
        direct.push(b);
    }
    let (a, b) = (median(&via_daemon), median(&direct));
    println!(
        "median start: vm start {a:.3} s, ferro run {b:.3} s, ratio {:.3} (target <= 1.1)",
        a / b
    );

    for i in 0..MANY {
        d.define_guest(&images, &format!("many{i}"), MEMORY, "sleep 600", "")?;
    }
    let start = Instant::now();
    let started: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..MANY)
            .map(|i| {
                let d = &d;
                s.spawn(move || d.ok(&["vm", "start", &format!("many{i}")]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    for result in started {
        result?;
    }
    let mut slowest = 0.0f64;
    for i in 0..MANY {
        let name = format!("many{i}");
        d.wait_for_console(&name, READY, 1, TIMEOUT)?;
        slowest = slowest.max(start.elapsed().as_secs_f64());
    }
    let busy_rss = d.rss()?;
    println!("{MANY} VMs started at once: all ready after {slowest:.3} s");
    println!(
        "daemon RSS: {:.2} MiB with 0 VMs, {:.2} MiB with {MANY} running (target < 20 MiB; libvirtd alone ~33 MiB)",
        mib(idle_rss),
        mib(busy_rss)
    );
    for i in 0..MANY {
        d.ok(&["vm", "destroy", &format!("many{i}")])?;
    }
    dhcp_lease(&d, &images, runs)
}

/// `ferro vm start` to the guest's lease in `ferro net leases`, in seconds, and to its ready
/// line, for one start (the VM is destroyed after).
fn lease_once(d: &Daemon, run: usize) -> Result<(f64, f64), String> {
    let start = Instant::now();
    d.ok(&["vm", "start", "dhcp"])?;
    d.wait_for_console("dhcp", READY, run, TIMEOUT)?;
    let ready = start.elapsed().as_secs_f64();
    loop {
        let out = d.ok(&["net", "leases", "bench", "--json"])?;
        let leases: Vec<api::net_api::Lease> =
            serde_json::from_str(&out).map_err(|e| format!("net leases: {e}: {out}"))?;
        if !leases.is_empty() {
            break;
        }
        if start.elapsed() > TIMEOUT {
            return Err("no DHCP lease".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let leased = start.elapsed().as_secs_f64();
    d.ok(&["vm", "destroy", "dhcp"])?;
    // A fresh dnsmasq (stop removes its lease file): the next start gets its lease anew.
    d.ok(&["net", "stop", "bench"])?;
    d.ok(&["net", "start", "bench"])?;
    Ok((leased, ready))
}

fn dhcp_lease(d: &Daemon, images: &GuestImages, runs: usize) -> Result<(), String> {
    let network = d.state_dir().join("bench-net.toml");
    std::fs::write(
        &network,
        "name = \"bench\"\nmode = \"nat\"\nbridge = \"ferrobench0\"\nsubnet = \"10.90.0.0/24\"\n",
    )
    .map_err(|e| e.to_string())?;
    d.ok(&["net", "define", &network.display().to_string()])?;
    d.ok(&["net", "start", "bench"])?;
    d.define_guest(
        images,
        "dhcp",
        MEMORY,
        "ip link set eth0 up; udhcpc -i eth0 -n -q -t 30 -T 1; sleep 600",
        "[[nets]]\nnetwork = \"bench\"\n",
    )?;
    println!(
        "vm start to the DHCP lease on a nat network (udhcpc after the ready line), {runs} runs"
    );
    println!("{:>4} {:>12} {:>12}", "run", "lease s", "ready s");
    let (mut leases, mut readies) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let (leased, ready) = lease_once(d, run)?;
        println!("{run:>4} {leased:>12.3} {ready:>12.3}");
        leases.push(leased);
        readies.push(ready);
    }
    println!(
        "median: vm start to lease {:.3} s (ready line at {:.3} s, so DHCP takes {:.3} s)",
        median(&leases),
        median(&readies),
        median(&leases) - median(&readies)
    );
    d.ok(&["net", "stop", "bench"])?;
    Ok(())
}
