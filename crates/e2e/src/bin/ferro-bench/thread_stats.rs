//! The VMM process's threads as the host scheduler saw them (`/proc/PID/task/*/sched` and
//! `schedstat`): CPU time and context switches by thread name, so a benchmark can tell
//! whether a device thread got the CPU at once when the guest kicked it (an involuntary switch
//! of a vCPU thread) or only once the vCPU went idle. On one host CPU the scheduler lets a
//! woken thread preempt only if it has used less CPU than the running one, so a device
//! thread's CPU time per request decides how often the guest halts waiting for it.

use std::collections::BTreeMap;

/// Per thread name (threads of one name summed): voluntary and involuntary switches, and CPU
/// time in nanoseconds.
pub type Switches = BTreeMap<String, (u64, u64, u64)>;

fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The switches of every thread of `pid` now (empty if it is gone).
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
        entry.0 += field(&sched, "nr_voluntary_switches");
        entry.1 += field(&sched, "nr_involuntary_switches");
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        entry.2 += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    switches
}

/// "name vol/invol switches, CPU µs" per operation for each thread name that ran between
/// the readings.
pub fn per_operation(before: &Switches, after: &Switches, operations: f64) -> Vec<String> {
    after
        .iter()
        .filter_map(|(name, &(voluntary, involuntary, cpu))| {
            let (v0, i0, c0) = before.get(name).copied().unwrap_or((0, 0, 0));
            let (v, i) = (voluntary.saturating_sub(v0), involuntary.saturating_sub(i0));
            let micros = cpu.saturating_sub(c0) as f64 / 1000.0;
            (v + i > 0).then(|| {
                format!(
                    "{name} {:.2}/{:.2} {:.1} µs",
                    v as f64 / operations,
                    i as f64 / operations,
                    micros / operations
                )
            })
        })
        .collect()
}
