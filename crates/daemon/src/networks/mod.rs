//! Virtual network definitions (`<state-dir>/networks/NAME.toml`): checked against each other
//! (no two networks on one subnet or bridge) and against the host (the bridge of a nat or
//! isolated network must not exist yet; that of a bridge-mode network must). Bringing networks
//! up (bridge, nftables, dnsmasq) comes with `start`.
//!
//! Threading: called from the API's blocking tasks; one mutex over the table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::net_api::{NetworkDefinition, NetworkInfo, NetworkMode, NetworkState};
use axum::http::StatusCode;

use crate::error::{chain, ApiError};
use crate::store::{atomic_write, StoreError};

/// The daemon's networks.
#[derive(Debug)]
pub struct Networks {
    dir: PathBuf,
    /// Where the host's network interfaces show (`/sys/class/net`; a test directory in tests).
    sys_net: PathBuf,
    networks: Mutex<BTreeMap<String, NetworkDefinition>>,
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no network named {name:?}"))
}

impl Networks {
    pub fn open(dir: PathBuf, sys_net: PathBuf) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut networks = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            match load(&path) {
                Ok(definition) => {
                    networks.insert(definition.name.clone(), definition);
                }
                Err(e) => tracing::error!("skipping network {}: {e}", path.display()),
            }
        }
        Ok(Networks {
            dir,
            sys_net,
            networks: Mutex::new(networks),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, NetworkDefinition>> {
        self.networks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn interface_exists(&self, name: &str) -> bool {
        self.sys_net.join(name).exists()
    }

    fn is_bridge(&self, name: &str) -> bool {
        self.sys_net.join(name).join("bridge").is_dir()
    }

    pub fn define(&self, definition: NetworkDefinition) -> Result<NetworkInfo, ApiError> {
        definition.validate().map_err(ApiError::bad_request)?;
        let subnet = definition.subnet().map_err(ApiError::bad_request)?;
        let mut networks = self.lock();
        if networks.contains_key(&definition.name) {
            return Err(ApiError::conflict(format!(
                "a network named {} already exists",
                definition.name
            )));
        }
        for other in networks.values() {
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
        match definition.mode {
            NetworkMode::Bridge if !self.is_bridge(&definition.bridge) => {
                return Err(ApiError::conflict(format!(
                    "there is no bridge {} on this host to attach VMs to",
                    definition.bridge
                )));
            }
            NetworkMode::Nat | NetworkMode::Isolated
                if self.interface_exists(&definition.bridge) =>
            {
                return Err(ApiError::conflict(format!(
                    "an interface named {} already exists on this host",
                    definition.bridge
                )));
            }
            _ => {}
        }
        let path = self.dir.join(format!("{}.toml", definition.name));
        let text =
            toml::to_string_pretty(&definition).map_err(|e| ApiError::internal(e.to_string()))?;
        atomic_write(&path, text.as_bytes()).map_err(|e| ApiError::internal(chain(&e)))?;
        let info = NetworkInfo {
            definition: definition.clone(),
            state: NetworkState::Inactive,
        };
        networks.insert(definition.name.clone(), definition);
        Ok(info)
    }

    pub fn undefine(&self, name: &str) -> Result<(), ApiError> {
        let mut networks = self.lock();
        if !networks.contains_key(name) {
            return Err(not_found(name));
        }
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::remove_file(&path)
            .map_err(|e| ApiError::internal(format!("cannot remove {}: {e}", path.display())))?;
        networks.remove(name);
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let networks = self.lock();
        let definition = networks.get(name).ok_or_else(|| not_found(name))?;
        Ok(NetworkInfo {
            definition: definition.clone(),
            state: NetworkState::Inactive,
        })
    }

    pub fn list(&self) -> Vec<NetworkInfo> {
        self.lock()
            .values()
            .map(|definition| NetworkInfo {
                definition: definition.clone(),
                state: NetworkState::Inactive,
            })
            .collect()
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
