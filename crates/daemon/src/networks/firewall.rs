//! nftables rules of nat and isolated networks, two tables per network, both `ferro_NAME`:
//! - `ip`: nat: traffic from the subnet leaving it is masqueraded; the bridge forwards what its
//!   VMs send out and the replies, nothing that starts outside; isolated: nothing is forwarded
//!   to or from the bridge. Both: guests reach the host itself only for DHCP, DNS and ping on
//!   the bridge's address (and replies to what the host started).
//! - `bridge`: what each VM's TAP device may send into the bridge, as libvirt's clean-traffic
//!   filter has it: only its own MAC as source (ARP's sender included), only its reserved
//!   address (or 0.0.0.0 for a DHCP request), no DHCP server traffic, DHCP requests only for its
//!   own MAC, nothing but ARP and IPv4. A port the table does not list sends nothing.
//!
//! Rules are loaded with `nft -f -` as one transaction that replaces a table, so starting a
//! network twice (or after a daemon restart) never duplicates them; the bridge table is
//! replaced whenever a VM's TAP joins or leaves. Only validated names and addresses go into
//! the rules, and no shell is involved.
//!
//! Threading: blocking calls, made under the networks' lock.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use std::net::Ipv4Addr;

use api::net::MacAddress;
use api::net_api::{NetworkDefinition, NetworkMode, Subnet};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("nft refused the rules of table {table}: {message}")]
    Refused { table: String, message: String },
}

/// The table of network `name`. nft names are letters, digits and '_': other characters map
/// to '_' and a short hash of the name keeps the result unique.
pub fn table_name(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if plain == name {
        format!("ferro_{name}")
    } else {
        format!("ferro_{plain}_{:04x}", api::net::stable_hash(name) & 0xffff)
    }
}

/// A VM's TAP device on the bridge, as its filter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFilter<'a> {
    pub tap: &'a str,
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
}

/// The ruleset that (re)creates both tables of the network; None for bridge-mode networks.
pub fn ruleset(
    definition: &NetworkDefinition,
    subnet: Subnet,
    ports: &[PortFilter<'_>],
) -> Option<String> {
    Some(ip_ruleset(definition, subnet)? + &bridge_ruleset(definition, ports)?)
}

/// The ruleset that (re)creates the network's `ip` table.
fn ip_ruleset(definition: &NetworkDefinition, subnet: Subnet) -> Option<String> {
    let table = table_name(&definition.name);
    let bridge = &definition.bridge;
    let gateway = subnet.gateway();
    // The host itself: DHCP (broadcast or to the bridge), DNS and ping on the bridge's
    // address, and what belongs to connections the host started.
    let input = format!(
        "  chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{bridge}\" jump from_guests\n\
         \x20 }}\n\
         \x20 chain from_guests {{\n\
         \x20   ct state established,related accept\n\
         \x20   ip daddr {{ {gateway}, 255.255.255.255 }} udp dport 67 accept\n\
         \x20   ip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
         \x20   ip daddr {gateway} icmp type echo-request accept\n\
         \x20   drop\n\
         \x20 }}\n"
    );
    let chains = match definition.mode {
        NetworkMode::Bridge => return None,
        NetworkMode::Nat => format!(
            "  chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {subnet} ip daddr != {subnet} masquerade\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{bridge}\" ip saddr {subnet} accept\n\
             \x20   oifname \"{bridge}\" ip daddr {subnet} ct state established,related accept\n\
             \x20   iifname \"{bridge}\" drop\n\
             \x20   oifname \"{bridge}\" drop\n\
             \x20 }}\n"
        ),
        NetworkMode::Isolated => format!(
            "  chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{bridge}\" drop\n\
             \x20   oifname \"{bridge}\" drop\n\
             \x20 }}\n"
        ),
    };
    Some(replace_table("ip", &table, &(chains + &input)))
}

