//! The pool and volume routes of the REST API: a pool's are the ones every defined resource
//! has ([`defined`](crate::server::defined)); its volumes' are here. Image work can take long
//! (a full clone copies the data), so every handler runs on the blocking pool, to completion
//! even if the client goes away.

use std::sync::Arc;

use api::pool_api::{
    CloneEvent, PoolDefinition, PoolInfo, SnapshotCreate, VolumeClone, VolumeCreate, VolumeFormat,
    VolumeResize,
};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, RawQuery};
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use block::manage::SnapshotOp;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::failure::Failure;
use crate::pools::Pools;
use crate::server::app::{blocking, off_runtime, parse_body, App};
use crate::server::defined::{self, Defined};
use crate::server::error::{status_of, ApiError};

type ApiResult = Result<Response, ApiError>;

pub fn routes() -> Router<App> {
    defined::routes::<Pools>()
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
            "/api/v1/pools/{pool}/volumes/{volume}/format",
            put(set_volume_format),
        )
        .route(
            "/api/v1/pools/{pool}/volumes/{volume}/data",
            get(download_volume)
                .put(upload_volume)
                .layer(DefaultBodyLimit::disable()),
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

/// Each operation is the inherent method of the same name (inherent methods come first in
/// `Pools::...`).
impl Defined for Pools {
    const COLLECTION: &'static str = api::pool_api::paths::POOLS;
    type Definition = PoolDefinition;
    type Info = PoolInfo;

    fn of(app: &App) -> Arc<Self> {
        app.pools.clone()
    }

    fn define(&self, definition: PoolDefinition) -> Result<PoolInfo, Failure> {
        Pools::define(self, definition)
    }

    fn list(&self) -> Result<Vec<PoolInfo>, Failure> {
        self.names().iter().map(|n| Pools::info(self, n)).collect()
    }

    fn info(&self, name: &str) -> Result<PoolInfo, Failure> {
        Pools::info(self, name)
    }

    fn undefine(&self, name: &str) -> Result<(), Failure> {
        Pools::undefine(self, name)
    }

    fn start(&self, name: &str) -> Result<PoolInfo, Failure> {
        Pools::start(self, name)
    }

    fn stop(&self, name: &str) -> Result<PoolInfo, Failure> {
        Pools::stop(self, name)
    }

    fn set_autostart(&self, name: &str, enabled: bool) -> Result<PoolInfo, Failure> {
        Pools::set_autostart(self, name, enabled)
    }
}

/// The volume's file, streamed, with its recorded format in `Ferro-Volume-Format` (an upload
/// of the file gives it back with `?format=`).
async fn download_volume(
    State(pools): State<Arc<Pools>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> ApiResult {
    let info = tokio::task::spawn_blocking(move || pools.volume(&pool, &volume))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let path = info.path;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let sent = match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await,
                Err(e) => tx.send(Err(e)).await,
            };
            if sent.is_err() {
                return; // the client went away
            }
        }
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .header(api::pool_api::FORMAT_HEADER, info.format)
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Replaces the volume's file with the request body (an image; see `Pools::finish_upload`).
async fn upload_volume(
    State(app): State<App>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let format = upload_format(uri.query())?;
    let len = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "an upload needs Content-Length",
            )
        })?;
    let (pools, vms) = (app.pools.clone(), app.vms.clone());
    let (p, v) = (pool.clone(), volume.clone());
    let target = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let path = pools.volume(&p, &v)?.path;
        if let Some(vm) = vms.vm_running_with(&path) {
            return Err(ApiError::conflict(format!(
                "VM {vm} is running with volume {v}; shut it down first"
            )));
        }
        Ok(pools.upload_target(&p, &v, len)?)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    // Its own task: a client that hangs up ends the body stream with an error, and the partial
    // file is removed, instead of the handler being dropped halfway.
    let (pools, vms) = (app.pools.clone(), app.vms.clone());
    tokio::spawn(async move {
        if let Err(e) = receive(body, &target, len).await {
            let _ = tokio::fs::remove_file(&target).await;
            return Err(e);
        }
        blocking(StatusCode::OK, move || {
            pools.finish_upload(&pool, &volume, &target, format, |path| {
                vms.vm_running_with(path)
            })
        })
        .await
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The `format` an upload's query names (`?format=raw|qcow2`), if any; other keys are refused.
fn upload_format(query: Option<&str>) -> Result<Option<block::Format>, ApiError> {
    let mut format = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("format", value)) if format.is_none() => {
                format = Some(value.parse().map_err(ApiError::bad_request)?);
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown or repeated upload parameter {pair:?} (only format=raw|qcow2)"
                )))
            }
        }
    }
    Ok(format)
}

/// Writes exactly `len` body bytes to `path`.
async fn receive(body: Body, path: &std::path::Path, len: u64) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::internal(format!("upload failed: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload interrupted: {e}")))?;
        received += chunk.len() as u64;
        if received > len {
            return Err(ApiError::bad_request(
                "the upload is longer than its Content-Length",
            ));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    if received != len {
        return Err(ApiError::bad_request(format!(
            "the upload ended after {received} of {len} bytes"
        )));
    }
    file.sync_data().await.map_err(io)
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
    blocking(status, move || -> Result<_, ApiError> {
        let path = pools.volume(&pool, &volume)?.path;
        if let Some(vm) = vms.vm_writing(&path) {
            return Err(ApiError::conflict(format!(
                "VM {vm} is running and writes volume {volume}; shut it down first"
            )));
        }
        Ok(pools.snapshots(&pool, &volume, &op)?)
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
    off_runtime(move || pools.delete_volume(&pool, &volume, |path| vms.vm_using(path))).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_volume_format(
    State(app): State<App>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let request: VolumeFormat = parse_body(&body)?;
    let (pools, vms) = (app.pools.clone(), app.vms.clone());
    blocking(StatusCode::OK, move || {
        pools.set_format(&pool, &volume, &request.format, |path| {
            vms.vm_running_with(path)
        })
    })
    .await
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
    RawQuery(query): RawQuery,
    body: Bytes,
) -> ApiResult {
    let request: VolumeClone = parse_body(&body)?;
    if query.as_deref() != Some("progress=ndjson") {
        return blocking(StatusCode::CREATED, move || {
            pools.clone_volume(&pool, &volume, &request)
        })
        .await;
    }
    // Progress lines as the copy goes (at most ten a second), then the result; the copy runs
    // to its end even if the client goes away.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::task::spawn_blocking(move || {
        let line = |event: &CloneEvent| {
            let mut bytes = serde_json::to_vec(event).unwrap_or_default();
            bytes.push(b'\n');
            Bytes::from(bytes)
        };
        let mut last: Option<std::time::Instant> = None;
        let mut progress = |bytes: u64, total: u64| {
            if bytes < total && last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                return;
            }
            last = Some(std::time::Instant::now());
            let _ = tx.blocking_send(line(&CloneEvent::Progress { bytes, total }));
        };
        let result = pools.clone_volume_with_progress(&pool, &volume, &request, &mut progress);
        let end = match result {
            Ok(done) => CloneEvent::Done { done },
            Err(e) => CloneEvent::Failed {
                error: e.message,
                status: status_of(e.kind).as_u16(),
            },
        };
        let _ = tx.blocking_send(line(&end));
    });
    let stream = ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}
