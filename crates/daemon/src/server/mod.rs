//! The REST API (`docs/api/daemon.openapi.json`) on the daemon's Unix socket, and the
//! daemon's start and stop. Connections are served within the limits of [`http`]
//! (header and body deadlines, connection limits overall and per user, a cap on each user's
//! event streams, a bounded stop).

mod error;
mod http;
mod networks;
mod pools;

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::daemon_api::{AutostartRequest, ShutdownRequest, VmDefinition, VmStats};
use axum::body::{Body, Bytes};
use axum::extract::{FromRef, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use tokio::net::UnixListener;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

pub use error::DaemonError;

use crate::networks::Networks;
use crate::pools::Pools;
use crate::vms::store::Store;
use crate::vms::supervisor::{self, Control, Supervisor};
use crate::{host, DaemonOptions};
use error::ApiError;
use http::{Client, Limits};

type Shared = Arc<Supervisor>;

/// What the handlers share: the VMs and the pools.
#[derive(Debug, Clone)]
pub struct App {
    pub vms: Shared,
    pub pools: Arc<Pools>,
    pub networks: Arc<Networks>,
}

impl FromRef<App> for Arc<Networks> {
    fn from_ref(app: &App) -> Arc<Networks> {
        app.networks.clone()
    }
}

impl FromRef<App> for Shared {
    fn from_ref(app: &App) -> Shared {
        app.vms.clone()
    }
}

impl FromRef<App> for Arc<Pools> {
    fn from_ref(app: &App) -> Arc<Pools> {
        app.pools.clone()
    }
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
    );
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

/// Runs `work` (which may block on files, processes or netlink) off the runtime's threads and
/// answers with its value as JSON.
pub async fn blocking<T, E, F>(status: StatusCode, work: F) -> Result<Response, ApiError>
where
    T: serde::Serialize + Send + 'static,
    E: Into<ApiError> + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    let value = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("the operation failed: {e}")))?
        .map_err(Into::into)?;
    Ok((status, Json(value)).into_response())
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
        .route("/api/v1/vms", get(list).post(define))
        .route("/api/v1/vms/{name}", get(details).delete(undefine))
        .route("/api/v1/vms/{name}/start", post(start))
        .route("/api/v1/vms/{name}/shutdown", post(shutdown))
        .route("/api/v1/vms/{name}/destroy", post(destroy))
        .route("/api/v1/vms/{name}/reboot", post(reboot))
        .route("/api/v1/vms/{name}/reset", post(reset))
        .route("/api/v1/vms/{name}/suspend", post(suspend))
        .route("/api/v1/vms/{name}/resume", post(resume))
        .route("/api/v1/vms/{name}/autostart", put(autostart))
        .route("/api/v1/vms/{name}/stats", get(stats))
        .route("/api/v1/host", get(host_info))
        .route("/api/v1/events", get(events))
        .merge(crate::server::pools::routes())
        .merge(crate::server::networks::routes())
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

/// Parses a JSON body with serde's own message (which names unknown fields).
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

/// Runs an operation as its own task: a client that goes away does not cancel it halfway.
async fn detached<F, T, E>(operation: F) -> Result<T, ApiError>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::spawn(operation)
        .await
        .map_err(|e| ApiError::internal(format!("the operation failed: {e}")))?
        .map_err(Into::into)
}

type ApiResult<T> = Result<T, ApiError>;

async fn list(State(s): State<Shared>) -> Json<Vec<api::daemon_api::VmSummary>> {
    Json(s.list())
}

/// 201 for a new VM, 200 for an existing one's new definition.
async fn define(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let definition: VmDefinition = parse_body(&body)?;
    let (details, created) = detached(async move { s.define(definition) }).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(details)).into_response())
}

async fn details(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    Ok(Json(s.details(&name)?).into_response())
}

async fn undefine(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    detached(async move { s.undefine(&name) }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    let details = detached(async move { s.start(&name).await }).await?;
    Ok(Json(details).into_response())
}

/// The wait of a shutdown or reboot: its optional body's, or the default.
fn power_timeout(body: &Bytes) -> ApiResult<Duration> {
    let request: ShutdownRequest = if body.is_empty() {
        ShutdownRequest::default()
    } else {
        parse_body(body)?
    };
    Ok(request
        .timeout_secs
        .map_or(supervisor::SHUTDOWN_TIMEOUT, Duration::from_secs))
}

async fn shutdown(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let timeout = power_timeout(&body)?;
    let details = detached(async move { s.shutdown(&name, timeout).await }).await?;
    Ok(Json(details).into_response())
}

async fn reboot(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let timeout = power_timeout(&body)?;
    let details = detached(async move { s.reboot(&name, timeout).await }).await?;
    Ok(Json(details).into_response())
}

async fn destroy(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    let details = detached(async move { s.destroy(&name).await }).await?;
    Ok(Json(details).into_response())
}

async fn control(s: Shared, name: String, action: Control) -> ApiResult<Response> {
    let details = detached(async move { s.control(&name, action).await }).await?;
    Ok(Json(details).into_response())
}

async fn reset(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    control(s, name, Control::Reset).await
}

async fn suspend(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    control(s, name, Control::Suspend).await
}

async fn resume(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    control(s, name, Control::Resume).await
}

async fn autostart(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let request: AutostartRequest = parse_body(&body)?;
    let details = detached(async move { s.set_autostart(&name, request.enabled) }).await?;
    Ok(Json(details).into_response())
}

async fn stats(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    let vm = s.process_of(&name)?;
    let (pid, vcpus, state, memory_bytes) = (vm.pid, vm.vcpus, vm.state, vm.memory_bytes);
    let counters = supervisor::vmm_counters(&vm.api_socket).await?;
    let (cpu_time_ns, vcpu_time_ns) =
        tokio::task::spawn_blocking(move || host::process_cpu(pid, vcpus))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(VmStats {
        name,
        state,
        cpu_time_ns,
        vcpu_time_ns,
        memory_bytes,
        rss_bytes: host::rss_bytes(pid),
        counters,
    })
    .into_response())
}

async fn host_info(State(s): State<Shared>) -> ApiResult<Response> {
    let (running, defined) = s.counts();
    let info = tokio::task::spawn_blocking(move || host::host_info(running, defined))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(info).into_response())
}

/// Newline-delimited JSON events, as they happen, until the client goes away or the daemon
/// stops; one of the user's few long-lived responses (429 past them).
async fn events(
    State(s): State<Shared>,
    Extension(client): Extension<Client>,
) -> ApiResult<Response> {
    let stream = BroadcastStream::new(s.subscribe()).filter_map(|event| {
        let event = event.ok()?;
        let mut line = serde_json::to_vec(&event).ok()?;
        line.push(b'\n');
        Some(Ok::<_, Infallible>(Bytes::from(line)))
    });
    let body = client.long_lived(Body::from_stream(stream))?;
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}
