//! `ferro`: the command-line entry point of the Ferro virtualization platform.

mod img;
mod run;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Ferro: KVM virtual machines, lean and simple.
#[derive(Debug, Parser)]
#[command(name = "ferro", version, propagate_version = true)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). FERRO_LOG overrides it with a
    /// tracing filter such as `vmm=debug`.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
    Img(img::ImgArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let from_env = EnvFilter::try_from_env("FERRO_LOG").ok();
    // Plain warnings by default; timestamps (seconds since start) once the user asks for more.
    let detailed = verbose > 0 || from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false);
    if detailed {
        builder
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        builder.without_time().init();
    }
}

/// The error and its sources on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Img(args) => img::img(args),
    }
}
