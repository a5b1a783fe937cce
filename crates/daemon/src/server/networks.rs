//! The virtual network routes of the REST API: the ones every defined resource has
//! ([`defined`](crate::server::defined)), with the VMs' say on a new network's bridge, and
//! the DHCP leases. Starting and stopping a network changes the host (netlink, nft,
//! dnsmasq): that runs on blocking threads.

use std::sync::Arc;

use api::net_api::{NetworkDefinition, NetworkInfo};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::failure::Failure;
use crate::networks::Networks;
use crate::server::app::{blocking, App};
use crate::server::defined::{self, Defined};
use crate::server::error::ApiError;

pub fn routes() -> Router<App> {
    defined::routes::<Networks>().route("/api/v1/networks/{name}/leases", get(leases))
}

/// Each operation is the inherent method of the same name (inherent methods come first in
/// `Networks::...`).
impl Defined for Networks {
    const COLLECTION: &'static str = api::net_api::paths::NETWORKS;
    type Definition = NetworkDefinition;
    type Info = NetworkInfo;

    fn of(app: &App) -> Arc<Self> {
        app.networks.clone()
    }

    /// A VM's own TAP device is not a bridge to take (checked again when the VM starts).
    fn admit(app: &App, definition: &NetworkDefinition) -> Result<(), Failure> {
        match app.vms.vm_naming_tap(&definition.bridge) {
            Some(vm) => Err(Failure::conflict(format!(
                "{} is the TAP device of VM {vm}; pick another bridge name",
                definition.bridge
            ))),
            None => Ok(()),
        }
    }

    fn define(&self, definition: NetworkDefinition) -> Result<NetworkInfo, Failure> {
        Networks::define(self, definition)
    }

    fn list(&self) -> Result<Vec<NetworkInfo>, Failure> {
        Ok(Networks::list(self))
    }

    fn info(&self, name: &str) -> Result<NetworkInfo, Failure> {
        Networks::info(self, name)
    }

    fn undefine(&self, name: &str) -> Result<(), Failure> {
        Networks::undefine(self, name)
    }

    fn start(&self, name: &str) -> Result<NetworkInfo, Failure> {
        Networks::start(self, name)
    }

    fn stop(&self, name: &str) -> Result<NetworkInfo, Failure> {
        Networks::stop(self, name)
    }

    fn set_autostart(&self, name: &str, enabled: bool) -> Result<NetworkInfo, Failure> {
        Networks::set_autostart(self, name, enabled)
    }
}

async fn leases(
    State(networks): State<Arc<Networks>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    blocking(StatusCode::OK, move || networks.leases(&name)).await
}
