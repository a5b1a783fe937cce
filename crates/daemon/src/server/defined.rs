//! The routes every defined resource with an active state has (pools, networks), once for
//! all of them: list and define on the collection, info and undefine on one resource, start,
//! stop and autostart. Each resource says what the operations do ([`Defined`]); the routes,
//! statuses and bodies are the same for every one of them.
//!
//! Threading: handlers on the daemon's runtime; each operation runs on its blocking pool,
//! a look included (a resource's table lock is held across host changes, such as a network's
//! start).

use std::sync::Arc;

use api::daemon_api::AutostartRequest;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::failure::Failure;
use crate::server::app::{blocking, off_runtime, parse_body, App};
use crate::server::error::ApiError;

type ApiResult = Result<Response, ApiError>;

/// A defined resource with an active state, as its routes use it. Every operation but
/// [`Defined::admit`] may block.
pub trait Defined: Send + Sync + 'static {
    /// Where the collection is (`/api/v1/pools`); one resource is at `COLLECTION/NAME`.
    const COLLECTION: &'static str;
    /// What a define request sends.
    type Definition: DeserializeOwned + Send + 'static;
    /// What the resource's routes answer with.
    type Info: Serialize + Send + 'static;

    /// This resource in the daemon's state.
    fn of(app: &App) -> Arc<Self>;

    /// What the rest of the daemon (the VMs) has against a new definition, checked before it
    /// is taken; on the runtime, so it must not block.
    fn admit(_app: &App, _definition: &Self::Definition) -> Result<(), Failure> {
        Ok(())
    }

    fn define(&self, definition: Self::Definition) -> Result<Self::Info, Failure>;
    fn list(&self) -> Result<Vec<Self::Info>, Failure>;
    fn info(&self, name: &str) -> Result<Self::Info, Failure>;
    fn undefine(&self, name: &str) -> Result<(), Failure>;
    fn start(&self, name: &str) -> Result<Self::Info, Failure>;
    fn stop(&self, name: &str) -> Result<Self::Info, Failure>;
    fn set_autostart(&self, name: &str, enabled: bool) -> Result<Self::Info, Failure>;
}

/// The routes of resource `R`: the collection, one resource, and its start, stop and
/// autostart.
pub fn routes<R: Defined>() -> Router<App> {
    let one = format!("{}/{{name}}", R::COLLECTION);
    Router::new()
        .route(R::COLLECTION, get(list::<R>).post(define::<R>))
        .route(&one, get(info::<R>).delete(undefine::<R>))
        .route(&format!("{one}/start"), post(start::<R>))
        .route(&format!("{one}/stop"), post(stop::<R>))
        .route(&format!("{one}/autostart"), put(autostart::<R>))
}

async fn list<R: Defined>(State(app): State<App>) -> ApiResult {
    let resource = R::of(&app);
    blocking(StatusCode::OK, move || resource.list()).await
}

async fn define<R: Defined>(State(app): State<App>, body: Bytes) -> ApiResult {
    let definition: R::Definition = parse_body(&body)?;
    R::admit(&app, &definition)?;
    let resource = R::of(&app);
    blocking(StatusCode::CREATED, move || resource.define(definition)).await
}

async fn info<R: Defined>(State(app): State<App>, UrlPath(name): UrlPath<String>) -> ApiResult {
    let resource = R::of(&app);
    blocking(StatusCode::OK, move || resource.info(&name)).await
}

async fn undefine<R: Defined>(State(app): State<App>, UrlPath(name): UrlPath<String>) -> ApiResult {
    let resource = R::of(&app);
    off_runtime(move || resource.undefine(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start<R: Defined>(State(app): State<App>, UrlPath(name): UrlPath<String>) -> ApiResult {
    let resource = R::of(&app);
    blocking(StatusCode::OK, move || resource.start(&name)).await
}

async fn stop<R: Defined>(State(app): State<App>, UrlPath(name): UrlPath<String>) -> ApiResult {
    let resource = R::of(&app);
    blocking(StatusCode::OK, move || resource.stop(&name)).await
}

async fn autostart<R: Defined>(
    State(app): State<App>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let request: AutostartRequest = parse_body(&body)?;
    let resource = R::of(&app);
    blocking(StatusCode::OK, move || {
        resource.set_autostart(&name, request.enabled)
    })
    .await
}

#[cfg(test)]
#[path = "defined_tests.rs"]
mod tests;
