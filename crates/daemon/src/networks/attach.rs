//! The VMs' side of the networks: a starting VM's NICs get their TAP devices on their
//! networks' bridges (each made exclusively, with its reserved address, filter rules and DHCP
//! entry; all or nothing), recorded as ports in the network's runtime directory and removed
//! by the link index recorded when the VM's VMM ends; after a daemon restart, the ports of
//! the VMs still running are found again (and those of older daemons, by their names).
//!
//! Threading: under the networks' table lock, like every host change of a network.

use std::collections::BTreeMap;

use api::net::MacAddress;
use api::net_api::NetworkMode;

use super::host_side::HostError;
use super::{dnsmasq, firewall, host_side, ports};
use super::{host_error, not_found, Entry, NetworkNic, Networks, Port};
use crate::failure::{chain, Failure};

impl Networks {
    /// Creates the TAP devices of a starting VM's NICs on their networks' bridges, each with
    /// its reserved address, filter rules and DHCP entry; all or nothing. An interface that
    /// has a NIC's TAP name and that the daemon did not make for this VM is left alone and
    /// the start refused.
    pub fn attach(&self, vm: &str, nics: &[NetworkNic]) -> Result<(), Failure> {
        let mut table = self.lock();
        let entries = table.entries_mut();
        for nic in nics {
            let entry = entries.get(&nic.network).ok_or_else(|| {
                Failure::conflict(format!("VM {vm}: there is no network {}", nic.network))
            })?;
            if !entry.active {
                return Err(Failure::conflict(format!(
                    "VM {vm}: network {} is not active (ferro net start {})",
                    nic.network, nic.network
                )));
            }
        }
        // A record left by a run of this VM that ended unseen, or whose TAP devices could not
        // be removed then: its links are ours to remove.
        self.remove_ports(entries, vm);
        if let Some(left) = entries
            .values()
            .flat_map(|e| &e.record.ports)
            .find(|p| p.vm == vm)
        {
            return Err(Failure::internal(format!(
                "VM {vm}: its TAP device {} from an earlier run cannot be removed (see the \
                 daemon's log); remove it (ip link delete {}) and start the VM again",
                left.tap, left.tap
            )));
        }
        for (done, nic) in nics.iter().enumerate() {
            if let Err(e) = self.add_port(entries, vm, nic) {
                for earlier in &nics[..done] {
                    self.remove_port(entries, &earlier.network, &earlier.tap);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes the TAP device of one NIC and records it as a port.
    fn add_port(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        vm: &str,
        nic: &NetworkNic,
    ) -> Result<(), Failure> {
        let entry = entries
            .get_mut(&nic.network)
            .ok_or_else(|| not_found(&nic.network))?;
        let network = entry.definition.name.clone();
        if let Some(other) = entry.record.ports.iter().find(|p| p.mac == nic.mac) {
            return Err(Failure::conflict(format!(
                "VM {vm}: MAC {} is already on network {network} (VM {}); give the NIC another mac",
                nic.mac, other.vm
            )));
        }
        let ip = self.reserve(entry, nic.mac)?;
        let ifindex =
            host_side::add_tap(&nic.tap, &entry.definition.bridge).map_err(|e| match e {
                HostError::Netlink(crate::networks::netlink::NetlinkError::Exists(_)) => {
                    Failure::conflict(format!(
                "VM {vm}: an interface named {} exists and the daemon did not make it for this VM, \
                 so it is left alone; remove it (ip link delete {}) if it is a leftover",
                nic.tap, nic.tap
            ))
                }
                e => host_error(&network, &e),
            })?;
        let recorded = self.record_port(entries, vm, nic, ifindex, ip);
        if recorded.is_err() {
            self.remove_port(entries, &nic.network, &nic.tap);
        }
        recorded
    }

    /// Records link `ifindex` as the port of `nic` (its TAP device, on the bridge) with address
    /// `ip`, then gives it its filter and DHCP entry (an error when its filter cannot be
    /// loaded: a new TAP device is then removed, see [`Networks::add_port`]).
    fn record_port(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        vm: &str,
        nic: &NetworkNic,
        ifindex: u32,
        ip: Option<std::net::Ipv4Addr>,
    ) -> Result<(), Failure> {
        let entry = entries
            .get_mut(&nic.network)
            .ok_or_else(|| not_found(&nic.network))?;
        let dns_name = free_dns_name(entry, vm, nic);
        entry.record.ports.push(Port {
            vm: vm.to_string(),
            tap: nic.tap.clone(),
            ifindex,
            mac: nic.mac,
            ip,
            dns_name,
        });
        let joined = self.save_record(entry).and_then(|()| {
            let Some(ip) = ip.filter(|_| entry.active) else {
                return Ok(());
            };
            let filter = firewall::PortFilter {
                tap: &nic.tap,
                mac: nic.mac,
                ip,
            };
            let run_dir = self.run_dir(&entry.definition.name);
            host_side::port_joined(&entry.definition, &run_dir, &entry.record.ports, &filter)
                .map_err(|e| host_error(&entry.definition.name, &e))
        });
        self.reindex(entries);
        joined
    }

    /// The address for a new port with `mac` on `entry` (none on bridge-mode networks).
    fn reserve(
        &self,
        entry: &Entry,
        mac: MacAddress,
    ) -> Result<Option<std::net::Ipv4Addr>, Failure> {
        if entry.definition.mode == NetworkMode::Bridge {
            return Ok(None);
        }
        let files = dnsmasq::DnsmasqFiles::new(self.run_dir(&entry.definition.name));
        let leases =
            dnsmasq::parse_leases(&std::fs::read_to_string(files.leases()).unwrap_or_default());
        let taken: Vec<_> = entry.record.ports.iter().filter_map(|p| p.ip).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let taken = ports::Taken {
            ports: &taken,
            leases: &leases,
            now,
        };
        ports::reserve_address(&entry.definition, mac, taken)
            .map(Some)
            .ok_or_else(|| {
                Failure::conflict(format!(
                    "network {}: every address of its DHCP range is taken",
                    entry.definition.name
                ))
            })
    }

    /// Removes port `tap` of network `network`: its link (only the one the daemon made), its
    /// record, rules and DHCP entry.
    fn remove_port(&self, entries: &mut BTreeMap<String, Entry>, network: &str, tap: &str) {
        let Some(entry) = entries.get_mut(network) else {
            return;
        };
        let Some(at) = entry.record.ports.iter().position(|p| p.tap == tap) else {
            return;
        };
        if let Err(e) =
            host_side::remove_tap(&entry.record.ports[at].tap, entry.record.ports[at].ifindex)
        {
            // Still recorded, so still this VM's (its name, and so its VM id, given to no one
            // else; its filter kept), and tried again at the VM's next start.
            let port = &entry.record.ports[at];
            tracing::warn!(
                "VM {} on network {network}: {}; its TAP device {} stays recorded",
                port.vm,
                chain(&e),
                port.tap
            );
            return;
        }
        entry.record.ports.remove(at);
        if let Err(e) = self.save_record(entry) {
            tracing::warn!("network {network}: {}", e.message);
        }
        if entry.active && entry.definition.mode != NetworkMode::Bridge {
            let run_dir = self.run_dir(network);
            let left = host_side::port_left(&entry.definition, &run_dir, &entry.record.ports, tap);
            if let Err(e) = left {
                tracing::warn!("network {network}: {}", chain(&e));
            }
        }
        self.reindex(entries);
    }

    /// Removes every port of VM `vm`.
    fn remove_ports(&self, entries: &mut BTreeMap<String, Entry>, vm: &str) {
        let ports: Vec<(String, String)> = entries
            .iter()
            .flat_map(|(network, entry)| {
                entry
                    .record
                    .ports
                    .iter()
                    .filter(|p| p.vm == vm)
                    .map(move |p| (network.clone(), p.tap.clone()))
            })
            .collect();
        for (network, tap) in ports {
            self.remove_port(entries, &network, &tap);
        }
    }

    /// After a daemon restart, for a VM found running: its ports are on their bridges again.
    /// A VM started by a daemon that kept no record of ports (older than records) has its TAP
    /// devices under `legacy` names: the TAP devices of those names are taken as its own, as
    /// that daemon did, and recorded.
    pub fn reattach(&self, vm: &str, legacy: &[NetworkNic]) {
        let mut table = self.lock();
        let entries = table.entries_mut();
        let recorded = entries
            .values()
            .any(|e| e.record.ports.iter().any(|p| p.vm == vm));
        if !recorded {
            for nic in legacy {
                if let Err(e) = self.adopt_legacy_port(entries, vm, nic) {
                    tracing::warn!("VM {vm} on network {}: {}", nic.network, e.message);
                }
            }
        }
        for entry in entries.values() {
            for port in entry.record.ports.iter().filter(|p| p.vm == vm) {
                if let Err(e) = host_side::ensure_on_bridge(&port.tap, &entry.definition.bridge) {
                    tracing::warn!(
                        "VM {vm} on network {}: {}",
                        entry.definition.name,
                        chain(&e)
                    );
                }
            }
        }
    }

    /// Records the existing TAP device of a VM an older daemon started.
    fn adopt_legacy_port(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        vm: &str,
        nic: &NetworkNic,
    ) -> Result<(), Failure> {
        let link = crate::networks::netlink::link_named(&nic.tap)
            .map_err(|e| Failure::internal(chain(&e)))?
            .filter(|link| link.tun)
            .ok_or_else(|| Failure::conflict(format!("no TAP device {}", nic.tap)))?;
        // Old names could collide: a TAP already recorded for another VM is not taken twice.
        if let Some(claim) = self.claim_on(&nic.tap) {
            return Err(Failure::conflict(format!("{} is {claim}", nic.tap)));
        }
        let entry = entries
            .get(&nic.network)
            .ok_or_else(|| not_found(&nic.network))?;
        let ip = self.reserve(entry, nic.mac)?;
        self.record_port(entries, vm, nic, link.index, ip)
    }

    /// Removes a stopped VM's TAP devices from its networks.
    pub fn detach(&self, vm: &str) {
        let mut table = self.lock();
        let entries = table.entries_mut();
        self.remove_ports(entries, vm);
    }

    /// Removes the ports of VMs not in `running` (recorded by a daemon that stopped before
    /// their VMs ended, whose run is gone without a trace): called once VMs are adopted.
    pub fn forget_all_but(&self, running: &[String]) {
        let mut table = self.lock();
        let entries = table.entries_mut();
        let stale: Vec<String> = entries
            .values()
            .flat_map(|e| e.record.ports.iter().map(|p| p.vm.clone()))
            .filter(|vm| !running.contains(vm))
            .collect();
        for vm in stale {
            tracing::info!("removing the TAP devices of VM {vm}, which no longer runs");
            self.remove_ports(entries, &vm);
        }
    }

    /// Records an existing link on no bridge (a veth end, standing in for a VM's TAP device)
    /// as the port of `nic`, for tests of the filter and DHCP with real clients.
    #[cfg(test)]
    pub(super) fn join_link(&self, vm: &str, nic: &NetworkNic) -> Result<(), Failure> {
        let mut table = self.lock();
        let entries = table.entries_mut();
        let entry = entries
            .get(&nic.network)
            .ok_or_else(|| not_found(&nic.network))?;
        let ip = self.reserve(entry, nic.mac)?;
        let link = crate::networks::netlink::link_named(&nic.tap)
            .ok()
            .flatten()
            .ok_or_else(|| not_found(&nic.tap))?;
        host_side::ensure_on_bridge(&nic.tap, &entry.definition.bridge)
            .map_err(|e| Failure::internal(chain(&e)))?;
        self.record_port(entries, vm, nic, link.index, ip)
    }
}

/// The DNS name a VM's port joining `entry` gets: its own, unless reserved or taken (in any
/// case) by a fixed host or another VM on the network, which keeps it; then none, with a
/// warning, and the VM is reached by address.
fn free_dns_name(entry: &Entry, vm: &str, nic: &NetworkNic) -> Option<String> {
    let name = nic.dns_name.as_deref()?;
    let hosts = entry.definition.hosts.iter().map(|h| h.name.as_str());
    let ports = entry
        .record
        .ports
        .iter()
        .filter_map(|p| p.dns_name.as_deref());
    if dnsmasq::name_free(name, hosts.chain(ports)) {
        return Some(name.to_string());
    }
    tracing::warn!(
        "VM {vm} on network {}: the DNS name {name} is reserved or another host of the network \
         has it (names are case-insensitive); the VM gets its address without a name",
        entry.definition.name
    );
    None
}
