//! nftables rules of nat and isolated networks, two tables per network, both `ferro-NAME`
//! (network names are letters, digits, '-', '_' and '.', which nft takes as one identifier, so
//! two networks never share a table):
//! - `ip`: nat: traffic from the subnet leaving it is masqueraded; the bridge forwards what its
//!   VMs send out and the replies, nothing that starts outside; isolated: nothing is forwarded
//!   to or from the bridge. Both: guests reach the host itself only for DHCP, DNS and ping on
//!   the bridge's address (and replies to what the host started). Traffic between two ports of
//!   the bridge is accepted first: where `br_netfilter` is loaded (Docker loads it) bridged
//!   frames cross this hook too, and guests of one network may talk to each other.
//! - `netdev`: one ingress chain per VM's TAP device, on the device itself, as libvirt's
//!   clean-traffic filter has it: only its own MAC as source (ARP's sender included), only its
//!   reserved address (or 0.0.0.0 for a DHCP request), no DHCP server traffic (from port 67,
//!   to port 68, or a BOOTREPLY), DHCP requests only for its own MAC, nothing but ARP and IPv4.
//!   The ingress hook sees every frame the guest sends before the bridge does, so frames a
//!   bridge does not pass through its own hooks are judged too: those to the 802.1D
//!   link-local group addresses (STP, LLDP, 802.1X), which it hands to the port device
//!   itself, are dropped (an IPv4 packet sent to one would reach the host through the TAP,
//!   past the `ip` table's rules for the bridge).
//!
//! Rules are loaded with `nft -f -` as one transaction that replaces a table, so starting a
//! network twice (or after a daemon restart) never duplicates them. A port that joins adds its
//! own chain in one transaction and one that leaves removes it, leaving the other ports' rules
//! (and their drop counters) alone; a failed load leaves the previous rules in place. Only validated names and addresses go into the rules, and no shell
//! is involved.
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

/// The tables of network `name` (a validated network name: letters, digits, '-', '_', '.',
/// starting with a letter or digit, which nft reads as one identifier after `ferro-`).
pub fn table_name(name: &str) -> String {
    format!("ferro-{name}")
}

/// The name older daemons gave the tables of network `name` (`ferro_` and the name with '_'
/// for other characters, and a 16-bit hash when it had any: two networks could be given the
/// same table). Removed when the network starts or stops.
pub fn legacy_table_name(name: &str) -> String {
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
    Some(ip_ruleset(definition, subnet)? + &ports_ruleset(definition, ports)?)
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
    // Guest to guest (bridged, seen here only under br_netfilter): already judged at each
    // port's ingress.
    let between_guests = format!("\x20   iifname \"{bridge}\" oifname \"{bridge}\" accept\n");
    let chains = match definition.mode {
        NetworkMode::Bridge => return None,
        NetworkMode::Nat => format!(
            "  chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {subnet} ip daddr != {subnet} masquerade\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             {between_guests}\
             \x20   iifname \"{bridge}\" ip saddr {subnet} accept\n\
             \x20   oifname \"{bridge}\" ip daddr {subnet} ct state established,related accept\n\
             \x20   iifname \"{bridge}\" drop\n\
             \x20   oifname \"{bridge}\" drop\n\
             \x20 }}\n"
        ),
        NetworkMode::Isolated => format!(
            "  chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             {between_guests}\
             \x20   iifname \"{bridge}\" drop\n\
             \x20   oifname \"{bridge}\" drop\n\
             \x20 }}\n"
        ),
    };
    Some(replace_table("ip", &table, &(chains + &input)))
}

