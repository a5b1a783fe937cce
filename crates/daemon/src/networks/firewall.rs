//! nftables rules of nat and isolated networks, two tables per network, both `ferro_NAME`:
//! - `ip`: nat: traffic from the subnet leaving it is masqueraded; the bridge forwards what its
//!   VMs send out and the replies, nothing that starts outside; isolated: nothing is forwarded
//!   to or from the bridge. Both: guests reach the host itself only for DHCP, DNS and ping on
//!   the bridge's address (and replies to what the host started).
//! - `bridge`: what each VM's TAP device may send into the bridge, as libvirt's clean-traffic
//!   filter has it: only its own MAC as source (ARP's sender included), only its reserved
//!   address (or 0.0.0.0 for a DHCP request), no DHCP server traffic, DHCP requests only for its
//!   own MAC, nothing but ARP and IPv4. A bridge-family hook sees the frames of every bridge of
//!   the host, so the table judges only the ports it lists (each a VM's TAP, listed before its
//!   VMM runs): other networks' ports and bridges that are not Ferro's pass untouched.
//!
//! Rules are loaded with `nft -f -` as one transaction that replaces a table, so starting a
//! network twice (or after a daemon restart) never duplicates them. A VM's TAP that joins or
//! leaves the bridge adds or removes its own chain and map entry in one transaction, leaving
//! the other ports' rules (and counters) alone. Only validated names and addresses go into the
//! rules, and no shell is involved.
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

/// The ruleset that (re)creates the network's `bridge` table for `ports` (at the network's
/// start, or a daemon's); None for bridge-mode networks. Frames from a port go through the
/// verdict map `ports` to the port's own chain; frames from any other port (of any bridge: the
/// hook is the whole host's) are not this table's to judge.
pub fn bridge_ruleset(definition: &NetworkDefinition, ports: &[PortFilter<'_>]) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let elements: Vec<String> = ports.iter().map(|port| map_element(port.tap)).collect();
    let elements = if elements.is_empty() {
        String::new()
    } else {
        format!("    elements = {{ {} }}\n", elements.join(", "))
    };
    let mut chains = format!(
        "  map ports {{\n\
         \x20   type ifname : verdict\n\
         {elements}\
         \x20 }}\n\
         \x20 chain from_ports {{\n\
         \x20   type filter hook prerouting priority filter; policy accept;\n\
         \x20   iifname vmap @ports\n\
         \x20 }}\n"
    );
    for port in ports {
        chains += &format!(
            "  chain {} {{\n{}  }}\n",
            port_chain_name(port.tap),
            port_rules(port)
                .iter()
                .map(|rule| format!("    {rule}\n"))
                .collect::<String>()
        );
    }
    Some(replace_table("bridge", &table, &chains))
}

/// The transaction that gives a port joining the bridge its chain and map entry (replacing
/// what a port of that name had); None for bridge-mode networks. Other ports' chains, and
/// their counters, stay as they are.
pub fn port_joined(definition: &NetworkDefinition, port: &PortFilter<'_>) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let chain = port_chain_name(port.tap);
    let mut text =
        format!("add chain bridge {table} {chain}\nflush chain bridge {table} {chain}\n");
    for rule in port_rules(port) {
        text += &format!("add rule bridge {table} {chain} {rule}\n");
    }
    text += &format!(
        "add element bridge {table} ports {{ {} }}\n",
        map_element(port.tap)
    );
    Some(text)
}

/// The transaction that takes a port leaving the bridge out of the map and removes its chain
/// (each added first, so that it works whether or not they exist); None for bridge-mode
/// networks.
pub fn port_left(definition: &NetworkDefinition, tap: &str) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let chain = port_chain_name(tap);
    Some(format!(
        "add chain bridge {table} {chain}\n\
         add element bridge {table} ports {{ {element} }}\n\
         delete element bridge {table} ports {{ \"{tap}\" }}\n\
         flush chain bridge {table} {chain}\n\
         delete chain bridge {table} {chain}\n",
        element = map_element(tap)
    ))
}

fn map_element(tap: &str) -> String {
    format!("\"{tap}\" : jump {}", port_chain_name(tap))
}

/// The chain of a port: `port_` and its name, with '_' for what nft identifiers cannot hold
/// (the daemon's TAP names are letters and digits only).
fn port_chain_name(tap: &str) -> String {
    let plain: String = tap
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("port_{plain}")
}

