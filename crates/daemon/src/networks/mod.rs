//! Virtual networks: their definitions (`<state-dir>/networks/NAME.toml`), checked against each
//! other (no two networks on one subnet or bridge) and against the host (the bridge of a nat or
//! isolated network must not exist yet; that of a bridge-mode network must), and their life:
//! start and stop ([`host_side`]: bridge, nftables, dnsmasq), autostart, DHCP leases, and the
//! TAP devices of the VMs attached.
//!
//! A started network has a runtime directory, `<state-dir>/networks/NAME.run/`; a new daemon
//! takes the networks that have one as active and brings them up again, which finds what is
//! there instead of duplicating it.
//!
//! Threading: called from the API's blocking tasks; one mutex over the table, held across the
//! host changes of one network so two requests never race on it.

pub mod dnsmasq;
pub mod firewall;
pub mod host_side;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::net::MacAddress;
use api::net_api::{Lease, NetworkDefinition, NetworkInfo, NetworkMode, NetworkState};
use axum::http::StatusCode;

use crate::error::{chain, ApiError};
use crate::store::{atomic_write, StoreError};
use host_side::{HostError, Tools};

/// One network: its definition, whether it runs, and the VMs attached to it.
#[derive(Debug)]
struct Entry {
    definition: NetworkDefinition,
    active: bool,
    /// VM name to its NICs on this network: (MAC, TAP device).
    vms: BTreeMap<String, Vec<(MacAddress, String)>>,
}

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

    /// The attached VMs' MACs and names, for DHCP and DNS.
    fn dhcp_clients(&self) -> Vec<(MacAddress, String)> {
        self.vms
            .iter()
            .flat_map(|(vm, nics)| nics.iter().map(move |(mac, _)| (*mac, vm.clone())))
            .collect()
    }
}

/// A NIC of a VM on a network, as [`Networks::attach`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkNic {
    pub network: String,
    pub mac: MacAddress,
    pub tap: String,
}

/// The daemon's networks.
#[derive(Debug)]
pub struct Networks {
    dir: PathBuf,
    /// Where the host's network interfaces show (`/sys/class/net`; a test directory in tests).
    sys_net: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no network named {name:?}"))
}

fn host_error(name: &str, e: &HostError) -> ApiError {
    ApiError::internal(format!("network {name}: {}", chain(e)))
}

