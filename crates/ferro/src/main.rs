//! `ferro`: the command-line entry point of the Ferro virtualization platform.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

mod client;
mod client_networks;
mod client_pools;
mod console_attach;
mod img;
mod man_pages;
mod run;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// Ferro: KVM virtual machines, lean and simple.
#[derive(Debug, Parser)]
#[command(name = "ferro", version, propagate_version = true)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). FERRO_LOG overrides it with a
    /// tracing filter such as `vmm=debug`.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// The daemon's socket, for the commands that talk to it (vm, host, events, pool, vol,
    /// net; `ferro -c PATH vm list`, as `virsh -c`) and the one `ferro daemon` listens on.
    #[arg(
        short = 'c',
        long = "socket",
        env = "FERRO_SOCKET",
        value_name = "PATH"
    )]
    socket: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
    Img(img::ImgArgs),
    Daemon(DaemonArgs),
    Vm(client::VmArgs),
    Host(client::HostArgs),
    Events(client::EventsArgs),
    Pool(client_pools::PoolArgs),
    Vol(client_pools::VolArgs),
    Net(client_networks::NetArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ferro.1 and one per subcommand) into DIR, for packaging.
    #[command(hide = true)]
    Man {
        /// The directory to write them to (created if missing).
        dir: std::path::PathBuf,
        /// The date in the pages' footer (the release's, e.g. 2026-12-07).
        #[arg(long)]
        date: String,
    },
}

/// Run the Ferro daemon: persistent VMs, one VMM process per running VM, REST API.
#[derive(Debug, clap::Args)]
struct DaemonArgs {
    /// Unix socket to serve the API on (mode 0660, group `ferro` if it exists). Default: the
    /// socket given before the subcommand (`ferro -c PATH daemon`) or FERRO_SOCKET, else
    /// /run/ferro/ferro.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// Where definitions, console logs and runtime files live.
    #[arg(long, default_value = daemon::DEFAULT_STATE_DIR)]
    state_dir: std::path::PathBuf,
    /// A directory whose files (kernels, initrds, disks given by path, backing_dir) VM
    /// definitions may name, besides the pools' directories; anything else is refused, so
    /// that defining a VM is not a way to read any file on the host. Repeat for more; giving
    /// one replaces the default.
    #[arg(long = "file-dir", value_name = "DIR", default_value = daemon::DEFAULT_FILE_DIR)]
    file_dirs: Vec<std::path::PathBuf>,
}

fn run_daemon(args: DaemonArgs, fallback_socket: Option<std::path::PathBuf>) -> ExitCode {
    let ferro = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("ferro: error: cannot find the ferro executable: {e}");
            return ExitCode::from(1);
        }
    };
    let options = daemon::DaemonOptions {
        socket: args
            .socket
            .or(fallback_socket)
            .unwrap_or_else(|| daemon::DEFAULT_SOCKET.into()),
        state_dir: args.state_dir,
        ferro,
        file_dirs: args.file_dirs,
    };
    match daemon::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferro: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr, or to `log_file` (capped and rotated, stderr following it) when given.
fn init_logging(verbose: u8, log_file: Option<&std::path::Path>) -> Result<(), String> {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let from_env = EnvFilter::try_from_env("FERRO_LOG").ok();
    // Plain warnings by default; timestamps (seconds since start) once the user asks for more.
    // A log file has the date and time: it outlives the moment.
    let detailed = verbose > 0 || from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let builder = match log_file {
        Some(path) => {
            let log = open_log_file(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(BoxMakeWriter::new(move || log.writer()))
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(BoxMakeWriter::new(std::io::stderr)),
    };
    if log_file.is_some() {
        builder
            .with_timer(tracing_subscriber::fmt::time::SystemTime)
            .init();
    } else if detailed {
        builder
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        builder.without_time().init();
    }
    Ok(())
}

/// The VMM's log when the daemon runs it: whatever the guest makes it log stays under
/// [`guest_log::LogLimits::DEFAULT`] on disk, and stderr (panics, the last error) goes there too.
fn open_log_file(path: &std::path::Path) -> std::io::Result<guest_log::SharedLog> {
    let mut log = guest_log::RotatingLog::open(path, guest_log::LogLimits::DEFAULT)?;
    log.take_stderr()?;
    Ok(guest_log::SharedLog::new(log))
}

pub(crate) use api::error_chain;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Run(args) => args.log_file(),
        _ => None,
    };
    if let Err(e) = init_logging(cli.verbose, log_file) {
        eprintln!("ferro: error: {e}");
        return ExitCode::from(1);
    }
    if let Some(socket) = &cli.socket {
        client::set_fallback_socket(socket.clone());
    }
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Img(args) => img::img(args),
        Command::Daemon(args) => run_daemon(args, cli.socket),
        Command::Vm(args) => client::vm(args),
        Command::Host(args) => client::host(args),
        Command::Events(args) => client::events(args),
        Command::Pool(args) => client_pools::pool(args),
        Command::Vol(args) => client_pools::vol(args),
        Command::Net(args) => client_networks::net(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ferro", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir, date } => {
            use clap::CommandFactory;
            match man_pages::write(Cli::command(), &dir, &date) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "ferro: error: cannot write the man pages to {}: {e}",
                        dir.display()
                    );
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "ferro", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    /// `-c`/`--socket` goes before the subcommand (as `virsh -c`) or after it.
    #[test]
    fn the_socket_goes_before_or_after_the_subcommand() {
        let before = Cli::try_parse_from(["ferro", "-c", "/run/x.sock", "vm", "list"]).unwrap();
        assert_eq!(
            before.socket.as_deref(),
            Some(std::path::Path::new("/run/x.sock"))
        );
        let after = Cli::try_parse_from(["ferro", "vm", "list", "--socket", "/run/y.sock"]);
        assert!(after.is_ok());
        let daemon = Cli::try_parse_from(["ferro", "-c", "/run/z.sock", "daemon"]);
        assert!(daemon.is_ok());
    }
}