/// The ruleset that (re)creates the network's `bridge` table for `ports`; None for bridge-mode
/// networks.
pub fn bridge_ruleset(definition: &NetworkDefinition, ports: &[PortFilter<'_>]) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let verdicts: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("\"{}\" : jump port{i}", port.tap))
        .collect();
    let dispatch = if verdicts.is_empty() {
        String::new()
    } else {
        format!("    iifname vmap {{ {} }}\n", verdicts.join(", "))
    };
    let mut chains = format!(
        "  chain from_ports {{\n\
         \x20   type filter hook prerouting priority filter; policy accept;\n\
         {dispatch}\
         \x20   drop\n\
         \x20 }}\n"
    );
    for (i, port) in ports.iter().enumerate() {
        chains += &port_chain(i, port);
    }
    Some(replace_table("bridge", &table, &chains))
}

/// What one port may send (the rules end in a drop, so the dispatch's drop is never reached
/// for it).
fn port_chain(index: usize, port: &PortFilter<'_>) -> String {
    let PortFilter { mac, ip, .. } = port;
    // DHCP's client hardware address: 28 bytes into the message, after the 8-byte UDP header.
    let chaddr = format!("0x{}", mac.to_string().replace(':', ""));
    format!(
        "  chain port{index} {{\n\
         \x20   ether saddr != {mac} drop\n\
         \x20   arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether {mac} arp saddr ip {{ {ip}, 0.0.0.0 }} accept\n\
         \x20   ether type arp drop\n\
         \x20   udp sport 67 drop\n\
         \x20   udp dport 67 @th,288,48 != {chaddr} drop\n\
         \x20   ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n\
         \x20   ip saddr {ip} accept\n\
         \x20   drop\n\
         \x20 }}\n"
    )
}

/// Text that replaces table `family name` with one holding `chains`, in one transaction.
fn replace_table(family: &str, name: &str, chains: &str) -> String {
    // Declaring the table first makes the delete valid when it does not exist yet.
    format!(
        "table {family} {name} {{}}\ndelete table {family} {name}\ntable {family} {name} {{\n{chains}}}\n"
    )
}

/// Loads `rules` (see [`ruleset`]) for the table `table`.
pub fn apply(nft: &str, table: &str, rules: &str) -> Result<(), FirewallError> {
    run(nft, &["-f", "-"], Some(rules)).map_err(|e| e.for_table(table))
}

/// Removes both tables of a network, those that exist.
pub fn remove(nft: &str, table: &str) -> Result<(), FirewallError> {
    for family in FAMILIES {
        if exists_in(nft, family, table) {
            run(nft, &["delete", "table", family, table], None).map_err(|e| e.for_table(table))?;
        }
    }
    Ok(())
}

/// The families of a network's tables.
const FAMILIES: [&str; 2] = ["ip", "bridge"];

/// Whether table `family table` is loaded.
pub fn exists_in(nft: &str, family: &str, table: &str) -> bool {
    run(nft, &["list", "table", family, table], None).is_ok()
}

impl FirewallError {
    fn for_table(self, table: &str) -> Self {
        match self {
            FirewallError::Refused { message, .. } => FirewallError::Refused {
                table: table.into(),
                message,
            },
            other => other,
        }
    }
}

fn run(nft: &str, args: &[&str], input: Option<&str>) -> Result<(), FirewallError> {
    let spawn_error = |source| FirewallError::Spawn {
        binary: nft.into(),
        source,
    };
    let mut child = Command::new(nft)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&output.stderr)
        .lines()
        .find(|l| l.contains("Error:"))
        .map(str::to_string)
        .unwrap_or_else(|| output.status.to_string());
    Err(FirewallError::Refused {
        table: String::new(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(mode: &str) -> NetworkDefinition {
        toml::from_str(&format!(
            "name = \"lab-1\"\nmode = \"{mode}\"\nbridge = \"ferro-lab\"\nsubnet = \"10.77.0.0/24\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn table_names_are_nft_identifiers_and_unique() {
        assert_eq!(table_name("default"), "ferro_default");
        let (a, b) = (table_name("lab-1"), table_name("lab_1"));
        assert!(a.starts_with("ferro_lab_1_"), "{a}");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }

    #[test]
    fn nat_masquerades_what_leaves_the_subnet() {
        let d = definition("nat");
        let rules = ruleset(&d, d.subnet().unwrap().unwrap(), &[]).unwrap();
        let table = table_name("lab-1");
        assert!(rules.starts_with(&format!("table ip {table} {{}}\ndelete table ip {table}\n")));
        assert!(rules.contains("ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade"));
        assert!(rules.contains(
            "oifname \"ferro-lab\" ip daddr 10.77.0.0/24 ct state established,related accept"
        ));
        let isolated = definition("isolated");
        let rules = ruleset(&isolated, isolated.subnet().unwrap().unwrap(), &[]).unwrap();
        assert!(!rules.contains("masquerade"));
        assert!(rules.contains("iifname \"ferro-lab\" drop"));
    }

    fn ports() -> [PortFilter<'static>; 2] {
        [
            PortFilter {
                tap: "fv1n0",
                mac: "52:54:00:00:00:01".parse().unwrap(),
                ip: "10.77.0.10".parse().unwrap(),
            },
            PortFilter {
                tap: "fv2n0",
                mac: "52:54:00:00:00:02".parse().unwrap(),
                ip: "10.77.0.11".parse().unwrap(),
            },
        ]
    }

    /// Each VM's TAP sends only its MAC and address (ARP's sender too), no DHCP server
    /// traffic and DHCP requests only for its own MAC; ports the table does not list send
    /// nothing.
    #[test]
    fn each_port_may_send_only_its_own_mac_and_address() {
        let d = definition("nat");
        let rules = bridge_ruleset(&d, &ports()).unwrap();
        let table = table_name("lab-1");
        assert!(rules.starts_with(&format!(
            "table bridge {table} {{}}\ndelete table bridge {table}\ntable bridge {table} {{\n"
        )));
        let expected = "  chain from_ports {\n\
             \x20   type filter hook prerouting priority filter; policy accept;\n\
             \x20   iifname vmap { \"fv1n0\" : jump port0, \"fv2n0\" : jump port1 }\n\
             \x20   drop\n\
             \x20 }\n\
             \x20 chain port0 {\n\
             \x20   ether saddr != 52:54:00:00:00:01 drop\n\
             \x20   arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 52:54:00:00:00:01 \
             arp saddr ip { 10.77.0.10, 0.0.0.0 } accept\n\
             \x20   ether type arp drop\n\
             \x20   udp sport 67 drop\n\
             \x20   udp dport 67 @th,288,48 != 0x525400000001 drop\n\
             \x20   ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n\
             \x20   ip saddr 10.77.0.10 accept\n\
             \x20   drop\n\
             \x20 }\n";
        assert!(rules.contains(expected), "{rules}");
        assert!(rules.contains("ip saddr 10.77.0.11 accept"));
        // No ports: every port is dropped.
        let empty = bridge_ruleset(&d, &[]).unwrap();
        assert!(empty.contains("policy accept;\n    drop\n"), "{empty}");
        assert!(!empty.contains("vmap"));
        // Guests reach the host only for DHCP, DNS and ping on the bridge's address.
        let ip = ruleset(&d, d.subnet().unwrap().unwrap(), &ports()).unwrap();
        for rule in [
            "iifname \"ferro-lab\" jump from_guests",
            "ct state established,related accept",
            "ip daddr { 10.77.0.1, 255.255.255.255 } udp dport 67 accept",
            "ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 accept",
            "ip daddr 10.77.0.1 icmp type echo-request accept",
        ] {
            assert!(ip.contains(rule), "{rule} missing in {ip}");
        }
        assert!(
            ip.contains(&rules),
            "the bridge table is part of the whole ruleset"
        );
        let mut bridge_mode = d.clone();
        bridge_mode.mode = NetworkMode::Bridge;
        assert_eq!(bridge_ruleset(&bridge_mode, &ports()), None);
    }

    /// Loads the rules into a network namespace of this thread only, when nft and the right
    /// to do so exist.
    #[test]
    fn nft_accepts_the_rules_and_reloading_does_not_duplicate_them() {
        let nft = "nft";
        if Command::new(nft).arg("--version").output().is_err() {
            eprintln!("skipped: no nft");
            return;
        }
        crate::netlink::in_new_netns(move || {
            let d = definition("nat");
            let table = table_name(&d.name);
            let rules = ruleset(&d, d.subnet().unwrap().unwrap(), &ports()).unwrap();
            apply(nft, &table, &rules).unwrap();
            apply(nft, &table, &rules).unwrap();
            assert!(exists_in(nft, "ip", &table));
            assert!(exists_in(nft, "bridge", &table));
            let bridge = Command::new(nft)
                .args(["list", "table", "bridge", &table])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&bridge.stdout);
            assert_eq!(text.matches("chain port").count(), 2, "{text}");
            // A port leaves: the bridge table alone is replaced.
            let one = bridge_ruleset(&d, &ports()[..1]).unwrap();
            apply(nft, &table, &one).unwrap();
            let bridge = Command::new(nft)
                .args(["list", "table", "bridge", &table])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&bridge.stdout);
            assert_eq!(text.matches("chain port").count(), 1, "{text}");
            let listing = Command::new(nft)
                .args(["list", "table", "ip", &table])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&listing.stdout);
            assert_eq!(text.matches("masquerade").count(), 1, "{text}");
            remove(nft, &table).unwrap();
            assert!(!exists_in(nft, "ip", &table));
            assert!(!exists_in(nft, "bridge", &table));
            remove(nft, &table).unwrap();
            let err = apply(nft, "t", "table ip t { chain c { nonsense } }").unwrap_err();
            assert!(err.to_string().contains("Error:"), "{err}");
        });
    }
}
