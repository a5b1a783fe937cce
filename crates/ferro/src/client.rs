//! The daemon's clients: `ferro vm ...`, `ferro host info`, `ferro events`. Thin: each verb is
//! one request to the daemon's REST API; tables for people, `--json` for scripts.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::daemon_api::{
    paths, AutostartRequest, Event, HostInfo, ShutdownRequest, VmDetails, VmStats, VmSummary,
};
use clap::{Args, Subcommand};
use http_unix::{Client, ClientResponse};
use serde::de::DeserializeOwned;

use crate::error_chain;

pub const CLIENT_HELP: &str = "\
Exit codes:
  0  done
  1  the daemon failed to carry the request out
  2  invalid command line, definition or request
  3  no such VM
  4  the VM's state does not allow it (e.g. already running), or it timed out
  5  the daemon cannot be reached";

/// Where the daemon listens.
#[derive(Debug, Args)]
pub struct DaemonSocket {
    /// The daemon's socket.
    #[arg(long, global = true, env = "FERRO_SOCKET", default_value = daemon::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Manage VMs through the daemon (like virsh).
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct VmArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Add a VM from a definition file (TOML, see docs/vm-definition.md).
    Define { file: PathBuf },
    /// Remove a VM's definition (it must not be running); its disks are kept.
    Undefine { name: String },
    /// List the VMs.
    List(JsonFlag),
    /// Show a VM's definition and state.
    Info(NameArgs),
    /// Start a VM.
    Start(NameArgs),
    /// Ask the guest to shut down (ACPI power button) and wait for it.
    Shutdown {
        name: String,
        /// Seconds to wait before reporting that the VM still runs.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop a VM at once, as pulling the plug would.
    Destroy(NameArgs),
    /// Reset a VM (the guest boots again).
    Reboot(NameArgs),
    /// Pause a VM's vCPUs.
    Suspend(NameArgs),
    /// Resume a paused VM.
    Resume(NameArgs),
    /// Start the VM whenever the daemon starts (--disable to stop doing so).
    Autostart {
        name: String,
        #[arg(long)]
        disable: bool,
    },
    /// Attach to the VM's serial console (Ctrl-] detaches).
    Console { name: String },
    /// CPU, memory, block and network statistics (like virsh domstats).
    Stats(NameArgs),
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NameArgs {
    name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Host information from the daemon.
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct HostArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// CPUs, memory, KVM and VM counts.
    Info(JsonFlag),
}

/// Follow VM events (started, stopped, crashed, paused, ...) as they happen.
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct EventsArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    /// Print each event as JSON.
    #[arg(long)]
    json: bool,
}

/// A failed command: exit code and message.
pub(crate) struct Failure(pub u8, pub String);

pub(crate) type Outcome = Result<(), Failure>;

pub(crate) fn client(socket: &DaemonSocket, timeout: Option<Duration>) -> Client {
    Client::new(&socket.socket, timeout)
}

/// Sends a request; non-2xx answers become failures with the daemon's message.
pub(crate) fn call(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<ClientResponse, Failure> {
    let response = client.request(method, path, body.as_deref()).map_err(|e| {
        Failure(
            5,
            format!("{} (is `ferro daemon` running?)", error_chain(&e)),
        )
    })?;
    if (200..300).contains(&response.status) {
        return Ok(response);
    }
    let message = serde_json::from_slice::<api::vmm_api::ErrorBody>(&response.body)
        .map(|b| b.error)
        .unwrap_or_else(|_| response.text());
    Err(Failure(exit_code_for(response.status), message))
}

/// The CLI's exit code for a daemon's error status.
pub(crate) fn exit_code_for(status: u16) -> u8 {
    match status {
        400 | 405 | 411 | 413 | 422 => 2,
        404 => 3,
        409 | 504 => 4,
        _ => 1,
    }
}

pub(crate) fn decode<T: DeserializeOwned>(response: &ClientResponse) -> Result<T, Failure> {
    serde_json::from_slice(&response.body)
        .map_err(|e| Failure(1, format!("unexpected answer from the daemon: {e}")))
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> Outcome {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure(1, e.to_string()))?;
    println!("{text}");
    Ok(())
}

pub(crate) fn finish(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("ferro: error: {message}");
            ExitCode::from(code)
        }
    }
}

pub fn vm(args: VmArgs) -> ExitCode {
    finish(vm_command(&args.daemon, args.command))
}

