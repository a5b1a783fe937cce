//! The daemon's clients: `ferro vm ...`, `ferro host info`, `ferro events`. Thin: each verb is
//! one request to the daemon's REST API; tables for people, `--json` for scripts.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use api::daemon_api::{
    paths, AutostartRequest, DomainState, Event, HostInfo, ShutdownRequest, VmDetails, VmStats,
    VmSummary, DEFAULT_SOCKET,
};
use clap::{Args, Subcommand};
use http_unix::{Client, ClientResponse};
use serde::de::DeserializeOwned;

use crate::error_chain;

mod diagnose;
mod vm_definition;

pub const CLIENT_HELP: &str = "\
Exit codes:
  0  done
  1  the daemon failed to carry the request out
  2  invalid command line, definition or request
  3  no such VM, pool, volume or network
  4  the state does not allow it now (e.g. already running, busy), or it timed out
  5  the daemon cannot be reached";

/// The exit codes a command can return, for its help: 0, 1, 2 and 5 always (a request the
/// daemon fails, a command line clap refuses, no daemon); 3 (no such `noun`) and 4 (its state
/// does not allow it) for the commands that can meet them.
pub(crate) fn exit_codes(noun: &str, no_such: bool, state: bool) -> String {
    let mut text = String::from(
        "Exit codes:\n  0  done\n  1  the daemon failed to carry the request out\n  \
         2  invalid command line, definition or request\n",
    );
    if no_such {
        text += &format!("  3  no such {noun}\n");
    }
    if state {
        text +=
            "  4  the state does not allow it now (e.g. already running, busy), or it timed out\n";
    }
    text + "  5  the daemon cannot be reached"
}

/// Exit codes of a command on a VM that may be refused for its state.
fn vm_codes() -> String {
    exit_codes("VM", true, true)
}

/// The socket the client commands use when theirs is not given: `ferro -c PATH`,
/// `FERRO_SOCKET`, or the default, as `main` found it.
static FALLBACK_SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// Sets the socket of `ferro -c PATH ...` (or FERRO_SOCKET); once, before any command runs.
pub(crate) fn set_fallback_socket(path: PathBuf) {
    let _ = FALLBACK_SOCKET.set(path);
}