/// The ruleset that (re)creates the network's `netdev` table with one ingress chain for each
/// of `ports` (whose TAP devices must exist); None for bridge-mode networks.
pub fn ports_ruleset(definition: &NetworkDefinition, ports: &[PortFilter<'_>]) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let mut chains = String::new();
    for port in ports {
        chains += &format!(
            "  chain {} {{\n\
             \x20   type filter hook ingress device \"{}\" priority filter; policy accept;\n\
             {}\
             \x20 }}\n",
            port_chain_name(port.tap),
            port.tap,
            port_rules(port)
                .iter()
                .map(|rule| format!("    {rule}\n"))
                .collect::<String>()
        );
    }
    Some(replace_table("netdev", &table, &chains))
}

/// The transaction that gives a port joining the bridge its chain (replacing the rules of a
/// chain of that name); None for bridge-mode networks. Other ports' chains, and their counters,
/// stay as they are.
pub fn port_joined(definition: &NetworkDefinition, port: &PortFilter<'_>) -> Option<String> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    let table = table_name(&definition.name);
    let chain = port_chain_name(port.tap);
    let mut text = format!(
        "add table netdev {table}\n\
         add chain netdev {table} {chain} {{ type filter hook ingress device \"{}\" priority filter; policy accept; }}\n\
         flush chain netdev {table} {chain}\n",
        port.tap
    );
    for rule in port_rules(port) {
        text += &format!("add rule netdev {table} {chain} {rule}\n");
    }
    Some(text)
}

/// The command that removes the chain of a port that left the bridge (see [`port_left`]).
pub fn port_left_command(definition: &NetworkDefinition, tap: &str) -> Option<[String; 5]> {
    if definition.mode == NetworkMode::Bridge {
        return None;
    }
    Some([
        "delete".into(),
        "chain".into(),
        "netdev".into(),
        table_name(&definition.name),
        port_chain_name(tap),
    ])
}

/// Removes the chain of a port that left the bridge, if it is there: a kernel may have removed
/// it with its device (Linux before 6.x drops a one-device ingress chain whose device goes,
/// later ones keep it without a hook).
pub fn port_left(
    nft: &str,
    definition: &NetworkDefinition,
    tap: &str,
) -> Result<(), FirewallError> {
    let Some(command) = port_left_command(definition, tap) else {
        return Ok(());
    };
    let table = table_name(&definition.name);
    let mut list = command.clone();
    list[0] = "list".into();
    let args: Vec<&str> = list.iter().map(String::as_str).collect();
    if run(nft, &args, None).is_err() {
        return Ok(());
    }
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    run(nft, &args, None).map_err(|e| e.for_table(&table))
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
/// `nft list table netdev ferro-NAME` shows what each VM tried.
fn port_rules(port: &PortFilter<'_>) -> [String; 11] {
    let PortFilter { mac, ip, .. } = port;
    // DHCP's client hardware address: 28 bytes into the message, after the 8-byte UDP header;
    // its first byte is the operation (1: request, 2: reply).
    let chaddr = format!("0x{}", mac.to_string().replace(':', ""));
    [
        format!("ether saddr != {mac} counter drop"),
        // IEEE 802.1D link-local group addresses (STP, pause, LLDP, 802.1X): a bridge hands
        // these to the port device itself, past the bridge's rules and the host's
        // `iifname BRIDGE` ones.
        "ether daddr & ff:ff:ff:ff:ff:f0 == 01:80:c2:00:00:00 counter drop".into(),
        format!(
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether {mac} \
             arp saddr ip {{ {ip}, 0.0.0.0 }} accept"
        ),
        "ether type arp counter drop".into(),
        "udp sport 67 counter drop".into(),
        "udp dport 68 counter drop".into(),
        "udp dport 67 @th,64,8 != 1 counter drop".into(),
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

/// Removes the tables named `table` of every family Ferro used, those that exist.
pub fn remove(nft: &str, table: &str) -> Result<(), FirewallError> {
    for family in FAMILIES {
        if exists_in(nft, family, table) {
            run(nft, &["delete", "table", family, table], None).map_err(|e| e.for_table(table))?;
        }
    }
    Ok(())
}

/// The families of a network's tables (`bridge`: older daemons' port filters).
const FAMILIES: [&str; 3] = ["ip", "netdev", "bridge"];

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
    fn table_names_are_the_network_names() {
        assert_eq!(table_name("default"), "ferro-default");
        // Older daemons' names mapped '-' to '_' with a 16-bit hash: "lab_1_XXXX" could be
        // named to get "lab-1"'s table. Today's names are the network names themselves.
        let old = legacy_table_name("lab-1");
        assert!(old.starts_with("ferro_lab_1_"), "{old}");
        let squatter = old.trim_start_matches("ferro_");
        assert_ne!(table_name(squatter), table_name("lab-1"));
        assert_eq!(legacy_table_name("default"), "ferro_default");
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
        // Under br_netfilter, guests of one network still reach each other: first rule.
        let forward = rules.split("chain forward").nth(1).unwrap();
        let first_rule = forward.lines().nth(2).unwrap().trim();
        assert_eq!(
            first_rule,
            "iifname \"ferro-lab\" oifname \"ferro-lab\" accept"
        );
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
    /// traffic (from port 67, to port 68, or a BOOTREPLY) and DHCP requests only for its own
    /// MAC; the filter sits on the device's ingress, ahead of the bridge.
    #[test]
    fn each_port_may_send_only_its_own_mac_and_address() {
        let d = definition("nat");
        let rules = ports_ruleset(&d, &ports()).unwrap();
        let table = table_name("lab-1");
        assert!(rules.starts_with(&format!(
            "table netdev {table} {{}}\ndelete table netdev {table}\ntable netdev {table} {{\n"
        )));
        let expected = "  chain port_fv1n0 {\n\
             \x20   type filter hook ingress device \"fv1n0\" priority filter; policy accept;\n\
             \x20   ether saddr != 52:54:00:00:00:01 counter drop\n\
             \x20   ether daddr & ff:ff:ff:ff:ff:f0 == 01:80:c2:00:00:00 counter drop\n\
             \x20   arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 52:54:00:00:00:01 \
             arp saddr ip { 10.77.0.10, 0.0.0.0 } accept\n\
             \x20   ether type arp counter drop\n\
             \x20   udp sport 67 counter drop\n\
             \x20   udp dport 68 counter drop\n\
             \x20   udp dport 67 @th,64,8 != 1 counter drop\n\
             \x20   udp dport 67 @th,288,48 != 0x525400000001 counter drop\n\
             \x20   ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n\
             \x20   ip saddr 10.77.0.10 accept\n\
             \x20   counter drop\n\
             \x20 }\n";
        assert!(rules.contains(expected), "{rules}");
        assert!(rules.contains("device \"fv2n0\""));
        assert!(rules.contains("ip saddr 10.77.0.11 accept"));
        // A port joins on its own: its chain on its device, the same rules.
        let joined = port_joined(&d, &ports()[1]).unwrap();
        assert!(joined.contains(&format!(
            "add chain netdev {table} port_fv2n0 {{ type filter hook ingress device \"fv2n0\""
        )));
        assert!(joined.contains(&format!(
            "add rule netdev {table} port_fv2n0 ip saddr 10.77.0.11 accept\n"
        )));
        assert_eq!(
            port_left_command(&d, "fv2n0").unwrap().join(" "),
            format!("delete chain netdev {table} port_fv2n0")
        );
        // No ports: an empty table.
        let empty = ports_ruleset(&d, &[]).unwrap();
        assert!(!empty.contains("chain"), "{empty}");
        // Guests reach the host only for DHCP, DNS and ping on the bridge's address.
        let whole = ruleset(&d, d.subnet().unwrap().unwrap(), &ports()).unwrap();
        for rule in [
            "iifname \"ferro-lab\" jump from_guests",
            "ct state established,related accept",
            "ip daddr { 10.77.0.1, 255.255.255.255 } udp dport 67 accept",
            "ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 accept",
            "ip daddr 10.77.0.1 icmp type echo-request accept",
        ] {
            assert!(whole.contains(rule), "{rule} missing in {whole}");
        }
        assert!(
            whole.contains(&rules),
            "the port table is part of the whole ruleset"
        );
        let mut bridge_mode = d.clone();
        bridge_mode.mode = NetworkMode::Bridge;
        assert_eq!(ports_ruleset(&bridge_mode, &ports()), None);
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
        crate::networks::netlink::in_new_netns(move || {
            for port in ports() {
                let made = Command::new("ip")
                    .args(["tuntap", "add", "dev", port.tap, "mode", "tap"])
                    .status()
                    .unwrap();
                assert!(made.success());
            }
            let list = |family: &str, table: &str| {
                let out = Command::new(nft)
                    .args(["list", "table", family, table])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            // Names with '-' and '.' (and an address-like tail) are one identifier to nft.
            for name in ["lab-1", "a.b_c", "net-10.0.0.1"] {
                let mut d = definition("nat");
                d.name = name.into();
                let table = table_name(&d.name);
                let rules = ruleset(&d, d.subnet().unwrap().unwrap(), &ports()).unwrap();
                apply(nft, &table, &rules).unwrap();
                apply(nft, &table, &rules).unwrap();
                assert!(exists_in(nft, "ip", &table), "{table}");
                let text = list("netdev", &table);
                assert_eq!(text.matches("chain port_").count(), 2, "{text}");
                assert_eq!(list("ip", &table).matches("masquerade").count(), 1);
                // A port leaves and joins on its own (twice each: nothing fails, nothing is
                // doubled); the other port's chain is untouched.
                let other = |text: &str| text.split("chain port_fv2n0").next().unwrap().to_string();
                let before = other(&list("netdev", &table));
                port_left(nft, &d, "fv2n0").unwrap();
                port_left(nft, &d, "fv2n0").unwrap();
                let text = list("netdev", &table);
                assert_eq!(text.matches("chain port_").count(), 1, "{text}");
                assert!(!text.contains("fv2n0"), "{text}");
                for _ in 0..2 {
                    apply(nft, &table, &port_joined(&d, &ports()[1]).unwrap()).unwrap();
                }
                let text = list("netdev", &table);
                assert_eq!(text.matches("chain port_").count(), 2, "{text}");
                assert_eq!(
                    text.matches("ip saddr 10.77.0.11 accept").count(),
                    1,
                    "{text}"
                );
                assert_eq!(other(&text), before);
                remove(nft, &table).unwrap();
                assert!(!exists_in(nft, "ip", &table));
                assert!(!exists_in(nft, "netdev", &table));
                remove(nft, &table).unwrap();
            }
            // A load that fails leaves the previous rules in place.
            let d = definition("isolated");
            let table = table_name(&d.name);
            apply(nft, &table, &ports_ruleset(&d, &ports()).unwrap()).unwrap();
            let broken = ports_ruleset(&d, &ports()[..1]).unwrap() + "nonsense\n";
            assert!(apply(nft, &table, &broken).is_err());
            assert!(list("netdev", &table).contains("fv2n0"));
            let err = apply(nft, "t", "table ip t { chain c { nonsense } }").unwrap_err();
            assert!(err.to_string().contains("Error:"), "{err}");
        });
    }
}