fn vm_command(socket: &DaemonSocket, command: VmCommand) -> Outcome {
    let c = client(socket, Some(Duration::from_secs(120)));
    match command {
        VmCommand::Define { file } => define(&c, &file),
        VmCommand::Undefine { name } => {
            call(&c, "DELETE", &paths::vm(&name), None)?;
            println!("VM {name} undefined");
            Ok(())
        }
        VmCommand::List(flag) => list(&c, flag.json),
        VmCommand::Info(a) => {
            let details: VmDetails = decode(&call(&c, "GET", &paths::vm(&a.name), None)?)?;
            if a.json {
                return print_json(&details);
            }
            print_details(&details);
            Ok(())
        }
        VmCommand::Start(a) => action(&c, &a, "start", "started"),
        VmCommand::Destroy(a) => action(&c, &a, "destroy", "destroyed"),
        VmCommand::Reboot(a) => action(&c, &a, "reboot", "reset"),
        VmCommand::Suspend(a) => action(&c, &a, "suspend", "suspended"),
        VmCommand::Resume(a) => action(&c, &a, "resume", "resumed"),
        VmCommand::Shutdown { name, timeout } => {
            let c = client(socket, Some(Duration::from_secs(timeout + 30)));
            let body = serde_json::to_vec(&ShutdownRequest {
                timeout_secs: Some(timeout),
            })
            .map_err(|e| Failure(1, e.to_string()))?;
            call(&c, "POST", &paths::vm_action(&name, "shutdown"), Some(body))?;
            println!("VM {name} shut down");
            Ok(())
        }
        VmCommand::Autostart { name, disable } => {
            let body = serde_json::to_vec(&AutostartRequest { enabled: !disable })
                .map_err(|e| Failure(1, e.to_string()))?;
            call(&c, "PUT", &paths::vm_action(&name, "autostart"), Some(body))?;
            let verb = if disable {
                "will not start"
            } else {
                "will start"
            };
            println!("VM {name} {verb} with the daemon");
            Ok(())
        }
        VmCommand::Console { name } => {
            let details: VmDetails = decode(&call(&c, "GET", &paths::vm(&name), None)?)?;
            let socket = details.console_socket.ok_or_else(|| {
                Failure(
                    4,
                    format!("VM {name} is not running (it is {})", details.state),
                )
            })?;
            crate::console_attach::attach(&name, &socket).map_err(|e| Failure(1, e))
        }
        VmCommand::Stats(a) => {
            let stats: VmStats =
                decode(&call(&c, "GET", &paths::vm_action(&a.name, "stats"), None)?)?;
            if a.json {
                return print_json(&stats);
            }
            print_stats(&stats);
            Ok(())
        }
    }
}

fn define(c: &Client, file: &PathBuf) -> Outcome {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
    let definition = daemon::parse_definition(&text)
        .map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
    let body = serde_json::to_vec(&definition).map_err(|e| Failure(1, e.to_string()))?;
    call(c, "POST", paths::VMS, Some(body))?;
    println!("VM {} defined", definition.name);
    Ok(())
}

fn action(c: &Client, a: &NameArgs, action: &str, done: &str) -> Outcome {
    let response = call(c, "POST", &paths::vm_action(&a.name, action), None)?;
    if a.json {
        let details: VmDetails = decode(&response)?;
        return print_json(&details);
    }
    println!("VM {} {done}", a.name);
    Ok(())
}

fn list(c: &Client, json: bool) -> Outcome {
    let vms: Vec<VmSummary> = decode(&call(c, "GET", paths::VMS, None)?)?;
    if json {
        return print_json(&vms);
    }
    let width = vms.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<14}  {:>4}  {:>8}  AUTOSTART",
        "NAME", "STATE", "CPUS", "MEMORY"
    );
    for vm in &vms {
        println!(
            "{:<width$}  {:<14}  {:>4}  {:>8}  {}",
            vm.name,
            vm.state.to_string(),
            vm.cpus,
            vm.memory.to_string(),
            if vm.autostart { "yes" } else { "no" }
        );
    }
    Ok(())
}

