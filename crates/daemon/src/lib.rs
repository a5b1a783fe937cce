//! `ferro daemon`: libvirt's role for Ferro. It keeps VM definitions under a state directory,
//! runs each started VM as its own `ferro run` process (controlled only through that process's
//! API socket), watches those processes, and serves a REST API on a Unix socket.
//!
//! Threads: one tokio current-thread runtime. Blocking work (talking to a VMM's API, starting
//! a process, reading /proc) runs on tokio's blocking pool. Each mutating operation runs as its
//! own task, so a client that disconnects mid-request cannot leave it half done; per VM, one
//! operation at a time (others get 409). VMMs live in their own process groups: stopping or
//! restarting the daemon leaves them running, and the next daemon adopts them.

mod failure;
mod fs;
mod host;
mod networks;
mod pools;
mod registry;
mod server;
mod vms;

pub use api::daemon_api::DEFAULT_SOCKET;
pub use api::definition_file::{
    parse_network as parse_network_definition, parse_pool as parse_pool_definition,
    parse_vm as parse_definition,
};
pub use server::{DaemonError, DaemonOptions};
pub use vms::file_dirs::DEFAULT_FILE_DIR;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferro";

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(server::serve(options))
}
