//! Requests to a VMM's own API on its Unix socket (info, counters, the stall report, power
//! commands); its
//! refusals keep their status and message.
//!
//! Threading: each request runs on the runtime's blocking pool, bounded by a timeout.

use std::path::Path;

use api::vmm_api::{paths as vmm_paths, VmInfo};
use http_unix::Client;

use crate::failure::{chain, Failure, Kind};

use super::VMM_REQUEST_TIMEOUT;

pub(super) async fn vmm_request(
    socket: &Path,
    method: &'static str,
    path: &'static str,
) -> Result<http_unix::ClientResponse, Failure> {
    let client = Client::new(socket, Some(VMM_REQUEST_TIMEOUT));
    tokio::task::spawn_blocking(move || client.request(method, path, None))
        .await
        .map_err(|e| Failure::internal(format!("VMM request task failed: {e}")))?
        .map_err(|e| Failure::internal(format!("the VMM did not answer: {}", chain(&e))))
}

/// The VMM's view of its VM.
pub async fn vmm_info(socket: &Path) -> Result<VmInfo, Failure> {
    let response = vmm_request(socket, "GET", vmm_paths::VM).await?;
    serde_json::from_slice(&response.body)
        .map_err(|e| Failure::internal(format!("bad answer from the VMM: {e}")))
}

/// Sends a command to a VMM; its refusals keep their status and message.
pub(super) async fn vmm_put(socket: &Path, path: &'static str) -> Result<(), Failure> {
    let response = vmm_request(socket, "PUT", path).await?;
    if response.status == 204 {
        return Ok(());
    }
    Err(refusal(&response))
}

/// A VMM's error answer, its status and message kept.
fn refusal(response: &http_unix::ClientResponse) -> Failure {
    let message = serde_json::from_slice::<api::vmm_api::ErrorBody>(&response.body)
        .map(|b| b.error)
        .unwrap_or_else(|_| response.text());
    Failure::new(
        Kind::VmmRefused(response.status),
        format!("the VMM refused: {message}"),
    )
}

/// Counters from a VMM.
pub async fn vmm_counters(socket: &Path) -> Result<api::vmm_api::VmCounters, Failure> {
    let response = vmm_request(socket, "GET", vmm_paths::COUNTERS).await?;
    serde_json::from_slice(&response.body)
        .map_err(|e| Failure::internal(format!("bad answer from the VMM: {e}")))
}

/// The stall report of a VMM (`GET /api/v1/vm/diagnostics`); its refusals keep their status.
pub(super) async fn vmm_diagnostics(
    socket: &Path,
) -> Result<api::diagnostics::VmDiagnostics, Failure> {
    let response = vmm_request(socket, "GET", vmm_paths::DIAGNOSTICS).await?;
    if response.status != 200 {
        return Err(refusal(&response));
    }
    serde_json::from_slice(&response.body)
        .map_err(|e| Failure::internal(format!("bad answer from the VMM: {e}")))
}
