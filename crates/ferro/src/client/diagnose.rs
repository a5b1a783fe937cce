//! `ferro vm diagnose NAME`: the VM's stall report (through the daemon, from its VMM) as text
//! a person can read, or as the VMM's JSON; `--api-socket PATH` asks a VMM directly (a VM run
//! by hand with `ferro run --api-socket PATH`). The text is `api::diagnostics_text`'s.

use std::path::PathBuf;
use std::time::Duration;

use api::daemon_api::paths;
use clap::Args;
use http_unix::Client;

use super::{call, decode, print_json, Failure, Outcome};

use api::diagnostics::VmDiagnostics;
use api::diagnostics_text::render;

#[derive(Debug, Args)]
pub(crate) struct DiagnoseArgs {
    /// The VM (asked through the daemon).
    #[arg(required_unless_present = "api_socket")]
    name: Option<String>,
    /// Ask the VMM serving this API socket directly, without the daemon (a VM started with
    /// `ferro run --api-socket PATH`).
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    api_socket: Option<PathBuf>,
    /// Print the VMM's JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Fetches the report (from the daemon, or from the VMM's own socket) and prints it.
pub(crate) fn run(daemon: &Client, args: &DiagnoseArgs) -> Outcome {
    let (name, response) = match (&args.name, &args.api_socket) {
        (_, Some(socket)) => {
            let vmm = Client::new(socket, Some(Duration::from_secs(30)));
            let path = api::vmm_api::paths::DIAGNOSTICS;
            let response = vmm.request("GET", path, None).map_err(|e| {
                Failure(
                    5,
                    format!(
                        "{} (is a VMM serving {}?)",
                        crate::error_chain(&e),
                        socket.display()
                    ),
                )
            })?;
            if response.status != 200 {
                let message = serde_json::from_slice::<api::vmm_api::ErrorBody>(&response.body)
                    .map_or_else(|_| response.text(), |b| b.error);
                let code = super::exit_code_for(response.status);
                return Err(Failure(code, format!("the VMM refused: {message}")));
            }
            (socket.display().to_string(), response)
        }
        (Some(name), None) => {
            let path = paths::vm_action(name, "diagnostics");
            (name.clone(), call(daemon, "GET", &path, None)?)
        }
        (None, None) => return Err(Failure(2, "name a VM or give --api-socket".into())),
    };
    let report: VmDiagnostics = decode(&response)?;
    if args.json {
        return print_json(&report);
    }
    print!("{}", render(&name, &report));
    Ok(())
}