/// What one port may send, in order; the last rule drops the rest. Drops are counted:
/// `nft list table bridge ferro_NAME` shows what each VM tried.
fn port_rules(port: &PortFilter<'_>) -> [String; 8] {
    let PortFilter { mac, ip, .. } = port;
    // DHCP's client hardware address: 28 bytes into the message, after the 8-byte UDP header.
    let chaddr = format!("0x{}", mac.to_string().replace(':', ""));
    [
        format!("ether saddr != {mac} counter drop"),
        format!(
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether {mac} \
             arp saddr ip {{ {ip}, 0.0.0.0 }} accept"
        ),
        "ether type arp counter drop".into(),
        "udp sport 67 counter drop".into(),
        format!("udp dport 67 @th,288,48 != {chaddr} counter drop"),
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept".into(),
        format!("ip saddr {ip} accept"),
        "counter drop".into(),
    ]
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
    /// traffic and DHCP requests only for its own MAC; ports the table does not list are not
    /// judged.
    #[test]
    fn each_port_may_send_only_its_own_mac_and_address() {
        let d = definition("nat");
        let rules = bridge_ruleset(&d, &ports()).unwrap();
        let table = table_name("lab-1");
        assert!(rules.starts_with(&format!(
            "table bridge {table} {{}}\ndelete table bridge {table}\ntable bridge {table} {{\n"
        )));
        let expected = "  map ports {\n\
             \x20   type ifname : verdict\n\
             \x20   elements = { \"fv1n0\" : jump port_fv1n0, \"fv2n0\" : jump port_fv2n0 }\n\
             \x20 }\n\
             \x20 chain from_ports {\n\
             \x20   type filter hook prerouting priority filter; policy accept;\n\
             \x20   iifname vmap @ports\n\
             \x20 }\n\
             \x20 chain port_fv1n0 {\n\
             \x20   ether saddr != 52:54:00:00:00:01 counter drop\n\
             \x20   arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 52:54:00:00:00:01 \
             arp saddr ip { 10.77.0.10, 0.0.0.0 } accept\n\
             \x20   ether type arp counter drop\n\
             \x20   udp sport 67 counter drop\n\
             \x20   udp dport 67 @th,288,48 != 0x525400000001 counter drop\n\
             \x20   ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n\
             \x20   ip saddr 10.77.0.10 accept\n\
             \x20   counter drop\n\
             \x20 }\n";
        assert!(rules.contains(expected), "{rules}");
        assert!(rules.contains("ip saddr 10.77.0.11 accept"));
        // No ports: nothing to judge (other bridges' ports are not this table's).
        let empty = bridge_ruleset(&d, &[]).unwrap();
        assert!(empty.contains("iifname vmap @ports\n  }\n"), "{empty}");
        assert!(!empty.contains("drop"), "{empty}");
        assert!(!empty.contains("elements"));
        // A port joins and leaves on its own.
        let joined = port_joined(&d, &ports()[1]).unwrap();
        assert!(joined.starts_with(&format!(
            "add chain bridge {table} port_fv2n0\nflush chain bridge {table} port_fv2n0\n\
             add rule bridge {table} port_fv2n0 ether saddr != 52:54:00:00:00:02 counter drop\n"
        )));
        assert!(joined.ends_with(&format!(
            "add element bridge {table} ports {{ \"fv2n0\" : jump port_fv2n0 }}\n"
        )));
        let left = port_left(&d, "fv2n0").unwrap();
        assert!(left.contains(&format!(
            "delete element bridge {table} ports {{ \"fv2n0\" }}\n"
        )));
        assert!(left.ends_with(&format!("delete chain bridge {table} port_fv2n0\n")));
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
            assert_eq!(text.matches("chain port_").count(), 2, "{text}");
            // Ports leave and join on their own; leaving twice is fine.
            let bridge_table = |nft: &str| {
                let out = Command::new(nft)
                    .args(["list", "table", "bridge", &table])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            apply(nft, &table, &port_left(&d, "fv2n0").unwrap()).unwrap();
            apply(nft, &table, &port_left(&d, "fv2n0").unwrap()).unwrap();
            let text = bridge_table(nft);
            assert_eq!(text.matches("chain port_").count(), 1, "{text}");
            assert!(!text.contains("fv2n0"), "{text}");
            apply(nft, &table, &port_joined(&d, &ports()[1]).unwrap()).unwrap();
            apply(nft, &table, &port_joined(&d, &ports()[1]).unwrap()).unwrap();
            let text = bridge_table(nft);
            assert_eq!(text.matches("chain port_").count(), 2, "{text}");
            assert_eq!(
                text.matches("ip saddr 10.77.0.11 accept").count(),
                1,
                "{text}"
            );
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
