//! Facts about the host that decide what KVM can offer a guest.

use std::fs;

/// True when the host CPU advertises hardware virtualization (`vmx` or `svm` in
/// `/proc/cpuinfo`). Without it `/dev/kvm` may still exist (e.g. a paravirtual backend), but
/// stock guests may be very slow or fail.
pub fn host_has_hardware_virtualization() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|text| cpuinfo_has_hw_virt(&text))
        .unwrap_or(false)
}

fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(|line| line.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

/// Total RAM of the host in bytes (`MemTotal` of `/proc/meminfo`), if readable.
pub fn host_memory_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total(&text)
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_vmx_and_svm_flags_only_as_whole_words() {
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vme svm lm\n"));
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpuinfo_has_hw_virt("flags\t\t: fpu vmxx svm_lock\n"));
        assert!(!cpuinfo_has_hw_virt("model name : svm vmx\n"));
    }

    #[test]
    fn parses_memtotal() {
        let text = "MemTotal:       24571340 kB\nMemFree: 1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_571_340 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }
}
