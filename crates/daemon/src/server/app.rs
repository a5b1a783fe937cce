//! What the route handlers share: the [`App`] state (the VMs, pools and networks), request
//! body parsing, and running an operation off the request (on a blocking thread, or as a task
//! of its own that a client going away cannot cancel halfway).
//!
//! Threading: called from the handlers on the daemon's runtime.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::FromRef;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::networks::Networks;
use crate::pools::Pools;
use crate::server::error::ApiError;
use crate::vms::supervisor::Supervisor;

pub type Shared = Arc<Supervisor>;

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

/// Runs `work` (which may block on files, processes or netlink) off the runtime's threads and
/// answers with its value as JSON.
pub async fn blocking<T, E, F>(status: StatusCode, work: F) -> Result<Response, ApiError>
where
    T: serde::Serialize + Send + 'static,
    E: Into<ApiError> + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    let value = off_runtime(work).await?;
    Ok((status, Json(value)).into_response())
}

/// Runs `work` (which may block) off the runtime's threads and gives back its value.
pub async fn off_runtime<T, E, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("the operation failed: {e}")))?
        .map_err(Into::into)
}

/// Parses a JSON body with serde's own message (which names unknown fields).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

/// Runs an operation as its own task: a client that goes away does not cancel it halfway.
pub async fn detached<F, T, E>(operation: F) -> Result<T, ApiError>
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
