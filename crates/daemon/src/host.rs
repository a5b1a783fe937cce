//! Monitoring from /proc and KVM: the host's resources, and a VMM process's CPU time (whole
//! and per vCPU thread, found by the thread names `vcpuN`) and resident memory.

use api::daemon_api::HostInfo;
use host_sys::system::{clock_ticks_per_second, page_size};

use crate::vms::process::stat_field;

/// utime + stime of a /proc stat file, in nanoseconds.
fn cpu_time_ns(stat_path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let ticks = stat_field(&stat, 14)? + stat_field(&stat, 15)?;
    Some(ticks * 1_000_000_000 / clock_ticks_per_second())
}

/// CPU time of process `pid` and of each of its `vcpuN` threads (index N), in nanoseconds.
pub fn process_cpu(pid: u32, vcpus: u32) -> (u64, Vec<u64>) {
    let total = cpu_time_ns(&format!("/proc/{pid}/stat")).unwrap_or(0);
    let mut per_vcpu = vec![0; vcpus as usize];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(|t| t.ok()) {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let Some(index) = comm
                .trim()
                .strip_prefix("vcpu")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if let (Some(slot), Some(ns)) = (
                per_vcpu.get_mut(index),
                cpu_time_ns(&dir.join("stat").to_string_lossy()),
            ) {
                *slot = ns;
            }
        }
    }
    (total, per_vcpu)
}

/// Resident memory of process `pid` in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn mem_total() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// What this host offers.
pub fn host_info(running_vms: u32, defined_vms: u32) -> HostInfo {
    let (kvm, max_vcpus) = match hypervisor::Hypervisor::open() {
        Ok(hv) => (true, hv.max_vcpus() as u32),
        Err(_) => (false, 0),
    };
    HostInfo {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: mem_total(),
        kvm,
        hardware_virtualization: hypervisor::host_has_hardware_virtualization(),
        max_vcpus,
        running_vms,
        defined_vms,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let (total, vcpus) = process_cpu(pid, 2);
        assert_eq!(vcpus, vec![0, 0], "no vcpu threads here");
        let _ = total; // may be 0 ticks this early
        assert!(rss_bytes(pid) > 0);
        let host = host_info(0, 0);
        assert!(host.cpus >= 1 && host.memory_bytes > 0);
    }
}