/// Where the daemon listens.
#[derive(Debug, Args)]
pub struct DaemonSocket {
    /// The daemon's socket; also accepted before the subcommand (`ferro -c PATH vm list`).
    /// Default: FERRO_SOCKET, else /run/ferro/ferro.sock.
    #[arg(short = 'c', long = "socket", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl DaemonSocket {
    pub(crate) fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| FALLBACK_SOCKET.get().cloned())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
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
    /// Add a VM from a definition file (TOML, see docs/vm-definition.md), or, for a VM that
    /// exists, replace its definition (as `virsh define`): its id and its NICs' MACs are kept
    /// (a NIC without `mac` keeps the one of the NIC at its place); a running VM runs on as it
    /// is and takes the new definition at its next start (`vm info` shows it pending).
    #[command(after_help = exit_codes("VM", false, true))]
    Define {
        /// The definition file.
        file: PathBuf,
    },
    /// Print a VM's definition as TOML that `vm define` takes back (the pending one, if the
    /// VM was defined again while it runs).
    #[command(after_help = exit_codes("VM", true, false))]
    Dump {
        /// The VM.
        name: String,
    },
    /// Edit a VM's definition in $VISUAL or $EDITOR (else vi), checked before it is saved as
    /// with `vm define` (an invalid one is refused and the edited file kept).
    #[command(after_help = vm_codes())]
    Edit {
        /// The VM.
        name: String,
    },
    /// Remove a VM's definition (it must not be running); its disks are kept.
    #[command(after_help = vm_codes())]
    Undefine {
        /// The VM.
        name: String,
    },
    /// List the VMs.
    #[command(after_help = exit_codes("VM", false, false))]
    List(JsonFlag),
    /// Show a VM's definition and state.
    #[command(after_help = exit_codes("VM", true, false))]
    Info(NameArgs),
    /// Start a VM (a file its definition names that is missing is exit 2).
    #[command(after_help = vm_codes())]
    Start(NameArgs),
    /// Ask the guest to shut down (ACPI power button) and wait for it to power off. Nothing
    /// is held while it waits: `vm destroy` works meanwhile, and Ctrl-C stops the waiting
    /// (the guest still got the button press).
    #[command(after_help = vm_codes())]
    Shutdown(PowerArgs),
    /// Stop a VM at once, as pulling the plug would.
    #[command(after_help = vm_codes())]
    Destroy(NameArgs),
    /// Ask the guest to reboot: the ACPI power button is pressed, and once the guest has
    /// powered off the daemon starts the VM again (a new VMM, so a changed definition
    /// applies); waits until it runs again. A guest that does not power off within the
    /// timeout keeps running (exit 4). `vm reset` is the hard reset.
    #[command(after_help = vm_codes())]
    Reboot(PowerArgs),
    /// Reset a VM at once, as the reset button would (the guest boots again, same VMM).
    #[command(after_help = vm_codes())]
    Reset(NameArgs),
    /// Pause a VM's vCPUs.
    #[command(after_help = vm_codes())]
    Suspend(NameArgs),
    /// Resume a paused VM.
    #[command(after_help = vm_codes())]
    Resume(NameArgs),
    /// Start the VM whenever the daemon starts (--disable to stop doing so).
    #[command(after_help = vm_codes())]
    Autostart {
        /// The VM.
        name: String,
        /// Do not start it with the daemon any more.
        #[arg(long)]
        disable: bool,
    },
    /// Attach to the VM's serial console (Ctrl-] detaches).
    #[command(after_help = vm_codes())]
    Console {
        /// The VM.
        name: String,
    },
    /// CPU, memory, block and network statistics of a VM, or of every VM without a name
    /// (like virsh domstats; VMs that do not run show their state only, and are left out of
    /// --json).
    #[command(after_help = vm_codes())]
    Stats {
        /// The VM (every VM when omitted).
        name: Option<String>,
        /// Print JSON instead of text (a list without a name).
        #[arg(long)]
        json: bool,
    },
    /// Print a running VM's stall report: per vCPU its registers, MP state, pending events,
    /// time since its last exit and exits in the last seconds; each virtqueue's indexes and
    /// last notification and interrupt; COM1's interrupt registers; the PICs and IOAPIC. For a
    /// guest that stopped making progress. A vCPU whose thread is stuck outside the guest
    /// shows "no answer" instead of holding the report up.
    #[command(after_help = vm_codes())]
    Diagnose(diagnose::DiagnoseArgs),
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NameArgs {
    /// The VM.
    name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PowerArgs {
    /// The VM.
    name: String,
    /// Seconds to wait before reporting that the VM still runs (exit 4); 0 presses the
    /// power button and returns at once (exit 0).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    timeout: u64,
    /// Print the VM's details as JSON when done.
    #[arg(long)]
    json: bool,
}

/// Host information from the daemon.
#[derive(Debug, Args)]
#[command(after_help = exit_codes("VM", false, false))]
pub struct HostArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// CPUs, memory, KVM and VM counts.
    #[command(after_help = exit_codes("VM", false, false))]
    Info(JsonFlag),
}

/// Follow VM events (started, stopped, crashed, paused, ...) as they happen.
#[derive(Debug, Args)]
#[command(after_help = exit_codes("VM", false, false))]
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
    Client::new(socket.path(), timeout)
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

/// A size in the largest binary unit that keeps one decimal (bytes stay exact in --json).
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
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
        VmCommand::Define { file } => vm_definition::define(&c, &file),
        VmCommand::Dump { name } => vm_definition::dump(&c, &name),
        VmCommand::Edit { name } => vm_definition::edit(&c, &name),
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
        VmCommand::Reset(a) => action(&c, &a, "reset", "reset"),
        VmCommand::Suspend(a) => action(&c, &a, "suspend", "suspended"),
        VmCommand::Resume(a) => action(&c, &a, "resume", "resumed"),
        VmCommand::Shutdown(a) => power(socket, &a, "shutdown"),
        VmCommand::Reboot(a) => power(socket, &a, "reboot"),
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
        VmCommand::Stats {
            name: Some(name),
            json,
        } => {
            let stats: VmStats =
                decode(&call(&c, "GET", &paths::vm_action(&name, "stats"), None)?)?;
            if json {
                return print_json(&stats);
            }
            print_stats(&stats);
            Ok(())
        }
        VmCommand::Stats { name: None, json } => all_stats(&c, json),
        VmCommand::Diagnose(a) => diagnose::run(&c, &a),
    }
}

