//! Virtual networks in the daemon's API (`/api/v1/networks`): definitions and their checks.
//! A `nat` or `isolated` network is a bridge the daemon creates with an IPv4 subnet, DHCP and
//! DNS; a `bridge` network attaches VMs to a bridge the host already has.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::net::{valid_interface_name, MacAddress};

/// Paths of the network API.
pub mod paths {
    pub const NETWORKS: &str = "/api/v1/networks";

    /// `/api/v1/networks/NAME`.
    pub fn network(name: &str) -> String {
        format!("{NETWORKS}/{name}")
    }

    /// `/api/v1/networks/NAME/leases`.
    pub fn leases(name: &str) -> String {
        format!("{NETWORKS}/{name}/leases")
    }
}

/// How VMs on the network reach the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A bridge with the subnet's first address, forwarding and masquerading outside.
    Nat,
    /// A bridge with an address; no forwarding.
    Isolated,
    /// An existing host bridge; no address, DHCP or DNS from Ferro.
    Bridge,
}

/// A fixed DHCP lease: this MAC always gets this address and DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticHost {
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    pub name: String,
}

/// A network definition: `<state-dir>/networks/NAME.toml`, and the body of
/// `POST /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDefinition {
    pub name: String,
    pub mode: NetworkMode,
    /// The bridge (created for nat/isolated, existing for bridge mode).
    pub bridge: String,
    /// `ADDRESS/PREFIX` of the subnet (nat and isolated), e.g. `192.168.122.0/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// First and last address DHCP hands out (default: the second host to the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_start: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_end: Option<Ipv4Addr>,
    /// DNS domain of the VMs' names (default `NAME.ferro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default)]
    pub hosts: Vec<StaticHost>,
    #[serde(default)]
    pub autostart: bool,
}

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N` (8 <= N <= 30, no host bits set).
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let bad =
            || format!("invalid subnet {text:?}: write ADDRESS/PREFIX, e.g. 192.168.122.0/24");
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("subnet {text}: the prefix must be 8 to 30"));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(format!(
                "subnet {text}: host bits are set (the network is {})",
                subnet.base()
            ));
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) & self.mask())
    }

    /// The first host address: the bridge's.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The last host address (before broadcast).
    pub fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.network) | !self.mask()) - 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether any address is in both.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let prefix = self.prefix.min(other.prefix);
        let mask = u32::MAX << (32 - u32::from(prefix));
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Whether `name` can be a host's DNS name on a network: a DNS label (see [`dns_label`]) that is
/// not all digits (`123` reads as an address to resolvers, and as a lease time to dnsmasq).
pub fn dns_host_name(name: &str) -> bool {
    dns_label(name) && !name.chars().all(|c| c.is_ascii_digit())
}

/// Whether `name` is a DNS label (letters, digits, inner hyphens; 1 to 63).
fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl NetworkDefinition {
    /// The subnet of a nat or isolated network.
    pub fn subnet(&self) -> Result<Option<Subnet>, String> {
        self.subnet.as_deref().map(Subnet::parse).transpose()
    }

    /// The DHCP range (first, last).
    pub fn dhcp_range(&self) -> Result<Option<(Ipv4Addr, Ipv4Addr)>, String> {
        let Some(subnet) = self.subnet()? else {
            return Ok(None);
        };
        let start = self
            .dhcp_start
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.gateway()) + 1));
        let end = self.dhcp_end.unwrap_or_else(|| subnet.last_host());
        Ok(Some((start, end)))
    }

    /// The DNS domain of the network's VMs.
    pub fn domain(&self) -> String {
        self.domain
            .clone()
            .unwrap_or_else(|| format!("{}.ferro", self.name))
    }

    /// Checks the definition on its own (other networks and the host are the daemon's part).
    pub fn validate(&self) -> Result<(), String> {
        crate::names::check_name(&self.name).map_err(|e| e.replace("VM name", "network name"))?;
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if !valid_interface_name(&self.bridge) || !self.bridge.chars().all(plain) {
            return Err(format!(
                "invalid bridge name {:?} (1 to 15 letters, digits, '-', '_' or '.')",
                self.bridge
            ));
        }
        let subnet = self.subnet()?;
        match (self.mode, subnet) {
            (NetworkMode::Bridge, Some(_)) => {
                return Err(
                    "a bridge-mode network has no subnet: the host's bridge has its own".into(),
                )
            }
            (NetworkMode::Bridge, None) => {
                if self.dhcp_start.is_some() || self.dhcp_end.is_some() || !self.hosts.is_empty() {
                    return Err("a bridge-mode network has no DHCP of its own".into());
                }
                return Ok(());
            }
            (_, None) => {
                return Err(format!("a {:?} network needs a subnet", self.mode).to_lowercase())
            }
            (_, Some(_)) => {}
        }
        let subnet = subnet.ok_or("no subnet")?;
        let (start, end) = self.dhcp_range()?.ok_or("no DHCP range")?;
        let usable = |ip: Ipv4Addr| {
            subnet.contains(ip)
                && ip != subnet.gateway()
                && u32::from(ip) <= u32::from(subnet.last_host())
                && ip != subnet.network
        };
        if !usable(start) || !usable(end) || u32::from(start) > u32::from(end) {
            return Err(format!(
                "the DHCP range {start}..{end} must be inside {subnet}, after the bridge's {}",
                subnet.gateway()
            ));
        }
        let domain = self.domain();
        if !domain.split('.').all(dns_label) {
            return Err(format!("invalid DNS domain {domain:?}"));
        }
        let mut seen_ips = Vec::new();
        let mut seen_names = Vec::new();
        let mut seen_macs = Vec::new();
        for host in &self.hosts {
            if !dns_label(&host.name) {
                return Err(format!("invalid host name {:?} (a DNS label)", host.name));
            }
            if !usable(host.ip) {
                return Err(format!(
                    "host {}: {} is not a usable address of {subnet}",
                    host.name, host.ip
                ));
            }
            if seen_ips.contains(&host.ip)
                || seen_names.contains(&&host.name)
                || seen_macs.contains(&host.mac)
            {
                return Err(format!(
                    "host {}: its address, name or MAC is given twice",
                    host.name
                ));
            }
            seen_ips.push(host.ip);
            seen_names.push(&host.name);
            seen_macs.push(host.mac);
        }
        Ok(())
    }
}

/// Whether a network exists only in its definition or is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkState {
    Active,
    Inactive,
}

/// `GET /api/v1/networks/NAME` and the lines of `GET /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInfo {
    pub definition: NetworkDefinition,
    pub state: NetworkState,
}

