//! The VM routes of the REST API (define, undefine, the power operations, autostart,
//! statistics, the stall report), the host's, and the event stream. Operations that change a VM run as tasks
//! of their own ([`detached`]).

use std::convert::Infallible;
use std::time::Duration;

use api::daemon_api::{AutostartRequest, ShutdownRequest, VmDefinition, VmStats};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use crate::host;
use crate::server::app::{detached, parse_body, App, Shared};
use crate::server::error::ApiError;
use crate::server::http::Client;
use crate::vms::supervisor::{self, Control};

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<App> {
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
        .route("/api/v1/vms/{name}/diagnostics", get(diagnostics))
        .route("/api/v1/host", get(host_info))
        .route("/api/v1/events", get(events))
}

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

/// The VMM's stall report, as it gave it.
async fn diagnostics(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(s.diagnostics(&name).await?).into_response())
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
