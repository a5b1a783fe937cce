//! The ports of a running network: the TAP devices the daemon made for VMs' NICs on it, each
//! with its owner, the link index it got at creation, the MAC the VM uses and the IPv4 address
//! reserved for it. They are recorded in the network's runtime directory (`ports.json`, replaced
//! atomically), so a restarted daemon knows which links are its own: a link is removed only by
//! its recorded index, and only while it still has its recorded name.
//!
//! The address of a port on a nat or isolated network is fixed when its TAP joins the bridge:
//! the network's fixed host for its MAC, else the address dnsmasq leased that MAC before, else
//! the first free address of the DHCP range from a point given by the MAC. dnsmasq hands out
//! exactly that address and the bridge's filter lets the port send from no other, so a guest
//! can never use another VM's address, not even before its first lease.
//!
//! Threading: plain data and files, used under the networks' lock.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use api::net::MacAddress;
use api::net_api::{Lease, NetworkDefinition};
use serde::{Deserialize, Serialize};

/// A TAP device the daemon made for a VM's NIC on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The VM whose NIC it is.
    pub vm: String,
    pub tap: String,
    /// The index the kernel gave the device when the daemon created it.
    pub ifindex: u32,
    /// The only source MAC the port may send.
    pub mac: MacAddress,
    /// The only source address the port may send (nat and isolated networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The name DHCP and DNS give the VM; none when the VM's name cannot be a DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

/// The record of a network's ports and bridge, in its runtime directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The index of the bridge the daemon created (nat and isolated networks); none for a
    /// network started by a daemon that recorded none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_ifindex: Option<u32>,
    #[serde(default)]
    pub ports: Vec<Port>,
}

fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("ports.json")
}

/// The network's record; an empty one when there is none (a new network, or one started by a
/// daemon that kept none) or it cannot be read (logged).
pub fn load(run_dir: &Path) -> Record {
    let path = path(run_dir);
    let Ok(bytes) = std::fs::read(&path) else {
        return Record::default();
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::error!("ignoring {}: {e}", path.display());
        Record::default()
    })
}

/// Replaces the network's record.
/// A record that could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: {message}", path.display())]
    Encode { path: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] crate::fs::WriteError),
}

pub fn save(run_dir: &Path, record: &Record) -> Result<(), SaveError> {
    let path = path(run_dir);
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| SaveError::Encode {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(crate::fs::write_atomic(&path, &bytes)?)
}

/// What address choice needs to know besides the definition.
#[derive(Debug, Clone, Copy)]
pub struct Taken<'a> {
    /// The addresses of the network's other ports.
    pub ports: &'a [Ipv4Addr],
    /// dnsmasq's leases (an address leased to another MAC that has not expired is taken).
    pub leases: &'a [Lease],
    /// Seconds since the Unix epoch.
    pub now: u64,
}