/// A DHCP lease handed out on a network (`GET /api/v1/networks/NAME/leases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    /// The name the client gave, or its fixed name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// When the lease ends, in seconds since the Unix epoch (0: never).
    pub expires: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(subnet: &str) -> NetworkDefinition {
        NetworkDefinition {
            name: "default".into(),
            mode: NetworkMode::Nat,
            bridge: "ferro0".into(),
            subnet: Some(subnet.into()),
            dhcp_start: None,
            dhcp_end: None,
            domain: None,
            hosts: Vec::new(),
            autostart: false,
        }
    }

    #[test]
    fn subnets_parse_and_overlap() {
        let a = Subnet::parse("192.168.122.0/24").unwrap();
        assert_eq!(a.gateway(), Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(a.last_host(), Ipv4Addr::new(192, 168, 122, 254));
        assert!(a.contains(Ipv4Addr::new(192, 168, 122, 77)));
        assert!(a.overlaps(&Subnet::parse("192.168.0.0/16").unwrap()));
        assert!(!a.overlaps(&Subnet::parse("192.168.123.0/24").unwrap()));
        for bad in [
            "192.168.122.1/24",
            "10.0.0.0",
            "10.0.0.0/31",
            "10.0.0.0/4",
            "x/24",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definitions_are_checked() {
        let good = nat("192.168.122.0/24");
        good.validate().unwrap();
        assert_eq!(
            good.dhcp_range().unwrap(),
            Some((
                Ipv4Addr::new(192, 168, 122, 2),
                Ipv4Addr::new(192, 168, 122, 254)
            ))
        );
        assert_eq!(good.domain(), "default.ferro");
        let mut bad_range = nat("10.0.0.0/24");
        bad_range.dhcp_start = Some(Ipv4Addr::new(10, 0, 1, 5));
        assert!(bad_range.validate().unwrap_err().contains("DHCP range"));
        let mut gateway_host = nat("10.0.0.0/24");
        gateway_host.hosts.push(StaticHost {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            name: "web".into(),
        });
        assert!(gateway_host.validate().is_err());
        let mut bridged = nat("10.0.0.0/24");
        bridged.mode = NetworkMode::Bridge;
        assert!(bridged.validate().is_err(), "bridge mode with a subnet");
        bridged.subnet = None;
        bridged.validate().unwrap();
        let mut no_subnet = nat("10.0.0.0/24");
        no_subnet.subnet = None;
        assert!(no_subnet.validate().unwrap_err().contains("needs a subnet"));
        let mut long_bridge = nat("10.0.0.0/24");
        long_bridge.bridge = "a-very-long-bridge-name".into();
        assert!(long_bridge.validate().is_err());
        let json =
            r#"{"name": "n", "mode": "nat", "bridge": "b", "subnet": "10.1.0.0/24", "dns": true}"#;
        let err = serde_json::from_str::<NetworkDefinition>(json).unwrap_err();
        assert!(err.to_string().contains("unknown field `dns`"), "{err}");
    }
}
