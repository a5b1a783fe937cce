//! Virtual networks: their definitions (`<state-dir>/networks/NAME.toml`), checked against each
//! other (no two networks on one subnet or bridge) and against the host (the bridge of a nat or
//! isolated network must not exist yet; that of a bridge-mode network must), and their life:
//! start and stop ([`host_side`]: bridge, nftables, dnsmasq), autostart, DHCP leases, and the
//! TAP devices of the VMs attached ([`ports`]: each made exclusively, recorded with its link
//! index, its MAC and reserved address pinned by the bridge's filter, removed only by that
//! index).
//!
//! A started network has a runtime directory, `<state-dir>/networks/NAME.run/`; a new daemon
//! takes the networks that have one as active and brings them up again, which finds what is
//! there instead of duplicating it, and reads the record of their ports there.
//!
//! Threading: called from the API's blocking tasks; one mutex over the table, held across the
//! host changes of one network so two requests never race on it. What VM operations ask on the
//! runtime's thread (a network's mode, who claims an interface name) comes from a small index
//! under a lock of its own, replaced after each change, so they never wait for a host change.

pub mod dnsmasq;
pub mod firewall;
pub mod host_side;
pub mod netlink;
pub mod ports;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::net::MacAddress;
use api::net_api::{Lease, NetworkDefinition, NetworkInfo, NetworkMode, NetworkState};

use crate::failure::{chain, Failure};
use crate::fs::DirError;
use crate::registry::{self, Registry};
use host_side::{HostError, Tools};
use ports::{Port, Record};

/// One network: its definition, whether it runs, and what the daemon made for it (the
/// bridge and the VMs' TAP devices, kept in the runtime directory).
type Entry = registry::Entry<NetworkDefinition, Record>;
type Table = Registry<NetworkDefinition, Record>;

impl Entry {
    fn info(&self) -> NetworkInfo {
        NetworkInfo {
            definition: self.definition.clone(),
            state: if self.active {
                NetworkState::Active
            } else {
                NetworkState::Inactive
            },
        }
    }

    /// The ports' filters, for the bridge's table (ports with an address: nat, isolated).
    fn port_filters(&self) -> Vec<firewall::PortFilter<'_>> {
        self.record
            .ports
            .iter()
            .filter_map(|port| {
                Some(firewall::PortFilter {
                    tap: &port.tap,
                    mac: port.mac,
                    ip: port.ip?,
                })
            })
            .collect()
    }

    /// The names of the VMs with a port here.
    fn vms(&self) -> Vec<&str> {
        let mut vms: Vec<&str> = self.record.ports.iter().map(|p| p.vm.as_str()).collect();
        vms.dedup();
        vms
    }
}

/// A NIC of a VM on a network, as [`Networks::attach`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkNic {
    pub network: String,
    pub mac: MacAddress,
    pub tap: String,
    /// The VM's DNS name (none when its name cannot be one).
    pub dns_name: Option<String>,
}

/// The daemon's networks.
#[derive(Debug)]
pub struct Networks {
    dir: PathBuf,
    /// Where the host's network interfaces show (`/sys/class/net`; a test directory in tests).
    sys_net: PathBuf,
    entries: Mutex<Table>,
    index: Mutex<Index>,
}

/// The networks' modes, and the interface names they claim (bridges, VMs' TAP devices) with
/// what each is: a copy of the table's answers to these two questions.
#[derive(Debug, Default)]
struct Index {
    modes: BTreeMap<String, NetworkMode>,
    claims: BTreeMap<String, String>,
}

impl Index {
    fn of(entries: &BTreeMap<String, Entry>) -> Index {
        let mut index = Index::default();
        for (name, entry) in entries {
            index.modes.insert(name.clone(), entry.definition.mode);
            let bridge = format!("the bridge of network {name}");
            index.claims.insert(entry.definition.bridge.clone(), bridge);
            for port in &entry.record.ports {
                let tap = format!("the TAP device of VM {} on network {name}", port.vm);
                index.claims.insert(port.tap.clone(), tap);
            }
        }
        index
    }
}

fn not_found(name: &str) -> Failure {
    registry::not_found::<NetworkDefinition>(name)
}

fn host_error(name: &str, e: &HostError) -> Failure {
    Failure::internal(format!("network {name}: {}", chain(e)))
}

