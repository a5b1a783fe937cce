//! The VM's counters, created once per VMM process so that guest resets (which rebuild the
//! machine and its devices) do not clear them: exits per vCPU, requests and bytes per device.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::vmm_api::{DeviceCounters, VcpuCounters, VmCounters};
use api::{ConsoleKind, VmConfig};
use virtio::counters::Counters;

/// Counters for every vCPU and device `config` describes.
#[derive(Debug)]
pub(crate) struct Stats {
    vcpus: Vec<Arc<Counters>>,
    devices: Vec<(String, Arc<Counters>)>,
}

impl Stats {
    pub fn new(config: &VmConfig) -> Self {
        let mut devices = Vec::new();
        for i in 0..config.disks.len() {
            devices.push((format!("block{i}"), virtio::block::new_counters()));
        }
        for i in 0..config.nets.len() {
            devices.push((format!("net{i}"), virtio::net::new_counters()));
        }
        if config.rng {
            devices.push(("rng0".into(), virtio::rng::new_counters()));
        }
        if config.console == ConsoleKind::Hvc {
            devices.push(("console0".into(), virtio::console::new_counters()));
        }
        Stats {
            vcpus: (0..config.cpus)
                .map(|_| crate::vcpu::new_exit_counters())
                .collect(),
            devices,
        }
    }

    /// The exit counters of vCPU `id`.
    pub fn vcpu(&self, id: u32) -> Arc<Counters> {
        self.vcpus
            .get(id as usize)
            .cloned()
            .unwrap_or_else(crate::vcpu::new_exit_counters)
    }

    /// The counters of device `id` (`block0`, `net1`, `rng0`, `console0`).
    pub fn device(&self, id: &str, fresh: fn() -> Arc<Counters>) -> Arc<Counters> {
        self.devices
            .iter()
            .find(|(name, _)| name == id)
            .map_or_else(fresh, |(_, counters)| counters.clone())
    }

    /// Every counter's current value.
    pub fn snapshot(&self) -> VmCounters {
        let map = |c: &Counters| -> BTreeMap<String, u64> {
            c.snapshot()
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect()
        };
        VmCounters {
            vcpus: self
                .vcpus
                .iter()
                .enumerate()
                .map(|(id, c)| VcpuCounters {
                    id: id as u32,
                    exits: map(c),
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(id, c)| DeviceCounters {
                    id: id.clone(),
                    kind: c.kind().to_string(),
                    counters: map(c),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_vcpu_and_device() {
        let mut config = VmConfig::new("/k");
        config.cpus = 2;
        config.rng = true;
        config.disks.push("path=/d".parse().unwrap());
        let stats = Stats::new(&config);
        stats
            .device("block0", virtio::block::new_counters)
            .add(virtio::block::counter::READ_BYTES, 4096);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.vcpus.len(), 2);
        let ids: Vec<_> = snapshot.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["block0", "rng0"]);
        assert_eq!(snapshot.devices[0].kind, "block");
        assert_eq!(snapshot.devices[0].counters["read_bytes"], 4096);
        assert_eq!(snapshot.vcpus[1].exits["io_out"], 0);
    }
}
