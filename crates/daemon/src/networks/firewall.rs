//! nftables rules of nat and isolated networks, one table per network (`ip ferro_NAME`):
//! - nat: traffic from the subnet leaving it is masqueraded; the bridge forwards what its VMs
//!   send out and the replies, nothing that starts outside;
//! - isolated: nothing is forwarded to or from the bridge.
//!
//! Rules are loaded with `nft -f -` as one transaction that replaces the table, so starting a
//! network twice (or after a daemon restart) never duplicates them. Only validated names and
//! addresses go into the rules, and no shell is involved.
//!
//! Threading: blocking calls, made under the networks' lock.

use std::io::{self, Write};
use std::process::{Command, Stdio};

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

/// The ruleset that (re)creates the network's table; None for bridge-mode networks.
pub fn ruleset(definition: &NetworkDefinition, subnet: Subnet) -> Option<String> {
    let table = table_name(&definition.name);
    let bridge = &definition.bridge;
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
    // Declaring the table first makes the delete valid when it does not exist yet.
    Some(format!(
        "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n{chains}}}\n"
    ))
}

/// Loads `rules` (see [`ruleset`]) for the table `table`.
pub fn apply(nft: &str, table: &str, rules: &str) -> Result<(), FirewallError> {
    run(nft, &["-f", "-"], Some(rules)).map_err(|e| e.for_table(table))
}

/// Removes the table, if it exists.
pub fn remove(nft: &str, table: &str) -> Result<(), FirewallError> {
    if !exists(nft, table) {
        return Ok(());
    }
    run(nft, &["delete", "table", "ip", table], None).map_err(|e| e.for_table(table))
}

/// Whether the table is loaded.
pub fn exists(nft: &str, table: &str) -> bool {
    run(nft, &["list", "table", "ip", table], None).is_ok()
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
        let rules = ruleset(&d, d.subnet().unwrap().unwrap()).unwrap();
        let table = table_name("lab-1");
        assert!(rules.starts_with(&format!("table ip {table} {{}}\ndelete table ip {table}\n")));
        assert!(rules.contains("ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 masquerade"));
        assert!(rules.contains(
            "oifname \"ferro-lab\" ip daddr 10.77.0.0/24 ct state established,related accept"
        ));
        let isolated = definition("isolated");
        let rules = ruleset(&isolated, isolated.subnet().unwrap().unwrap()).unwrap();
        assert!(!rules.contains("masquerade"));
        assert!(rules.contains("iifname \"ferro-lab\" drop"));
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
            let rules = ruleset(&d, d.subnet().unwrap().unwrap()).unwrap();
            apply(nft, &table, &rules).unwrap();
            apply(nft, &table, &rules).unwrap();
            assert!(exists(nft, &table));
            let listing = Command::new(nft)
                .args(["list", "table", "ip", &table])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&listing.stdout);
            assert_eq!(text.matches("masquerade").count(), 1, "{text}");
            remove(nft, &table).unwrap();
            assert!(!exists(nft, &table));
            remove(nft, &table).unwrap();
            let err = apply(nft, "t", "table ip t { chain c { nonsense } }").unwrap_err();
            assert!(err.to_string().contains("Error:"), "{err}");
        });
    }
}
