//! The VMM process's threads as the host scheduler saw them (`/proc/PID/task/*/sched` and
//! `schedstat`): CPU time, time spent runnable but waiting for the CPU, and context switches
//! by thread name, so a benchmark can tell whether a device thread got the CPU at once when
//! the guest kicked it (an involuntary switch of a vCPU thread) or only once the vCPU went
//! idle. On one host CPU the scheduler lets a woken thread preempt only if it has used less
//! CPU than the running one, so a device thread's CPU time per request decides how often the
//! guest halts waiting for it.

use std::collections::BTreeMap;

/// What the scheduler counted for the threads of one name (summed).
#[derive(Clone, Copy, Default)]
pub struct Counts {
    voluntary: u64,
    involuntary: u64,
    cpu_ns: u64,
    /// Runnable but not running: a woken thread waiting for the CPU.
    wait_ns: u64,
}

/// Per thread name.
pub type Switches = BTreeMap<String, Counts>;

fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The counts of every thread of `pid` now (empty if it is gone).
pub fn read(pid: u32) -> Switches {
    let mut switches = Switches::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return switches;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(path.join("sched")).unwrap_or_default();
        let entry = switches.entry(name.trim().to_string()).or_default();
        entry.voluntary += field(&sched, "nr_voluntary_switches");
        entry.involuntary += field(&sched, "nr_involuntary_switches");
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        let mut times = schedstat
            .split_whitespace()
            .map(|ns| ns.parse::<u64>().unwrap_or(0));
        entry.cpu_ns += times.next().unwrap_or(0);
        entry.wait_ns += times.next().unwrap_or(0);
    }
    switches
}

/// "name vol/invol switches, CPU µs, wait µs" per operation for each thread name that ran
/// between the readings.
pub fn per_operation(before: &Switches, after: &Switches, operations: f64) -> Vec<String> {
    after
        .iter()
        .filter_map(|(name, now)| {
            let then = before.get(name).copied().unwrap_or_default();
            let v = now.voluntary.saturating_sub(then.voluntary);
            let i = now.involuntary.saturating_sub(then.involuntary);
            let micros = |ns: u64, ns0: u64| ns.saturating_sub(ns0) as f64 / 1000.0 / operations;
            (v + i > 0).then(|| {
                format!(
                    "{name} {:.2}/{:.2} {:.1} µs run {:.1} µs wait",
                    v as f64 / operations,
                    i as f64 / operations,
                    micros(now.cpu_ns, then.cpu_ns),
                    micros(now.wait_ns, then.wait_ns),
                )
            })
        })
        .collect()
}