fn print_details(d: &VmDetails) {
    let def = &d.definition;
    println!("Name:        {}", def.name);
    if let Some(id) = def.id {
        println!("Id:          {id}");
    }
    println!("State:       {}", d.state);
    if let Some(reason) = &d.reason {
        println!("Reason:      {reason}");
    }
    if let Some(pid) = d.pid {
        println!("VMM pid:     {pid}");
    }
    println!("vCPUs:       {}", def.cpus);
    println!("Memory:      {}", def.memory);
    println!("Kernel:      {}", def.kernel.display());
    if let Some(initrd) = &def.initrd {
        println!("Initrd:      {}", initrd.display());
    }
    println!("Cmdline:     {}", def.cmdline);
    for disk in &def.disks {
        let source = match (&disk.path, &disk.volume) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(volume)) => format!("volume {volume}"),
            (None, None) => "?".into(),
        };
        let ro = if disk.readonly { " (read-only)" } else { "" };
        println!("Disk:        {source}{ro}");
    }
    for (index, net) in def.nets.iter().enumerate() {
        let tap = match (&net.network, def.id) {
            (Some(_), Some(id)) => {
                format!(" (TAP {})", api::daemon_api::network_tap_name(id, index))
            }
            _ => String::new(),
        };
        println!("Net:         {}{tap}", net.to_option_string());
    }
    println!("Autostart:   {}", if def.autostart { "yes" } else { "no" });
    println!("Console log: {}", d.console_log.display());
    for warning in &d.warnings {
        println!("Warning:     {warning}");
    }
}

fn print_stats(s: &VmStats) {
    println!("{}: {}", s.name, s.state);
    println!("  cpu.time        {} ns", s.cpu_time_ns);
    for (i, t) in s.vcpu_time_ns.iter().enumerate() {
        println!("  vcpu.{i}.time      {t} ns");
    }
    println!("  balloon.maximum {} bytes", s.memory_bytes);
    println!("  rss             {} bytes", s.rss_bytes);
    for vcpu in &s.counters.vcpus {
        let exits: u64 = vcpu.exits.values().sum();
        println!("  vcpu.{}.exits    {exits}", vcpu.id);
    }
    for device in &s.counters.devices {
        for (name, value) in &device.counters {
            println!("  {}.{name} {value}", device.id);
        }
    }
}

pub fn host(args: HostArgs) -> ExitCode {
    let HostCommand::Info(flag) = args.command;
    finish((|| {
        let c = client(&args.daemon, Some(Duration::from_secs(30)));
        let info: HostInfo = decode(&call(&c, "GET", paths::HOST, None)?)?;
        if flag.json {
            return print_json(&info);
        }
        println!("Hostname:          {}", info.hostname);
        println!("CPUs:              {}", info.cpus);
        println!("Memory:            {} bytes", info.memory_bytes);
        println!("KVM:               {}", if info.kvm { "yes" } else { "no" });
        println!(
            "HW virtualization: {}",
            if info.hardware_virtualization {
                "yes"
            } else {
                "no (guests may be very slow)"
            }
        );
        println!("Max vCPUs per VM:  {}", info.max_vcpus);
        println!(
            "VMs:               {} running, {} defined",
            info.running_vms, info.defined_vms
        );
        println!("Ferro:             {}", info.version);
        Ok(())
    })())
}

pub fn events(args: EventsArgs) -> ExitCode {
    finish((|| {
        let c = client(&args.daemon, None);
        let (status, body) = c.stream("GET", paths::EVENTS).map_err(|e| {
            Failure(
                5,
                format!("{} (is `ferro daemon` running?)", error_chain(&e)),
            )
        })?;
        if status != 200 {
            // The error's own words (a refusal says what to do), read within a bound.
            let mut text = String::new();
            let _ =
                std::io::Read::read_to_string(&mut std::io::Read::take(body, 64 << 10), &mut text);
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("the daemon answered {status}"));
            return Err(Failure(1, message));
        }
        let stdout = std::io::stdout();
        for line in BufReader::new(body).lines() {
            let line = line.map_err(|e| Failure(5, format!("the daemon went away: {e}")))?;
            let Ok(event) = serde_json::from_str::<Event>(&line) else {
                continue;
            };
            let mut out = stdout.lock();
            let written = if args.json {
                writeln!(out, "{line}")
            } else {
                let detail = event.detail.map(|d| format!(" ({d})")).unwrap_or_default();
                writeln!(out, "{} {}: {}{detail}", event.time, event.vm, event.kind)
            };
            if written.and_then(|()| out.flush()).is_err() {
                return Ok(()); // stdout closed (e.g. piped into head)
            }
        }
        Ok(())
    })())
}
