//! The virtual network routes of the REST API. Starting and stopping a network changes the
//! host (netlink, nft, dnsmasq): that runs on blocking threads.

use std::sync::Arc;

use api::daemon_api::AutostartRequest;
use api::net_api::NetworkDefinition;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use crate::networks::Networks;
use crate::server::app::{blocking, parse_body, App};
use crate::server::error::ApiError;

type ApiResult = Result<Response, ApiError>;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v1/networks", get(list).post(define))
        .route("/api/v1/networks/{name}", get(info).delete(undefine))
        .route("/api/v1/networks/{name}/start", post(start))
        .route("/api/v1/networks/{name}/stop", post(stop))
        .route("/api/v1/networks/{name}/autostart", put(autostart))
        .route("/api/v1/networks/{name}/leases", get(leases))
}

async fn list(State(networks): State<Arc<Networks>>) -> Response {
    Json(networks.list()).into_response()
}

async fn define(State(app): State<App>, body: Bytes) -> ApiResult {
    let definition: NetworkDefinition = parse_body(&body)?;
    // A VM's own TAP device is not a bridge to take (checked again when the VM starts).
    if let Some(vm) = app.vms.vm_naming_tap(&definition.bridge) {
        return Err(ApiError::conflict(format!(
            "{} is the TAP device of VM {vm}; pick another bridge name",
            definition.bridge
        )));
    }
    let networks = app.networks.clone();
    blocking(StatusCode::CREATED, move || networks.define(definition)).await
}

async fn info(State(networks): State<Arc<Networks>>, UrlPath(name): UrlPath<String>) -> ApiResult {
    Ok(Json(networks.info(&name)?).into_response())
}

async fn undefine(
    State(networks): State<Arc<Networks>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    networks.undefine(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start(State(networks): State<Arc<Networks>>, UrlPath(name): UrlPath<String>) -> ApiResult {
    blocking(StatusCode::OK, move || networks.start(&name)).await
}

async fn stop(State(networks): State<Arc<Networks>>, UrlPath(name): UrlPath<String>) -> ApiResult {
    blocking(StatusCode::OK, move || networks.stop(&name)).await
}

async fn autostart(
    State(networks): State<Arc<Networks>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let request: AutostartRequest = parse_body(&body)?;
    blocking(StatusCode::OK, move || {
        networks.set_autostart(&name, request.enabled)
    })
    .await
}

async fn leases(
    State(networks): State<Arc<Networks>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    blocking(StatusCode::OK, move || networks.leases(&name)).await
}
