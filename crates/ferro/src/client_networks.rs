//! `ferro net ...`: virtual networks through the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::net_api::{paths, NetworkInfo};
use clap::{Args, Subcommand};

use crate::client::{call, client, decode, finish, print_json, DaemonSocket, Failure, CLIENT_HELP};

/// Manage virtual networks (nat, isolated, or an existing host bridge).
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct NetArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: NetCommand,
}

#[derive(Debug, Subcommand)]
enum NetCommand {
    /// Add a network from a definition file (TOML, see docs/network-definition.md).
    Define { file: PathBuf },
    /// Remove a network's definition.
    Undefine { name: String },
    /// List the networks.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a network.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn net(args: NetArgs) -> ExitCode {
    let c = client(&args.daemon, Some(Duration::from_secs(60)));
    finish((|| {
        match args.command {
            NetCommand::Define { file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
                let definition = daemon::parse_network_definition(&text)
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
        }
        Ok(())
    })())
}
