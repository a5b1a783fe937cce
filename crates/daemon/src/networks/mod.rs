//! Virtual networks: their definitions (`<state-dir>/networks/NAME.toml`), checked against each
//! other (no two networks on one subnet or bridge) and against the host (the bridge of a nat or
//! isolated network must not exist yet; that of a bridge-mode network must), and their life:
//! start and stop ([`host_side`]: bridge, nftables, dnsmasq), autostart, DHCP leases, and the
//! TAP devices of the VMs attached ([`attach`]; [`ports`]: each made exclusively, recorded with its link
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

mod attach;
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