/// The address for a port with `mac` on a nat or isolated network (see the module's text), or
/// `None` when every address of the range is taken.
pub fn reserve_address(
    definition: &NetworkDefinition,
    mac: MacAddress,
    taken: Taken<'_>,
) -> Option<Ipv4Addr> {
    if let Some(host) = definition.hosts.iter().find(|h| h.mac == mac) {
        return Some(host.ip);
    }
    let (start, end) = definition.dhcp_range().ok().flatten()?;
    let (first, last) = (u32::from(start), u32::from(end));
    let free = |ip: Ipv4Addr| {
        !taken.ports.contains(&ip)
            && definition.hosts.iter().all(|h| h.ip != ip)
            && taken.leases.iter().all(|lease| {
                lease.ip != ip
                    || lease.mac == mac
                    || (lease.expires != 0 && lease.expires <= taken.now)
            })
    };
    let in_range = |ip: Ipv4Addr| (first..=last).contains(&u32::from(ip));
    let leased = taken
        .leases
        .iter()
        .find(|lease| lease.mac == mac && in_range(lease.ip))
        .map(|lease| lease.ip);
    if let Some(ip) = leased.filter(|ip| free(*ip)) {
        return Some(ip);
    }
    let count = u64::from(last - first) + 1;
    let offset = api::net::stable_hash(&mac.to_string()) % count;
    (0..count)
        .map(|step| first + ((offset + step) % count) as u32)
        .map(Ipv4Addr::from)
        .find(|ip| free(*ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::net_api::StaticHost;

    fn network(range: (&str, &str)) -> NetworkDefinition {
        let mut d: NetworkDefinition = toml::from_str(
            "name = \"n\"\nmode = \"nat\"\nbridge = \"b\"\nsubnet = \"10.9.0.0/24\"\n",
        )
        .unwrap();
        d.dhcp_start = Some(range.0.parse().unwrap());
        d.dhcp_end = Some(range.1.parse().unwrap());
        d
    }

    fn mac(last: u8) -> MacAddress {
        MacAddress([0x52, 0x54, 0, 0, 0, last])
    }

    fn lease(mac: MacAddress, ip: &str, expires: u64) -> Lease {
        Lease {
            mac,
            ip: ip.parse().unwrap(),
            hostname: None,
            expires,
        }
    }

    const NOW: u64 = 1_000_000;

    fn none() -> Taken<'static> {
        Taken {
            ports: &[],
            leases: &[],
            now: NOW,
        }
    }

    #[test]
    fn a_fixed_host_keeps_its_address_and_a_lease_is_kept() {
        let mut d = network(("10.9.0.10", "10.9.0.20"));
        d.hosts.push(StaticHost {
            mac: mac(1),
            ip: "10.9.0.5".parse().unwrap(),
            name: "web".into(),
        });
        assert_eq!(
            reserve_address(&d, mac(1), none()),
            Some("10.9.0.5".parse().unwrap())
        );
        let leases = [lease(mac(2), "10.9.0.17", NOW + 100)];
        let taken = Taken {
            leases: &leases,
            ..none()
        };
        assert_eq!(
            reserve_address(&d, mac(2), taken),
            Some("10.9.0.17".parse().unwrap())
        );
        // The same MAC gets the same address without a lease, too.
        assert_eq!(
            reserve_address(&d, mac(3), none()),
            reserve_address(&d, mac(3), none())
        );
    }

    #[test]
    fn taken_addresses_are_skipped_until_the_range_is_full() {
        let d = network(("10.9.0.10", "10.9.0.12"));
        let ports: Vec<Ipv4Addr> = vec!["10.9.0.10".parse().unwrap()];
        let leases = [
            lease(mac(7), "10.9.0.11", NOW + 100),
            // Expired: free again.
            lease(mac(8), "10.9.0.12", NOW - 1),
        ];
        let taken = Taken {
            ports: &ports,
            leases: &leases,
            now: NOW,
        };
        assert_eq!(
            reserve_address(&d, mac(9), taken),
            Some("10.9.0.12".parse().unwrap())
        );
        // Another MAC's lease of our old address is not ours to take.
        let leases = [
            lease(mac(9), "10.9.0.11", NOW + 100),
            lease(mac(7), "10.9.0.11", NOW + 200),
        ];
        let taken = Taken {
            ports: &ports,
            leases: &leases,
            now: NOW,
        };
        assert_eq!(
            reserve_address(&d, mac(9), taken),
            Some("10.9.0.12".parse().unwrap())
        );
        let full: Vec<Ipv4Addr> = ["10.9.0.10", "10.9.0.11", "10.9.0.12"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        let taken = Taken {
            ports: &full,
            ..none()
        };
        assert_eq!(reserve_address(&d, mac(9), taken), None);
    }

    #[test]
    fn records_survive_a_round_trip_and_junk_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Record::default());
        let record = Record {
            bridge_ifindex: Some(7),
            ports: vec![Port {
                vm: "web".into(),
                tap: "fv3n0".into(),
                ifindex: 42,
                mac: mac(1),
                ip: Some("10.9.0.10".parse().unwrap()),
                dns_name: Some("web".into()),
            }],
        };
        save(dir.path(), &record).unwrap();
        assert_eq!(load(dir.path()), record);
        std::fs::write(dir.path().join("ports.json"), "{nonsense").unwrap();
        assert_eq!(load(dir.path()), Record::default());
    }
}
