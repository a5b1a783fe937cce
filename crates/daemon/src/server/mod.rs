//! The REST API (`docs/api/daemon.openapi.json`) on the daemon's Unix socket, and the
//! daemon's start and stop: the routes of each resource ([`vms`], [`pools`], [`networks`]),
//! those every defined resource with an active state has ([`defined`]), what they share
//! ([`app`]), and the one place that maps failures to HTTP statuses
//! ([`error`]). Connections are served within the limits of [`http`] (header and body
//! deadlines, connection limits overall and per user, a cap on each user's event streams, a
//! bounded stop).
//!
//! Threading: the daemon's one tokio runtime; handlers move blocking work to its blocking
//! pool.

mod app;
mod defined;
mod error;
mod http;
mod networks;
mod pools;
mod vms;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use tokio::net::UnixListener;

pub use error::DaemonError;

use crate::networks::Networks;
use crate::pools::Pools;
use crate::vms::file_dirs::FileDirs;
use crate::vms::store::Store;
use crate::vms::supervisor::Supervisor;
use app::App;
use error::ApiError;
use http::Limits;

/// How the daemon is run.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// The `ferro` binary that runs VMs (normally this very executable).
    pub ferro: PathBuf,
    /// Where the files VM definitions name may be, besides the pools' directories.
    pub file_dirs: Vec<PathBuf>,
}

pub async fn serve(options: DaemonOptions) -> Result<(), DaemonError> {
    let store = Store::open(&options.state_dir)?;
    let pools = Arc::new(Pools::open(options.state_dir.join("pools"))?);
    let networks = Arc::new(Networks::open(
        options.state_dir.join("networks"),
        "/sys/class/net".into(),
    )?);
    let listener = listen(&options.socket)?;
    // Networks first: the VMs found running again are on their bridges.
    let resumed = networks.clone();
    let _ = tokio::task::spawn_blocking(move || resumed.resume()).await;
    let supervisor = Supervisor::new(
        store,
        options.ferro.clone(),
        pools.clone(),
        networks.clone(),
        FileDirs::new(options.file_dirs.clone()),
    )?;
    supervisor.adopt().await;
    tracing::info!("serving on {}", options.socket.display());
    tokio::spawn(supervisor.clone().run_restarts());
    let autostart = supervisor.clone();
    tokio::spawn(async move { autostart.autostart().await });
    tokio::spawn(rotate_dnsmasq_logs(networks.clone()));
    let write_back = pools.clone();
    let app = router(App {
        vms: supervisor,
        pools,
        networks,
    });
    http::serve(listener, app, Limits::default(), termination()).await;
    // A clone already answered is on storage before the daemon is gone. One still copying for
    // a client that went away settles on its own thread, or (cut off by the exit) is synced
    // by the next daemon: its record stays.
    let _ = tokio::task::spawn_blocking(move || write_back.finish_write_back()).await;
    let _ = std::fs::remove_file(&options.socket);
    Ok(())
}

/// Keeps the networks' dnsmasq logs, which guests fill, under their cap.
async fn rotate_dnsmasq_logs(networks: Arc<Networks>) {
    let mut tick = tokio::time::interval(crate::networks::dnsmasq::LOG_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let networks = networks.clone();
        let _ = tokio::task::spawn_blocking(move || networks.rotate_dnsmasq_logs()).await;
    }
}

/// Binds the socket: mode 0660, group `ferro` when it exists; a stale file is replaced.
fn listen(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    set_group(path, "ferro");
    Ok(listener)
}

/// Gives the socket to `group` when there is one, so its members may use the daemon; a host
/// without it keeps the socket root's.
fn set_group(path: &Path, group: &str) {
    let given = match host_sys::user::group_id(group) {
        Ok(Some(gid)) => host_sys::user::set_group(path, gid),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = given {
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        tracing::warn!("{e}: {}", cause.unwrap_or_default());
    }
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping; running VMs keep running");
}

fn router(app: App) -> Router {
    Router::new()
        .merge(vms::routes())
        .merge(pools::routes())
        .merge(networks::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this resource",
    )
}