impl Networks {
    pub fn open(dir: PathBuf, sys_net: PathBuf) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut entries = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            match load(&path) {
                Ok(definition) => {
                    let active = dir.join(format!("{}.run", definition.name)).is_dir();
                    let entry = Entry {
                        definition,
                        active,
                        vms: BTreeMap::new(),
                    };
                    entries.insert(entry.definition.name.clone(), entry);
                }
                Err(e) => tracing::error!("skipping network {}: {e}", path.display()),
            }
        }
        Ok(Networks {
            dir,
            sys_net,
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn save(&self, definition: &NetworkDefinition) -> Result<(), ApiError> {
        let path = self.dir.join(format!("{}.toml", definition.name));
        let text =
            toml::to_string_pretty(definition).map_err(|e| ApiError::internal(e.to_string()))?;
        atomic_write(&path, text.as_bytes()).map_err(|e| ApiError::internal(chain(&e)))
    }

    pub fn define(&self, definition: NetworkDefinition) -> Result<NetworkInfo, ApiError> {
        definition.validate().map_err(ApiError::bad_request)?;
        let subnet = definition.subnet().map_err(ApiError::bad_request)?;
        let mut entries = self.lock();
        if entries.contains_key(&definition.name) {
            return Err(ApiError::conflict(format!(
                "a network named {} already exists",
                definition.name
            )));
        }
        for other in entries.values().map(|e| &e.definition) {
            if other.bridge == definition.bridge {
                return Err(ApiError::conflict(format!(
                    "network {} already uses bridge {}",
                    other.name, other.bridge
                )));
            }
            let overlap = match (subnet, other.subnet().ok().flatten()) {
                (Some(mine), Some(theirs)) => mine.overlaps(&theirs).then_some(theirs),
                _ => None,
            };
            if let Some(theirs) = overlap {
                return Err(ApiError::conflict(format!(
                    "subnet {} overlaps {theirs} of network {}",
                    subnet.map(|s| s.to_string()).unwrap_or_default(),
                    other.name
                )));
            }
        }
        self.check_host(&definition, false)?;
        self.save(&definition)?;
        let entry = Entry {
            definition,
            active: false,
            vms: BTreeMap::new(),
        };
        let info = entry.info();
        entries.insert(entry.definition.name.clone(), entry);
        Ok(info)
    }

    /// Checks the definition against the host's interfaces; `ours` when the network's own
    /// bridge may exist (it is being brought up again).
    fn check_host(&self, definition: &NetworkDefinition, ours: bool) -> Result<(), ApiError> {
        match definition.mode {
            NetworkMode::Bridge if !self.is_bridge(&definition.bridge) => {
                Err(ApiError::conflict(format!(
                    "there is no bridge {} on this host to attach VMs to",
                    definition.bridge
                )))
            }
            NetworkMode::Nat | NetworkMode::Isolated
                if !ours && self.interface_exists(&definition.bridge) =>
            {
                Err(ApiError::conflict(format!(
                    "an interface named {} already exists on this host",
                    definition.bridge
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn undefine(&self, name: &str) -> Result<(), ApiError> {
        let mut entries = self.lock();
        let entry = entries.get(name).ok_or_else(|| not_found(name))?;
        if entry.active {
            return Err(ApiError::conflict(format!(
                "network {name} is active: stop it first"
            )));
        }
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::remove_file(&path)
            .map_err(|e| ApiError::internal(format!("cannot remove {}: {e}", path.display())))?;
        entries.remove(name);
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let entries = self.lock();
        Ok(entries.get(name).ok_or_else(|| not_found(name))?.info())
    }

    pub fn list(&self) -> Vec<NetworkInfo> {
        self.lock().values().map(Entry::info).collect()
    }

    /// Brings a network up.
    pub fn start(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| not_found(name))?;
        if entry.active {
            return Err(ApiError::conflict(format!(
                "network {name} is already active"
            )));
        }
        self.check_host(&entry.definition, false)?;
        self.bring_up(entry, false)?;
        entry.active = true;
        Ok(entry.info())
    }

    /// The host side of `entry`: created, or (`again`, after a daemon restart) found and
    /// completed. A failed first start leaves nothing behind.
    fn bring_up(&self, entry: &Entry, again: bool) -> Result<(), ApiError> {
        let definition = &entry.definition;
        let name = &definition.name;
        let run_dir = self.run_dir(name);
        let Some(subnet) = definition.subnet().map_err(ApiError::bad_request)? else {
            // Bridge mode: the host's bridge is all there is.
            return std::fs::create_dir_all(&run_dir).map_err(|e| {
                ApiError::internal(format!("cannot create {}: {e}", run_dir.display()))
            });
        };
        if let Some(user) = host_side::subnet_in_use(subnet, &definition.bridge)
            .map_err(|e| host_error(name, &e))?
        {
            return Err(ApiError::conflict(format!(
                "network {name}: its subnet {subnet} is in use on this host ({user})"
            )));
        }
        let tools = Tools::find().map_err(|e| host_error(name, &e))?;
        let result =
            host_side::bring_up(definition, subnet, &run_dir, &tools, &entry.dhcp_clients());
        if let Err(e) = result {
            if !again {
                let _ = host_side::tear_down(definition, &run_dir, Some(&tools));
            }
            return Err(host_error(name, &e));
        }
        Ok(())
    }

    /// Takes a network down; refused while VMs are attached.
    pub fn stop(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| not_found(name))?;
        if !entry.active {
            return Err(ApiError::conflict(format!("network {name} is not active")));
        }
        if !entry.vms.is_empty() {
            let vms: Vec<&str> = entry.vms.keys().map(String::as_str).collect();
            return Err(ApiError::conflict(format!(
                "network {name} has running VMs: {}",
                vms.join(", ")
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
                host_side::tear_down(&entry.definition, &run_dir, tools.as_ref())
            }
        };
        entry.active = false;
        result.map_err(|e| host_error(name, &e))?;
        Ok(entry.info())
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<NetworkInfo, ApiError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| not_found(name))?;
        let mut definition = entry.definition.clone();
        definition.autostart = enabled;
        self.save(&definition)?;
        entry.definition = definition;
        Ok(entry.info())
    }

    /// The DHCP leases of a network (none for bridge-mode or inactive networks).
    pub fn leases(&self, name: &str) -> Result<Vec<Lease>, ApiError> {
        let entries = self.lock();
        let entry = entries.get(name).ok_or_else(|| not_found(name))?;
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
            .values()
            .map(|e| (e.definition.name.clone(), e.active))
            .collect();
        for (name, active) in names {
            let result = if active {
                let entries = self.lock();
                match entries.get(&name) {
                    Some(entry) => self.bring_up(entry, true),
                    None => Ok(()),
                }
            } else if self
                .lock()
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

    /// Creates the TAP devices of a starting VM's NICs on their networks' bridges; all or
    /// nothing.
    pub fn attach(&self, vm: &str, nics: &[NetworkNic]) -> Result<(), ApiError> {
        let mut entries = self.lock();
        for nic in nics {
            let entry = entries.get(&nic.network).ok_or_else(|| {
                ApiError::conflict(format!("VM {vm}: there is no network {}", nic.network))
            })?;
            if !entry.active {
                return Err(ApiError::conflict(format!(
                    "VM {vm}: network {} is not active (ferro net start {})",
                    nic.network, nic.network
                )));
            }
        }
        for (done, nic) in nics.iter().enumerate() {
            let bridge = entries
                .get(&nic.network)
                .map(|e| e.definition.bridge.clone())
                .unwrap_or_default();
            if let Err(e) = host_side::add_tap(&nic.tap, &bridge) {
                for earlier in &nics[..done] {
                    let _ = host_side::remove_tap(&earlier.tap);
                }
                return Err(host_error(&nic.network, &e));
            }
        }
        self.record(&mut entries, vm, nics);
        Ok(())
    }

    /// Notes the NICs of a VM found running after a daemon restart (its TAPs exist).
    pub fn reattach(&self, vm: &str, nics: &[NetworkNic]) {
        let mut entries = self.lock();
        for nic in nics {
            let Some(entry) = entries.get(&nic.network) else {
                continue;
            };
            if let Err(e) = host_side::ensure_on_bridge(&nic.tap, &entry.definition.bridge) {
                tracing::warn!("VM {vm} on network {}: {}", nic.network, chain(&e));
            }
        }
        self.record(&mut entries, vm, nics);
    }

    fn record(&self, entries: &mut BTreeMap<String, Entry>, vm: &str, nics: &[NetworkNic]) {
        for nic in nics {
            if let Some(entry) = entries.get_mut(&nic.network) {
                entry
                    .vms
                    .entry(vm.to_string())
                    .or_default()
                    .push((nic.mac, nic.tap.clone()));
            }
        }
        self.refresh_dhcp(entries, nics.iter().map(|n| n.network.as_str()));
    }

    /// Removes a stopped VM's TAP devices from its networks.
    pub fn detach(&self, vm: &str) {
        let mut entries = self.lock();
        let mut touched = Vec::new();
        for (name, entry) in entries.iter_mut() {
            for (_, tap) in entry.vms.remove(vm).unwrap_or_default() {
                if let Err(e) = host_side::remove_tap(&tap) {
                    tracing::warn!("VM {vm}: {}", chain(&e));
                }
                touched.push(name.clone());
            }
        }
        self.refresh_dhcp(&entries, touched.iter().map(String::as_str));
    }

    /// Rewrites the DHCP hosts of `names` (nat and isolated networks that run).
    fn refresh_dhcp<'a>(
        &self,
        entries: &BTreeMap<String, Entry>,
        names: impl Iterator<Item = &'a str>,
    ) {
        for name in names {
            let Some(entry) = entries.get(name) else {
                continue;
            };
            if !entry.active || entry.definition.mode == NetworkMode::Bridge {
                continue;
            }
            let updated = host_side::update_hosts(
                &entry.definition,
                &self.run_dir(name),
                &entry.dhcp_clients(),
            );
            if let Err(e) = updated {
                tracing::warn!("network {name}: {}", chain(&e));
            }
        }
    }
}

fn load(path: &Path) -> Result<NetworkDefinition, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse_network_definition(&text)
}

/// Parses a network definition file (TOML).
pub fn parse_network_definition(text: &str) -> Result<NetworkDefinition, String> {
    let definition: NetworkDefinition =
        toml::from_str(text).map_err(|e| e.message().to_string())?;
    definition.validate()?;
    Ok(definition)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(err.status, StatusCode::CONFLICT);
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
            networks.define(parse(default)).unwrap_err().status,
            StatusCode::CONFLICT
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
        assert_eq!(again.info("lan").unwrap_err().status, StatusCode::NOT_FOUND);
    }
}

/// The whole life of networks on this host's kernel, inside a network namespace of the test's
/// thread (skipped without root, nft or dnsmasq).
#[cfg(test)]
mod host_tests {
    use super::*;
    use crate::netlink;

    fn in_network_namespace(test: impl FnOnce() + Send + 'static) {
        if Tools::find().is_err() {
            eprintln!("skipped: nft or dnsmasq is not installed");
            return;
        }
        netlink::in_new_netns(test);
    }

    fn definition(name: &str, mode: &str, bridge: &str, subnet: &str) -> NetworkDefinition {
        parse_network_definition(&format!(
            "name = \"{name}\"\nmode = \"{mode}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\n"
        ))
        .unwrap()
    }

    fn open(dir: &Path) -> Networks {
        Networks::open(dir.join("networks"), dir.join("sys")).unwrap()
    }

    #[test]
    fn a_nat_network_runs_stops_and_is_found_again() {
        in_network_namespace(|| {
            let dir = tempfile::tempdir().unwrap();
            let networks = open(dir.path());
            networks
                .define(definition("lab", "nat", "ferrotest0", "10.66.0.0/24"))
                .unwrap();
            let info = networks.start("lab").unwrap();
            assert_eq!(info.state, NetworkState::Active);
            let tools = Tools::find().unwrap();
            let table = firewall::table_name("lab");
            assert!(firewall::exists(&tools.nft, &table));
            let files = dnsmasq::DnsmasqFiles::new(networks.run_dir("lab"));
            let pid = dnsmasq::running(&files).expect("dnsmasq runs");
            assert_eq!(
                netlink::ipv4_addresses("ferrotest0").unwrap(),
                [("10.66.0.1".parse().unwrap(), 24)]
            );
            assert_eq!(
                networks.start("lab").unwrap_err().status,
                StatusCode::CONFLICT
            );

            // A VM's NIC: a TAP on the bridge, its MAC and name handed to dnsmasq.
            let nic = NetworkNic {
                network: "lab".into(),
                mac: "52:54:00:00:00:42".parse().unwrap(),
                tap: "fvtest0".into(),
            };
            networks.attach("vm1", std::slice::from_ref(&nic)).unwrap();
            assert_eq!(
                netlink::master_of("fvtest0").unwrap(),
                netlink::link_index("ferrotest0").unwrap()
            );
            let hosts = std::fs::read_to_string(files.hosts()).unwrap();
            assert_eq!(hosts, "52:54:00:00:00:42,vm1\n");
            let err = networks.stop("lab").unwrap_err();
            assert!(err.message.contains("has running VMs: vm1"), "{err:?}");
            let missing = NetworkNic {
                network: "nope".into(),
                ..nic.clone()
            };
            assert!(networks.attach("vm2", &[missing]).is_err());

            // A new daemon: the same bridge, table and dnsmasq, nothing twice.
            drop(networks);
            let networks = open(dir.path());
            networks.resume();
            networks.reattach("vm1", std::slice::from_ref(&nic));
            assert_eq!(dnsmasq::running(&files), Some(pid));
            assert!(firewall::exists(&tools.nft, &table));
            assert_eq!(networks.info("lab").unwrap().state, NetworkState::Active);
            assert_eq!(netlink::ipv4_addresses("ferrotest0").unwrap().len(), 1);

            networks.detach("vm1");
            assert_eq!(netlink::link_index("fvtest0").unwrap(), None);
            assert_eq!(std::fs::read_to_string(files.hosts()).unwrap(), "");
            networks.stop("lab").unwrap();
            assert_eq!(netlink::link_index("ferrotest0").unwrap(), None);
            assert!(!firewall::exists(&tools.nft, &table));
            assert_eq!(dnsmasq::running(&files), None);
            assert!(networks.leases("lab").unwrap().is_empty());
            networks.undefine("lab").unwrap();
        });
    }

    /// Runs `command` (split at spaces) in the test thread's namespace; its exit status.
    fn run(command: &str) -> std::process::ExitStatus {
        let mut words = command.split_whitespace();
        std::process::Command::new(words.next().unwrap())
            .args(words)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    #[test]
    fn a_client_on_the_bridge_gets_a_lease_for_its_first_discover() {
        if run("busybox true").code() != Some(0) {
            eprintln!("skipped: busybox (udhcpc) is not installed");
            return;
        }
        in_network_namespace(|| {
            let dir = tempfile::tempdir().unwrap();
            let networks = open(dir.path());
            networks
                .define(definition("dhcp", "nat", "ferrotest2", "10.68.0.0/24"))
                .unwrap();
            networks.start("dhcp").unwrap();
            // A veth pair stands in for a VM's TAP: one end on the bridge, the client on the
            // other, both in this namespace.
            let client_mac = "52:54:00:68:00:07";
            let link =
                format!("ip link add fvclient0 address {client_mac} type veth peer name fvport0");
            assert!(run(&link).success());
            host_side::ensure_on_bridge("fvport0", "ferrotest2").unwrap();
            netlink::set_up("fvclient0").unwrap();
            // One DISCOVER, two seconds to answer it: an OFFER held back for an address
            // check (dnsmasq's ping takes 3 s) fails this.
            let udhcpc = "busybox udhcpc -i fvclient0 -f -q -n -B -t 1 -T 2 -s /bin/true";
            let answered = run(udhcpc).success();
            let leases = networks.leases("dhcp").unwrap();
            // Stopped before any assertion: dnsmasq would outlive a failed test.
            networks.stop("dhcp").unwrap();
            assert!(answered, "no lease for one DISCOVER");
            assert_eq!(leases.len(), 1, "{leases:?}");
            assert_eq!(leases[0].mac.to_string(), client_mac);
            assert!(leases[0].ip.octets()[..3] == [10, 68, 0], "{leases:?}");
        });
    }

    #[test]
    fn a_subnet_the_host_uses_is_refused_and_nothing_is_left_behind() {
        in_network_namespace(|| {
            let dir = tempfile::tempdir().unwrap();
            let networks = open(dir.path());
            netlink::create_bridge("hostbr", [2, 0, 0, 0, 0, 9]).unwrap();
            netlink::add_ipv4_address("hostbr", "10.67.1.1".parse().unwrap(), 16).unwrap();
            networks
                .define(definition("lab", "isolated", "ferrotest1", "10.67.5.0/24"))
                .unwrap();
            let err = networks.start("lab").unwrap_err();
            assert_eq!(err.status, StatusCode::CONFLICT);
            assert!(err.message.contains("hostbr has 10.67.1.1/16"), "{err:?}");
            assert_eq!(netlink::link_index("ferrotest1").unwrap(), None);
            assert_eq!(networks.info("lab").unwrap().state, NetworkState::Inactive);
            assert!(!networks.run_dir("lab").exists());
        });
    }
}
