//! KVM's per-VM exit counters, read from debugfs (`/sys/kernel/debug/kvm/<pid>-<fd>/`), so a
//! benchmark can say how many exits each VMM's guest takes for the same work: in the nested
//! testbed every exit is expensive, and a difference there explains a throughput gap.

use std::path::PathBuf;

/// The counters compared (summed over the VM's vCPUs by KVM).
pub const NAMES: [&str; 5] = ["exits", "halt_exits", "mmio_exits", "io_exits", "irq_exits"];

/// One reading of NAMES, in that order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters(pub [u64; NAMES.len()]);

impl Counters {
    /// The counter `name` (one of NAMES).
    pub fn get(&self, name: &str) -> Option<u64> {
        NAMES.iter().position(|n| *n == name).map(|i| self.0[i])
    }

    /// What was counted between `earlier` and self.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut delta = [0; NAMES.len()];
        for (i, d) in delta.iter_mut().enumerate() {
            *d = self.0[i].saturating_sub(earlier.0[i]);
        }
        Counters(delta)
    }
}

/// Mounts debugfs if it is not there yet (the testbed's outer host starts without it).
pub fn mount_debugfs() {
    if !std::path::Path::new("/sys/kernel/debug/kvm").exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"])
            .status();
    }
}

/// The debugfs directory of the VM process `pid` created (one VM per VMM process).
fn vm_dir(pid: u32) -> Option<PathBuf> {
    let prefix = format!("{pid}-");
    std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
}

/// The exits of `pid`'s VM that reach its VMM (port and MMIO accesses): what a guest that
/// makes progress keeps causing, and an idle or stuck one does not (timer ticks and halts stay
/// in the kernel). None when debugfs or the VM is not there.
pub fn vmm_exits(pid: u32) -> Option<u64> {
    let counters = read(pid)?;
    Some(counters.get("io_exits")? + counters.get("mmio_exits")?)
}

/// The counters of `pid`'s VM now; None when debugfs or the VM is not there.
pub fn read(pid: u32) -> Option<Counters> {
    let dir = vm_dir(pid)?;
    let mut counters = [0; NAMES.len()];
    for (value, name) in counters.iter_mut().zip(NAMES) {
        *value = std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
    }
    Some(Counters(counters))
}