/// A shutdown or reboot: the power button, then the daemon's wait (bounded by `--timeout`;
/// Ctrl-C ends this process, which is all the waiting there is on this side).
fn power(socket: &DaemonSocket, a: &PowerArgs, verb: &str) -> Outcome {
    let c = client(socket, Some(Duration::from_secs(a.timeout + 30)));
    let body = serde_json::to_vec(&ShutdownRequest {
        timeout_secs: Some(a.timeout),
    })
    .map_err(|e| Failure(1, e.to_string()))?;
    let response = call(&c, "POST", &paths::vm_action(&a.name, verb), Some(body))?;
    let details: VmDetails = decode(&response)?;
    if a.json {
        return print_json(&details);
    }
    let name = &a.name;
    let destroyed = details.reason.as_deref() == Some("destroyed");
    let text = match (verb, a.timeout) {
        (_, 0) => format!("VM {name}: the power button was pressed ({verb} requested)"),
        ("shutdown", _) if destroyed => format!("VM {name} was destroyed while it shut down"),
        ("shutdown", _) => format!("VM {name} shut down"),
        _ => format!("VM {name} rebooted (it powered off and started again)"),
    };
    println!("{text}");
    Ok(())
}

/// `vm stats` without a name: every VM, as `virsh domstats` shows them.
fn all_stats(c: &Client, json: bool) -> Outcome {
    let vms: Vec<VmSummary> = decode(&call(c, "GET", paths::VMS, None)?)?;
    let mut all = Vec::new();
    for vm in &vms {
        let stats = match vm.state {
            DomainState::Shutoff | DomainState::Crashed => None,
            // A VM that stopped since the list was read shows its state only.
            _ => call(c, "GET", &paths::vm_action(&vm.name, "stats"), None)
                .and_then(|r| decode::<VmStats>(&r))
                .ok(),
        };
        match stats {
            Some(stats) if json => all.push(stats),
            Some(stats) => print_stats(&stats),
            None if json => {}
            None => println!("{}: {}", vm.name, vm.state),
        }
    }
    if json {
        return print_json(&all);
    }
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
    let config = &def.config;
    println!("vCPUs:       {}", config.cpus);
    println!("Memory:      {}", config.memory);
    println!("Kernel:      {}", config.kernel.display());
    if let Some(initrd) = &config.initrd {
        println!("Initrd:      {}", initrd.display());
    }
    println!("Cmdline:     {}", config.cmdline);
    for disk in &config.disks {
        let ro = if disk.readonly { " (read-only)" } else { "" };
        println!("Disk:        {}{ro}", disk.source);
    }
    for (index, net) in config.nets.iter().enumerate() {
        let tap = match (net.network(), def.id) {
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
    if d.pending_definition.is_some() {
        println!(
            "Pending:     a new definition, for its next start (`ferro vm dump {}` shows it)",
            def.name
        );
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
        println!("Memory:            {}", human(info.memory_bytes));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }

    #[test]
    fn each_command_lists_only_its_exit_codes() {
        let list = exit_codes("VM", false, false);
        assert!(list.contains("0  done") && list.contains("5  the daemon cannot be reached"));
        assert!(!list.contains("  3  ") && !list.contains("  4  "));
        let info = exit_codes("VM", true, false);
        assert!(info.contains("3  no such VM") && !info.contains("  4  "));
        assert!(vm_codes().contains("3  no such VM") && vm_codes().contains("  4  "));
    }

    /// The client commands talk to the daemon through `api` and `http-unix` only: the
    /// `daemon` crate is linked for `ferro daemon` alone.
    #[test]
    fn the_clients_do_not_use_the_daemon_crate() {
        for (file, text) in [
            ("client.rs", include_str!("client.rs")),
            ("client_pools.rs", include_str!("client_pools.rs")),
            ("client_networks.rs", include_str!("client_networks.rs")),
            (
                "client/vm_definition.rs",
                include_str!("client/vm_definition.rs"),
            ),
            ("console_attach.rs", include_str!("console_attach.rs")),
        ] {
            let needle = ["daemon", "::"].concat();
            let uses: Vec<&str> = text.lines().filter(|l| l.contains(&needle)).collect();
            assert!(uses.is_empty(), "{file} uses the daemon crate: {uses:?}");
        }
    }
}
