//! The virtual network routes of the REST API.

use std::sync::Arc;

use api::net_api::NetworkDefinition;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::error::ApiError;
use crate::networks::Networks;
use crate::server::{parse_body, App};

type ApiResult = Result<Response, ApiError>;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v1/networks", get(list).post(define))
        .route("/api/v1/networks/{name}", get(info).delete(undefine))
}

async fn list(State(networks): State<Arc<Networks>>) -> Response {
    Json(networks.list()).into_response()
}

async fn define(State(networks): State<Arc<Networks>>, body: Bytes) -> ApiResult {
    let definition: NetworkDefinition = parse_body(&body)?;
    let info = networks.define(definition)?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
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
