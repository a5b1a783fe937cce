//! What a running network is on the host: for nat and isolated networks, the bridge with the
//! subnet's first address, the nftables tables (with IPv4 forwarding on for nat) and dnsmasq;
//! for bridge-mode networks, only the host's bridge, which Ferro never changes. The TAP
//! devices of the VMs on a network (one per NIC, put on its bridge) are here too.
//!
//! Bringing a network up is idempotent: after a daemon restart the same call finds the bridge
//! (the one the daemon made: same index), replaces the tables in one transaction and keeps the
//! running dnsmasq, so nothing is duplicated. Links are configured over netlink, created
//! exclusively and removed by the index they were created with; nft and dnsmasq get only
//! validated names.
//!
//! Threading: blocking calls, made under the networks' lock.

use std::path::{Path, PathBuf};

use api::net_api::{NetworkDefinition, NetworkMode, Subnet};

use super::dnsmasq::{self, DnsmasqError, DnsmasqFiles};
use super::firewall::{self, FirewallError, PortFilter};
use super::ports::Port;
use crate::networks::netlink::{self, NetlinkError, Removal};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Dnsmasq(#[from] DnsmasqError),
    #[error("cannot turn IPv4 forwarding on")]
    Forwarding(#[source] std::io::Error),
    #[error("{0} is not installed (looked in PATH, /usr/sbin and /sbin); {1}")]
    MissingTool(&'static str, &'static str),
    #[error(
        "{name} is not the bridge the daemon made for this network (it was link #{recorded}, \
         now #{found}); it is left alone: stop the network's VMs and remove or rename it"
    )]
    ForeignBridge {
        name: String,
        recorded: u32,
        found: u32,
    },
    #[error("cannot create {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The programs a nat or isolated network needs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub nft: String,
    pub dnsmasq: String,
}

impl Tools {
    /// Finds nft and dnsmasq.
    pub fn find() -> Result<Tools, HostError> {
        Ok(Tools {
            nft: find_program("nft")
                .ok_or(HostError::MissingTool("nft", "install Debian's nftables"))?,
            dnsmasq: find_program("dnsmasq").ok_or(HostError::MissingTool(
                "dnsmasq",
                "install Debian's dnsmasq-base",
            ))?,
        })
    }
}

fn find_program(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .map(|p| p.display().to_string())
}

/// Creates the runtime directory and the bridge of a nat or isolated network, or finds them
/// (after a restart: the bridge must be the one recorded, `recorded`); the bridge's index.
pub fn make_bridge(
    definition: &NetworkDefinition,
    run_dir: &Path,
    recorded: Option<u32>,
) -> Result<u32, HostError> {
    std::fs::create_dir_all(run_dir).map_err(|source| HostError::RunDir {
        path: run_dir.into(),
        source,
    })?;
    let bridge = &definition.bridge;
    match (netlink::link_named(bridge)?, recorded) {
        (Some(link), Some(recorded)) if link.index != recorded => Err(HostError::ForeignBridge {
            name: bridge.clone(),
            recorded,
            found: link.index,
        }),
        (Some(link), _) => Ok(link.index),
        (None, _) => {
            netlink::create_bridge(bridge, bridge_mac(&definition.name))?;
            netlink::link_named(bridge)?
                .map(|link| link.index)
                .ok_or_else(|| NetlinkError::Exists(bridge.clone()).into())
        }
    }
}

/// Brings the rest of the host side of a nat or isolated network up, on the bridge of
/// [`make_bridge`] (or checks it is, after a restart); `ports` are the VMs' TAP devices, for
/// DHCP, DNS and the bridge's filter.
pub fn bring_up(
    definition: &NetworkDefinition,
    subnet: Subnet,
    run_dir: &Path,
    tools: &Tools,
    ports: &[Port],
    filters: &[PortFilter<'_>],
) -> Result<(), HostError> {
    let bridge = &definition.bridge;
    netlink::add_ipv4_address(bridge, subnet.gateway(), subnet.prefix)?;
    netlink::set_up(bridge)?;
    if definition.mode == NetworkMode::Nat {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(HostError::Forwarding)?;
    }
    let filters = present(filters)?;
    if let Some(rules) = firewall::ruleset(definition, subnet, &filters) {
        // Tables of older daemons (other names; port filters in the bridge family) go.
        firewall::remove(&tools.nft, &firewall::legacy_table_name(&definition.name))?;
        firewall::apply(&tools.nft, &firewall::table_name(&definition.name), &rules)?;
    }
    let files = DnsmasqFiles::new(run_dir.into());
    let config = dnsmasq::config(definition, subnet, &files);
    let config_changed = std::fs::read_to_string(files.config()).ok().as_deref() != Some(&config);
    dnsmasq::write(&files.config(), &config)?;
    dnsmasq::write(&files.hosts(), &dnsmasq::hosts_file(definition, ports))?;
    match dnsmasq::running(&files) {
        Some(_) if !config_changed => dnsmasq::reload(&files),
        _ => {
            dnsmasq::stop(&files)?;
            dnsmasq::start(&tools.dnsmasq, &files)?;
        }
    }
    Ok(())
}

/// The bridge's MAC address: locally administered, the same at every start of the network.
fn bridge_mac(network: &str) -> [u8; 6] {
    let hash = api::net::stable_hash(network).to_le_bytes();
    [0x02, hash[0], hash[1], hash[2], hash[3], hash[4]]
}

/// A VM's TAP device joined the bridge (`ports` has it): its filter first, then its DHCP
/// entry, so it is filtered before it can get a lease. An error leaves the other ports'
/// filters as they were.
pub fn port_joined(
    definition: &NetworkDefinition,
    run_dir: &Path,
    ports: &[Port],
    filter: &PortFilter<'_>,
) -> Result<(), HostError> {
    if let Some(rules) = firewall::port_joined(definition, filter) {
        let tools = Tools::find()?;
        firewall::apply(&tools.nft, &firewall::table_name(&definition.name), &rules)?;
    }
    write_hosts(definition, run_dir, ports)
}

/// A VM's TAP device `tap` left the bridge (`ports` no longer has it): its DHCP entry and its
/// filter go.
pub fn port_left(
    definition: &NetworkDefinition,
    run_dir: &Path,
    ports: &[Port],
    tap: &str,
) -> Result<(), HostError> {
    let written = write_hosts(definition, run_dir, ports);
    if definition.mode != NetworkMode::Bridge {
        let tools = Tools::find()?;
        firewall::port_left(&tools.nft, definition, tap)?;
    }
    written
}

/// The filters of ports whose TAP devices exist (an ingress chain needs its device; one
/// removed behind the daemon's back has nothing left to filter).
fn present<'a>(filters: &[PortFilter<'a>]) -> Result<Vec<PortFilter<'a>>, HostError> {
    let mut kept = Vec::with_capacity(filters.len());
    for filter in filters {
        if netlink::link_named(filter.tap)?.is_some() {
            kept.push(*filter);
        }
    }
    Ok(kept)
}

