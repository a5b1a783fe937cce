//! The pool and volume routes of the REST API. Image work can take long (a full clone copies
//! the data), so every handler runs on the blocking pool, to completion even if the client
//! goes away.

use std::sync::Arc;

use api::daemon_api::AutostartRequest;
use api::pool_api::{PoolDefinition, SnapshotCreate, VolumeClone, VolumeCreate, VolumeResize};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use block::manage::SnapshotOp;

use crate::error::ApiError;
use crate::pools::Pools;
use crate::server::{parse_body, App};

type ApiResult = Result<Response, ApiError>;

/// Runs `work` on the blocking pool and answers with its JSON result and `status`.
async fn blocking<T, F>(status: StatusCode, work: F) -> ApiResult
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let value = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("the operation failed: {e}")))??;
    Ok((status, Json(value)).into_response())
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v1/pools", get(list_pools).post(define_pool))
        .route("/api/v1/pools/{pool}", get(pool_info).delete(undefine_pool))
        .route("/api/v1/pools/{pool}/start", post(start_pool))
        .route("/api/v1/pools/{pool}/stop", post(stop_pool))
        .route("/api/v1/pools/{pool}/autostart", put(autostart_pool))
        .route(
            "/api/v1/pools/{pool}/volumes",
            get(list_volumes).post(create_volume),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}",
            get(volume_info).delete(delete_volume),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/resize",
            post(resize_volume),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/clone",
            post(clone_volume),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}",
            delete(delete_snapshot),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}/revert",
            post(revert_snapshot),
        )
}

async fn list_snapshots(
    State(pools): State<Arc<Pools>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> ApiResult {
    blocking(StatusCode::OK, move || {
        pools.snapshots(&pool, &volume, &SnapshotOp::List)
    })
    .await
}

/// Runs a snapshot change unless a running VM writes the volume.
async fn change_snapshots(
    app: App,
    pool: String,
    volume: String,
    op: SnapshotOp,
    status: StatusCode,
) -> ApiResult {
    let (pools, vms) = (app.pools.clone(), app.vms.clone());
    blocking(status, move || {
        let path = pools.volume(&pool, &volume)?.path;
        if let Some(vm) = vms.vm_writing(&path) {
            return Err(ApiError::conflict(format!(
                "VM {vm} is running and writes volume {volume}; shut it down first"
            )));
        }
        pools.snapshots(&pool, &volume, &op)
    })
    .await
}

async fn create_snapshot(
    State(app): State<App>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let request: SnapshotCreate = parse_body(&body)?;
    let op = SnapshotOp::Create(request.name);
    change_snapshots(app, pool, volume, op, StatusCode::CREATED).await
}

async fn delete_snapshot(
    State(app): State<App>,
    UrlPath((pool, volume, snapshot)): UrlPath<(String, String, String)>,
) -> ApiResult {
    let op = SnapshotOp::Delete(snapshot);
    change_snapshots(app, pool, volume, op, StatusCode::OK).await
}

async fn revert_snapshot(
    State(app): State<App>,
    UrlPath((pool, volume, snapshot)): UrlPath<(String, String, String)>,
) -> ApiResult {
    let op = SnapshotOp::Apply(snapshot);
    change_snapshots(app, pool, volume, op, StatusCode::OK).await
}

async fn list_pools(State(pools): State<Arc<Pools>>) -> ApiResult {
    blocking(StatusCode::OK, move || {
        pools
            .names()
            .iter()
            .map(|n| pools.info(n))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
}

async fn define_pool(State(pools): State<Arc<Pools>>, body: Bytes) -> ApiResult {
    let definition: PoolDefinition = parse_body(&body)?;
    blocking(StatusCode::CREATED, move || pools.define(definition)).await
}

async fn pool_info(State(pools): State<Arc<Pools>>, UrlPath(pool): UrlPath<String>) -> ApiResult {
    blocking(StatusCode::OK, move || pools.info(&pool)).await
}

async fn undefine_pool(
    State(pools): State<Arc<Pools>>,
    UrlPath(pool): UrlPath<String>,
) -> ApiResult {
    tokio::task::spawn_blocking(move || pools.undefine(&pool))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_pool(State(pools): State<Arc<Pools>>, UrlPath(pool): UrlPath<String>) -> ApiResult {
    blocking(StatusCode::OK, move || pools.start(&pool)).await
}

async fn stop_pool(State(pools): State<Arc<Pools>>, UrlPath(pool): UrlPath<String>) -> ApiResult {
    blocking(StatusCode::OK, move || pools.stop(&pool)).await
}

async fn autostart_pool(
    State(pools): State<Arc<Pools>>,
    UrlPath(pool): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let request: AutostartRequest = parse_body(&body)?;
    blocking(StatusCode::OK, move || {
        pools.set_autostart(&pool, request.enabled)
    })
    .await
}

async fn list_volumes(
    State(pools): State<Arc<Pools>>,
    UrlPath(pool): UrlPath<String>,
) -> ApiResult {
    blocking(StatusCode::OK, move || pools.volumes(&pool)).await
}

async fn create_volume(
    State(pools): State<Arc<Pools>>,
    UrlPath(pool): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let request: VolumeCreate = parse_body(&body)?;
    blocking(StatusCode::CREATED, move || {
        pools.create_volume(&pool, &request)
    })
    .await
}

async fn volume_info(
    State(pools): State<Arc<Pools>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> ApiResult {
    blocking(StatusCode::OK, move || pools.volume(&pool, &volume)).await
}

async fn delete_volume(
    State(app): State<App>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> ApiResult {
    let (pools, vms) = (app.pools.clone(), app.vms.clone());
    tokio::task::spawn_blocking(move || {
        pools.delete_volume(&pool, &volume, |path| vms.vm_using(path))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resize_volume(
    State(pools): State<Arc<Pools>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let request: VolumeResize = parse_body(&body)?;
    blocking(StatusCode::OK, move || {
        pools.resize_volume(&pool, &volume, request.size.0)
    })
    .await
}

async fn clone_volume(
    State(pools): State<Arc<Pools>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let request: VolumeClone = parse_body(&body)?;
    blocking(StatusCode::CREATED, move || {
        pools.clone_volume(&pool, &volume, &request)
    })
    .await
}