impl Networks {
    pub fn open(dir: PathBuf, sys_net: PathBuf) -> Result<Self, DirError> {
        crate::fs::create_dir(&dir)?;
        let mut entries = Table::open(dir.clone())?;
        for entry in entries.entries_mut().values_mut() {
            let run_dir = dir.join(format!("{}.run", entry.definition.name));
            entry.active = run_dir.is_dir();
            if entry.active {
                entry.record = ports::load(&run_dir);
            }
        }
        Ok(Networks {
            dir,
            sys_net,
            index: Mutex::new(Index::of(entries.entries())),
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the index in line with the table (after any change of definitions or ports).
    fn reindex(&self, entries: &BTreeMap<String, Entry>) {
        let index = Index::of(entries);
        *self.index.lock().unwrap_or_else(PoisonError::into_inner) = index;
    }

    /// The mode of network `name`, if it is defined (never waits for a host change).
    pub fn mode_of(&self, name: &str) -> Option<NetworkMode> {
        let index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index.modes.get(name).copied()
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.run"))
    }

    fn interface_exists(&self, name: &str) -> bool {
        self.sys_net.join(name).exists()
    }

    fn is_bridge(&self, name: &str) -> bool {
        self.sys_net.join(name).join("bridge").is_dir()
    }

    pub fn define(&self, definition: NetworkDefinition) -> Result<NetworkInfo, Failure> {
        definition.validate().map_err(Failure::invalid)?;
        check_new_definition(&definition).map_err(Failure::invalid)?;
        let subnet = definition.subnet().map_err(Failure::invalid)?;
        let mut entries = self.lock();
        let info = entries
            .define(definition.clone(), |entries| {
                for other in entries.entries().values().map(|e| &e.definition) {
                    if other.bridge == definition.bridge {
                        return Err(Failure::conflict(format!(
                            "network {} already uses bridge {}",
                            other.name, other.bridge
                        )));
                    }
                    let overlap = match (subnet, other.subnet().ok().flatten()) {
                        (Some(mine), Some(theirs)) => mine.overlaps(&theirs).then_some(theirs),
                        _ => None,
                    };
                    if let Some(theirs) = overlap {
                        return Err(Failure::conflict(format!(
                            "subnet {} overlaps {theirs} of network {}",
                            subnet.map(|s| s.to_string()).unwrap_or_default(),
                            other.name
                        )));
                    }
                }
                self.check_host(&definition, false)
            })?
            .info();
        self.reindex(entries.entries());
        Ok(info)
    }

    /// Checks the definition against the host's interfaces; `ours` when the network's own
    /// bridge may exist (it is being brought up again).
    fn check_host(&self, definition: &NetworkDefinition, ours: bool) -> Result<(), Failure> {
        match definition.mode {
            NetworkMode::Bridge if !self.is_bridge(&definition.bridge) => {
                Err(Failure::conflict(format!(
                    "there is no bridge {} on this host to attach VMs to",
                    definition.bridge
                )))
            }
            NetworkMode::Nat | NetworkMode::Isolated
                if !ours && self.interface_exists(&definition.bridge) =>
            {
                Err(Failure::conflict(format!(
                    "an interface named {} already exists on this host",
                    definition.bridge
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn undefine(&self, name: &str) -> Result<(), Failure> {
        let mut entries = self.lock();
        entries.undefine(name)?;
        self.reindex(entries.entries());
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo, Failure> {
        Ok(self.lock().get(name)?.info())
    }

    pub fn list(&self) -> Vec<NetworkInfo> {
        self.lock().entries().values().map(Entry::info).collect()
    }

    /// Brings a network up.
    pub fn start(&self, name: &str) -> Result<NetworkInfo, Failure> {
        let mut entries = self.lock();
        let entry = entries.inactive(name)?;
        self.check_host(&entry.definition, false)?;
        entry.record = Record::default();
        self.bring_up(entry, false)?;
        entry.active = true;
        let info = entry.info();
        self.reindex(entries.entries());
        Ok(info)
    }

    /// The host side of `entry`: created, or (`again`, after a daemon restart) found and
    /// completed. A failed first start leaves nothing behind.
    fn bring_up(&self, entry: &mut Entry, again: bool) -> Result<(), Failure> {
        let definition = &entry.definition;
        let name = &definition.name;
        let run_dir = self.run_dir(name);
        let Some(subnet) = definition.subnet().map_err(Failure::invalid)? else {
            // Bridge mode: the host's bridge is all there is.
            return std::fs::create_dir_all(&run_dir).map_err(|e| {
                Failure::internal(format!("cannot create {}: {e}", run_dir.display()))
            });
        };
        if let Some(user) = host_side::subnet_in_use(subnet, &definition.bridge)
            .map_err(|e| host_error(name, &e))?
        {
            return Err(Failure::conflict(format!(
                "network {name}: its subnet {subnet} is in use on this host ({user})"
            )));
        }
        let tools = Tools::find().map_err(|e| host_error(name, &e))?;
        let bridge = host_side::make_bridge(definition, &run_dir, entry.record.bridge_ifindex)
            .map_err(|e| host_error(name, &e))?;
        let name = name.clone();
        if entry.record.bridge_ifindex != Some(bridge) {
            entry.record.bridge_ifindex = Some(bridge);
            self.save_record(entry)?;
        }
        let definition = &entry.definition;
        let filters = entry.port_filters();
        let result = host_side::bring_up(
            definition,
            subnet,
            &run_dir,
            &tools,
            &entry.record.ports,
            &filters,
        );
        if let Err(e) = result {
            if !again {
                let _ = host_side::tear_down(definition, &run_dir, Some(&tools), Some(bridge));
            }
            return Err(host_error(&name, &e));
        }
        Ok(())
    }

    /// Writes the record of `entry`'s ports and bridge to its runtime directory.
    fn save_record(&self, entry: &Entry) -> Result<(), Failure> {
        let run_dir = self.run_dir(&entry.definition.name);
        ports::save(&run_dir, &entry.record).map_err(|e| Failure::internal(chain(&e)))
    }

    /// Takes a network down; refused while VMs are attached.
    pub fn stop(&self, name: &str) -> Result<NetworkInfo, Failure> {
        let mut entries = self.lock();
        let entry = entries.active(name)?;
        if !entry.record.ports.is_empty() {
            return Err(Failure::conflict(format!(
                "network {name} has running VMs: {}",
                entry.vms().join(", ")
            )));
        }
        let run_dir = self.run_dir(name);
        let result = match entry.definition.mode {
            NetworkMode::Bridge => {
                let _ = std::fs::remove_dir_all(&run_dir);
                Ok(())
            }
            _ => {
                let tools = Tools::find().ok();
                let bridge = entry.record.bridge_ifindex;
                host_side::tear_down(&entry.definition, &run_dir, tools.as_ref(), bridge)
            }
        };
        entry.active = false;
        entry.record = Record::default();
        let info = entry.info();
        self.reindex(entries.entries());
        result.map_err(|e| host_error(name, &e))?;
        Ok(info)
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<NetworkInfo, Failure> {
        Ok(self.lock().set_autostart(name, enabled)?.info())
    }

    /// The DHCP leases of a network (none for bridge-mode or inactive networks).
    pub fn leases(&self, name: &str) -> Result<Vec<Lease>, Failure> {
        let entries = self.lock();
        let entry = entries.get(name)?;
        let files = dnsmasq::DnsmasqFiles::new(self.run_dir(name));
        if !entry.active || entry.definition.mode == NetworkMode::Bridge {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(files.leases()).unwrap_or_default();
        Ok(dnsmasq::parse_leases(&text))
    }

    /// At daemon start: brings the networks that were active up again (finding what is
    /// there), then starts those marked autostart.
    pub fn resume(&self) {
        let names: Vec<(String, bool)> = self
            .lock()
            .entries()
            .values()
            .map(|e| (e.definition.name.clone(), e.active))
            .collect();
        for (name, active) in names {
            let result = if active {
                let mut table = self.lock();
                let entries = table.entries_mut();
                match entries.get_mut(&name) {
                    Some(entry) => self.bring_up(entry, true),
                    None => Ok(()),
                }
            } else if self
                .lock()
                .entries()
                .get(&name)
                .is_some_and(|e| e.definition.autostart)
            {
                self.start(&name).map(|_| ())
            } else {
                Ok(())
            };
            if let Err(e) = result {
                tracing::error!("network {name}: {}", e.message);
            }
        }
    }

    /// Rolls over the dnsmasq logs of the active networks that reached their cap
    /// ([`dnsmasq::rotate_log`]); the daemon calls it every [`dnsmasq::LOG_CHECK_INTERVAL`].
    pub fn rotate_dnsmasq_logs(&self) {
        let dirs: Vec<PathBuf> = self
            .lock()
            .entries()
            .values()
            .filter(|e| e.active)
            .map(|e| self.run_dir(&e.definition.name))
            .collect();
        for dir in dirs {
            let files = dnsmasq::DnsmasqFiles::new(dir);
            if let Err(e) = dnsmasq::rotate_log(&files, guest_log::LogLimits::DEFAULT) {
                // Once a second while it fails: rate-limited.
                guest_log::guest_warn!("{}", chain(&e));
            }
        }
    }

    /// What the daemon made for a network, by interface name: the bridge of a network, or the
    /// TAP device of a VM's NIC on one. `None` for names it has no claim on.
    /// Never waits for a host change.
    pub fn claim_on(&self, interface: &str) -> Option<String> {
        let index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index.claims.get(interface).cloned()
    }

    /// The VM ids in the names of the TAP devices recorded on networks: not to be given to a
    /// new VM while a device of that name may be left (one that could not be removed).
    pub fn recorded_tap_ids(&self) -> std::collections::BTreeSet<u32> {
        let index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index
            .claims
            .keys()
            .filter_map(|name| api::daemon_api::network_tap_id(name))
            .collect()
    }

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
    fn join_link(&self, vm: &str, nic: &NetworkNic) -> Result<(), Failure> {
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

/// Checks a network definition needs at `define` only (definitions stored before these checks
/// still load).
fn check_new_definition(definition: &NetworkDefinition) -> Result<(), String> {
    if api::daemon_api::is_network_tap_name(&definition.bridge) {
        return Err(format!(
            "the bridge name {:?} is reserved: names like fvNnI are the TAP devices of VMs",
            definition.bridge
        ));
    }
    if let Some(host) = definition
        .hosts
        .iter()
        .find(|h| !api::net_api::dns_host_name(&h.name))
    {
        return Err(format!(
            "host name {:?} is all digits: a DNS name needs a letter",
            host.name
        ));
    }
    Ok(())
}

/// Parses a network definition file (TOML): the rules the CLI checks a file with.
#[cfg(test)]
pub use api::definition_file::parse_network as parse_network_definition;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Kind;

    fn setup() -> (tempfile::TempDir, Networks) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys-class-net");
        std::fs::create_dir_all(sys.join("eth0")).unwrap();
        std::fs::create_dir_all(sys.join("br-host/bridge")).unwrap();
        let networks = Networks::open(dir.path().join("networks"), sys).unwrap();
        (dir, networks)
    }

    fn parse(text: &str) -> NetworkDefinition {
        parse_network_definition(text).unwrap()
    }

    #[test]
    fn networks_do_not_collide_with_each_other_or_the_host() {
        let (dir, networks) = setup();
        let default = "name = \"default\"\nmode = \"nat\"\nbridge = \"ferro0\"\nsubnet = \"192.168.122.0/24\"\n";
        networks.define(parse(default)).unwrap();
        let overlapping =
            "name = \"b\"\nmode = \"isolated\"\nbridge = \"ferro1\"\nsubnet = \"192.168.0.0/16\"\n";
        let err = networks.define(parse(overlapping)).unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(
            err.message
                .contains("overlaps 192.168.122.0/24 of network default"),
            "{err:?}"
        );
        let same_bridge =
            "name = \"c\"\nmode = \"isolated\"\nbridge = \"ferro0\"\nsubnet = \"10.5.0.0/24\"\n";
        assert!(networks
            .define(parse(same_bridge))
            .unwrap_err()
            .message
            .contains("already uses bridge"));
        let host_interface =
            "name = \"d\"\nmode = \"nat\"\nbridge = \"eth0\"\nsubnet = \"10.6.0.0/24\"\n";
        assert!(networks
            .define(parse(host_interface))
            .unwrap_err()
            .message
            .contains("already exists on this host"));
        let missing_bridge = "name = \"e\"\nmode = \"bridge\"\nbridge = \"br-none\"\n";
        assert!(networks
            .define(parse(missing_bridge))
            .unwrap_err()
            .message
            .contains("no bridge br-none"));
        let host_bridge = "name = \"lan\"\nmode = \"bridge\"\nbridge = \"br-host\"\n";
        networks.define(parse(host_bridge)).unwrap();
        assert_eq!(
            networks.define(parse(default)).unwrap_err().kind,
            Kind::Conflict
        );
        // A new daemon finds them.
        let again = Networks::open(
            dir.path().join("networks"),
            dir.path().join("sys-class-net"),
        )
        .unwrap();
        let names: Vec<String> = again
            .list()
            .into_iter()
            .map(|n| n.definition.name)
            .collect();
        assert_eq!(names, ["default", "lan"]);
        again.undefine("lan").unwrap();
        assert_eq!(again.info("lan").unwrap_err().kind, Kind::NotFound);
    }
}

/// The whole life of networks on this host's kernel, inside network namespaces of the tests'
/// threads (skipped without root, nft or dnsmasq).
#[cfg(test)]
mod dnsmasq_log_tests;
#[cfg(test)]
mod host_tests;