/// Tells dnsmasq the network's DHCP hosts now.
fn write_hosts(
    definition: &NetworkDefinition,
    run_dir: &Path,
    ports: &[Port],
) -> Result<(), HostError> {
    let files = DnsmasqFiles::new(run_dir.into());
    dnsmasq::write(&files.hosts(), &dnsmasq::hosts_file(definition, ports))?;
    dnsmasq::reload(&files);
    Ok(())
}

/// Removes everything [`make_bridge`] and [`bring_up`] made, whatever is left of it; the
/// bridge only if it is the one recorded (`bridge_ifindex`; by name for networks started by
/// daemons that recorded none). Returns the first error but tries every step.
pub fn tear_down(
    definition: &NetworkDefinition,
    run_dir: &Path,
    tools: Option<&Tools>,
    bridge_ifindex: Option<u32>,
) -> Result<(), HostError> {
    let files = DnsmasqFiles::new(run_dir.into());
    let mut result = dnsmasq::stop(&files).map_err(HostError::from);
    if let Some(tools) = tools {
        for table in [
            firewall::table_name(&definition.name),
            firewall::legacy_table_name(&definition.name),
        ] {
            let removed = firewall::remove(&tools.nft, &table);
            result = result.and(removed.map_err(HostError::from));
        }
    }
    let removed = match bridge_ifindex {
        Some(index) => remove_link(&definition.bridge, index),
        None => netlink::delete_link(&definition.bridge).map_err(HostError::from),
    };
    result = result.and(removed);
    let _ = std::fs::remove_dir_all(run_dir);
    result
}

/// Creates the TAP device `tap` on `bridge`; its index. An interface named `tap` that exists
/// already (whoever made it) is an error ([`NetlinkError::Exists`]) and stays as it is.
pub fn add_tap(tap: &str, bridge: &str) -> Result<u32, HostError> {
    let index = netlink::create_tap(tap)?;
    let attached = netlink::set_master(tap, bridge).and_then(|()| netlink::set_up(tap));
    if let Err(e) = attached {
        let _ = netlink::delete_link_at(index, tap);
        return Err(e.into());
    }
    Ok(index)
}

/// Puts the TAP device `tap` of a running VM back on `bridge` if it is not there (the bridge
/// was made again after a host change); the VM keeps its device.
pub fn ensure_on_bridge(tap: &str, bridge: &str) -> Result<(), HostError> {
    let bridge_index = netlink::link_index(bridge)?;
    if bridge_index.is_some() && netlink::master_of(tap)? != bridge_index {
        netlink::set_master(tap, bridge)?;
        netlink::set_up(tap)?;
    }
    Ok(())
}

/// Removes the TAP device `tap` the daemon made with index `index` (gone already is fine; a
/// link that no longer is that one is left alone).
pub fn remove_tap(tap: &str, index: u32) -> Result<(), HostError> {
    remove_link(tap, index)
}

fn remove_link(name: &str, index: u32) -> Result<(), HostError> {
    if let Removal::NotOurs(now) = netlink::delete_link_at(index, name)? {
        tracing::warn!(
            "{name}: the link the daemon made (#{index}) is now called {now}; it is left alone"
        );
    }
    Ok(())
}

/// The host interface (other than `own_bridge`) that has an address in `subnet`, if any.
pub fn subnet_in_use(subnet: Subnet, own_bridge: &str) -> Result<Option<String>, HostError> {
    let overlaps = |address: std::net::Ipv4Addr, prefix: u8| {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0);
        let theirs = Subnet {
            network: (u32::from(address) & mask).into(),
            prefix,
        };
        subnet.contains(address) || theirs.overlaps(&subnet)
    };
    Ok(netlink::all_ipv4_addresses()?
        .into_iter()
        .find(|(ifname, address, prefix)| {
            ifname != own_bridge && *prefix > 0 && overlaps(*address, *prefix)
        })
        .map(|(ifname, address, prefix)| format!("{ifname} has {address}/{prefix}")))
}
