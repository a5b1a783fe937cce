//! What the daemon and its API ask about the VMs: the list and details, who uses a disk or
//! a TAP name, the resolved configuration of a definition, counts, and what monitoring
//! needs of a running VM.
//!
//! Threading: reads under the VM table's lock, held for a few instructions.

use std::path::Path;

use api::daemon_api::{DomainState, VmDefinition, VmDetails, VmSummary};
use api::VmConfig;

use crate::failure::Failure;

use super::{not_running, Supervisor};

impl Supervisor {
    pub fn list(&self) -> Vec<VmSummary> {
        self.lock()
            .entries()
            .values()
            .map(|e| VmSummary {
                name: e.definition.name.clone(),
                state: e.record.state,
                autostart: e.definition.autostart,
                cpus: e.current().config.cpus,
                memory: e.current().config.memory,
            })
            .collect()
    }

    pub fn details(&self, name: &str) -> Result<VmDetails, Failure> {
        let vms = self.lock();
        let e = vms.get(name)?;
        Ok(VmDetails {
            definition: e.current().clone(),
            state: e.record.state,
            pid: e.record.runtime.as_ref().map(|r| r.record.pid),
            reason: e.record.reason.clone(),
            console_log: self.store.console_log(name),
            console_socket: e
                .record
                .runtime
                .as_ref()
                .map(|r| r.files.console_socket.clone()),
            warnings: self.nameless_nics(e.current()),
            pending_definition: e.pending().cloned(),
        })
    }

    /// The VM whose NIC names the TAP device `tap`, if any.
    pub fn vm_naming_tap(&self, tap: &str) -> Option<String> {
        self.lock()
            .entries()
            .values()
            .find(|e| {
                e.definitions()
                    .flat_map(|d| d.config.nets.iter())
                    .any(|n| n.tap() == Some(tap))
            })
            .map(|e| e.definition.name.clone())
    }

    /// Whether `disk` is the image at `path`.
    pub(super) fn disk_is(&self, disk: &api::DiskConfig, path: &Path) -> bool {
        match &disk.source {
            api::DiskSource::Path(own) => own == path,
            api::DiskSource::Volume(_) => disk.volume_ref().is_some_and(|(pool, volume)| {
                self.pools.volume_location(pool, volume).as_deref() == Some(path)
            }),
        }
    }

    /// The VM that has `path` as a disk (a file or a volume), if any.
    pub fn vm_using(&self, path: &Path) -> Option<String> {
        self.lock()
            .entries()
            .values()
            .find(|e| {
                e.definitions()
                    .flat_map(|d| d.config.disks.iter())
                    .any(|d| self.disk_is(d, path))
            })
            .map(|e| e.definition.name.clone())
    }

    /// A VM that runs or is being started with `path` as a disk (in any mode), if any: its
    /// file must not be replaced or its format changed under it.
    pub fn vm_running_with(&self, path: &Path) -> Option<String> {
        self.lock()
            .entries()
            .values()
            .filter(|e| e.active || e.record.busy == Some("start"))
            .find(|e| {
                e.current()
                    .config
                    .disks
                    .iter()
                    .any(|d| self.disk_is(d, path))
            })
            .map(|e| e.definition.name.clone())
    }

    /// The running VM that may write `path`, if any.
    pub fn vm_writing(&self, path: &Path) -> Option<String> {
        self.lock()
            .entries()
            .values()
            .filter(|e| e.active)
            .find(|e| {
                e.current()
                    .config
                    .disks
                    .iter()
                    .any(|d| !d.readonly && self.disk_is(d, path))
            })
            .map(|e| e.definition.name.clone())
    }

    /// The VMM configuration of `definition`, its volumes resolved to their paths and
    /// recorded formats; a `path` disk without a format (an old definition) is refused.
    pub(super) fn resolve(&self, definition: &VmDefinition) -> Result<VmConfig, String> {
        if let Some(path) = definition.disks_without_format().next() {
            return Err(format!(
                "the disk {} has no format, and Ferro does not guess one: give that disk \
                 format = \"raw\" or \"qcow2\" in the VM's definition (ferro vm edit, or \
                 ferro vm define)",
                path.display()
            ));
        }
        definition.resolved_config(|pool, volume| {
            self.pools
                .volume_for_vm(pool, volume)
                .map_err(|e| format!("disk volume {pool}/{volume}: {}", e.message))
        })
    }

    pub fn counts(&self) -> (u32, u32) {
        let vms = self.lock();
        let vms = vms.entries();
        let running = vms.values().filter(|e| e.active).count();
        (running as u32, vms.len() as u32)
    }

    /// The stall report of a running VM, from its VMM.
    pub async fn diagnostics(
        &self,
        name: &str,
    ) -> Result<api::diagnostics::VmDiagnostics, Failure> {
        let vm = self.process_of(name)?;
        super::vmm::vmm_diagnostics(&vm.api_socket).await
    }

    /// What monitoring needs of a running VM.
    pub fn process_of(&self, name: &str) -> Result<RunningVm, Failure> {
        self.with_entry(name, |e| {
            let runtime = e
                .record
                .runtime
                .as_ref()
                .ok_or_else(|| not_running(name, e.record.state))?;
            Ok(RunningVm {
                pid: runtime.record.pid,
                vcpus: e.current().config.cpus,
                api_socket: runtime.files.api_socket.clone(),
                state: e.record.state,
                memory_bytes: e.current().config.memory.0,
            })
        })
    }
}

/// What monitoring needs to know of a running VM.
#[derive(Debug, Clone)]
pub struct RunningVm {
    pub pid: u32,
    pub vcpus: u32,
    pub api_socket: std::path::PathBuf,
    pub state: DomainState,
    pub memory_bytes: u64,
}
