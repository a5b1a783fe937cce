//! `ferro net ...`: virtual networks through the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::daemon_api::AutostartRequest;
use api::net_api::{paths, Lease, NetworkInfo};
use clap::{Args, Subcommand};

use crate::client::{
    call, client, decode, exit_codes, finish, print_json, DaemonSocket, Failure, CLIENT_HELP,
};

/// Manage virtual networks (nat, isolated, or an existing host bridge).
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct NetArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: NetCommand,
}

/// Exit codes of a network command that names a network.
fn net_codes() -> String {
    exit_codes("network", true, true)
}

#[derive(Debug, Subcommand)]
enum NetCommand {
    /// Add a network from a definition file (TOML, see docs/network-definition.md).
    #[command(after_help = exit_codes("network", false, true))]
    Define {
        /// The definition file.
        file: PathBuf,
    },
    /// Remove a network's definition.
    #[command(after_help = net_codes())]
    Undefine {
        /// The network.
        name: String,
    },
    /// List the networks.
    #[command(after_help = exit_codes("network", false, false))]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a network.
    #[command(after_help = exit_codes("network", true, false))]
    Info {
        /// The network.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Bring a network up (bridge, forwarding and masquerading, DHCP and DNS).
    #[command(after_help = net_codes())]
    Start {
        /// The network.
        name: String,
    },
    /// Take a network down (refused while VMs run on it).
    #[command(after_help = net_codes())]
    Stop {
        /// The network.
        name: String,
    },
    /// Start the network whenever the daemon starts (--disable to stop doing so).
    #[command(after_help = net_codes())]
    Autostart {
        /// The network.
        name: String,
        /// Do not start it with the daemon any more.
        #[arg(long)]
        disable: bool,
    },
    /// List the DHCP leases of a network.
    #[command(after_help = exit_codes("network", true, false))]
    Leases {
        /// The network.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn action(name: &str, action: &str) -> String {
    format!("{}/{action}", paths::network(name))
}

pub fn net(args: NetArgs) -> ExitCode {
    let c = client(&args.daemon, Some(Duration::from_secs(60)));
    finish((|| {
        match args.command {
            NetCommand::Define { file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
                let definition = api::definition_file::parse_network(&text)
                    .map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
                let body =
                    serde_json::to_vec(&definition).map_err(|e| Failure(1, e.to_string()))?;
                call(&c, "POST", paths::NETWORKS, Some(body))?;
                println!("network {} defined", definition.name);
            }
            NetCommand::Undefine { name } => {
                call(&c, "DELETE", &paths::network(&name), None)?;
                println!("network {name} undefined");
            }
            NetCommand::List { json } => {
                let networks: Vec<NetworkInfo> = decode(&call(&c, "GET", paths::NETWORKS, None)?)?;
                if json {
                    return print_json(&networks);
                }
                println!(
                    "{:<16} {:<9} {:<9} {:<16} SUBNET",
                    "NAME", "STATE", "MODE", "BRIDGE"
                );
                for n in &networks {
                    let d = &n.definition;
                    println!(
                        "{:<16} {:<9} {:<9} {:<16} {}",
                        d.name,
                        format!("{:?}", n.state).to_lowercase(),
                        format!("{:?}", d.mode).to_lowercase(),
                        d.bridge,
                        d.subnet.as_deref().unwrap_or("-")
                    );
                }
            }
            NetCommand::Info { name, json } => {
                let info: NetworkInfo = decode(&call(&c, "GET", &paths::network(&name), None)?)?;
                if json {
                    return print_json(&info);
                }
                let d = &info.definition;
                println!("Name:      {}", d.name);
                println!("State:     {}", format!("{:?}", info.state).to_lowercase());
                println!("Mode:      {}", format!("{:?}", d.mode).to_lowercase());
                println!("Bridge:    {}", d.bridge);
                if let Some(subnet) = &d.subnet {
                    println!("Subnet:    {subnet}");
                    if let Ok(Some((start, end))) = d.dhcp_range() {
                        println!("DHCP:      {start} - {end}");
                    }
                    println!("Domain:    {}", d.domain());
                }
                for host in &d.hosts {
                    println!("Host:      {} {} {}", host.mac, host.ip, host.name);
                }
                println!("Autostart: {}", if d.autostart { "yes" } else { "no" });
            }
            NetCommand::Start { name } => {
                call(&c, "POST", &action(&name, "start"), None)?;
                println!("network {name} started");
            }
            NetCommand::Stop { name } => {
                call(&c, "POST", &action(&name, "stop"), None)?;
                println!("network {name} stopped");
            }
            NetCommand::Autostart { name, disable } => {
                let request = AutostartRequest { enabled: !disable };
                let body = serde_json::to_vec(&request).map_err(|e| Failure(1, e.to_string()))?;
                call(&c, "PUT", &action(&name, "autostart"), Some(body))?;
                println!(
                    "network {name} {} with the daemon",
                    if disable {
                        "will not start"
                    } else {
                        "will start"
                    }
                );
            }
            NetCommand::Leases { name, json } => {
                let leases: Vec<Lease> = decode(&call(&c, "GET", &paths::leases(&name), None)?)?;
                if json {
                    return print_json(&leases);
                }
                print_leases(&leases);
            }
        }
        Ok(())
    })())
}

fn print_leases(leases: &[Lease]) {
    println!("{:<18} {:<16} {:<20} EXPIRES", "MAC", "ADDRESS", "HOSTNAME");
    for lease in leases {
        let expires = match lease.expires {
            0 => "never".to_string(),
            at => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("in {} s", at.saturating_sub(now))
            }
        };
        println!(
            "{:<18} {:<16} {:<20} {expires}",
            lease.mac.to_string(),
            lease.ip.to_string(),
            lease.hostname.as_deref().unwrap_or("-")
        );
    }
}
