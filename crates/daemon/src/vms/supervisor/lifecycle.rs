//! A VM's life outside the power operations: starting its VMM (volumes resolved, TAP devices
//! attached, the VMM's API awaited), watching it end (a pidfd) and what follows (state,
//! reason, TAP devices removed, a pending definition taken), adopting the VMMs that outlived
//! the previous daemon, and autostart.
//!
//! Threading: one task per start and per watched VMM on the daemon's runtime; blocking work
//! (spawning, netlink, files) on its blocking pool.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::daemon_api::{DomainState, VmDefinition, VmDetails};
use api::vmm_api::ExitReport;
use api::{VmConfig, VmState};
use tokio::io::unix::AsyncFd;

use crate::failure::{chain, Failure};
use crate::fs::write_atomic;
use crate::networks::NetworkNic;
use crate::vms::process::{self, ProcessRecord, VmmFiles};

use super::vmm::vmm_info;
use super::{Runtime, Supervisor, VmEntry, VmTable, START_TIMEOUT};

impl Supervisor {
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmDetails, Failure> {
        let _busy = self.begin(name, "start")?;
        let definition = self.lock().inactive(name)?.definition.clone();
        {
            // VMs that run or are being started (marked before this check, so of two starts
            // at once at least one sees the other).
            let vms = self.lock();
            let running = vms
                .entries()
                .values()
                .filter(|e| e.active || e.record.busy == Some("start"));
            self.check_nic_claims(&definition, running)
                .map_err(|e| Failure::conflict(format!("cannot start VM {name}: {e}")))?;
        }
        for warning in self.nameless_nics(&definition) {
            tracing::warn!("VM {name}: {warning}");
        }
        let config = self
            .resolve(&definition)
            .map_err(|e| Failure::conflict(format!("cannot start VM {name}: {e}")))?;
        // A file that is missing is the definition's fault, not the VM's state.
        self.check_files(&config)
            .map_err(|e| Failure::invalid(format!("cannot start VM {name}: {e}")))?;
        let files = VmmFiles::new(self.store.run_dir(name));
        let _ = std::fs::remove_dir_all(&files.dir);
        // Only the daemon's user reaches the VMM's sockets.
        std::fs::create_dir_all(&files.dir)
            .and_then(|()| {
                std::fs::set_permissions(&files.dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| {
                Failure::internal(format!("cannot create {}: {e}", files.dir.display()))
            })?;
        save_running_definition(&files, &definition);
        process::write_vm_config(&config, &files).map_err(|e| {
            Failure::internal(format!("cannot write {}: {e}", files.config.display()))
        })?;
        let args = process::vmm_args(&files, &self.store.console_log(name));
        let nics = network_nics(&definition, false);
        let networks = self.networks.clone();
        let vm = name.to_string();
        tokio::task::spawn_blocking(move || networks.attach(&vm, &nics))
            .await
            .map_err(|e| Failure::internal(e.to_string()))??;
        let pid = match process::spawn_vmm(&self.ferro, &args, &files) {
            Ok(pid) => pid,
            Err(e) => {
                self.networks.detach(name);
                return Err(Failure::internal(format!(
                    "cannot run {}: {e}",
                    self.ferro.display()
                )));
            }
        };
        let record = ProcessRecord {
            pid,
            start_time: process::start_time(pid).unwrap_or(0),
        };
        let saved = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .map_err(|e| e.to_string())
            .and_then(|bytes| write_atomic(&files.record, &bytes).map_err(|e| chain(&e)));
        if let Err(e) = saved {
            let _ = process::kill(pid, libc::SIGKILL);
            self.networks.detach(name);
            return Err(Failure::internal(format!("cannot record the VMM: {e}")));
        }
        let runtime = Runtime { record, files };
        if let Ok(entry) = self.lock().get_mut(name) {
            entry.record.state = DomainState::Starting;
            entry.record.reason = None;
            entry.set_runtime(Some(runtime.clone()));
        }
        self.watch(name, &runtime);
        match self.wait_for_api(name, &runtime).await {
            Ok(()) => {
                self.set_state(name, DomainState::Running, None);
                self.emit(name, "started", Some(format!("pid {pid}")));
                drop(_busy);
                self.details(name)
            }
            Err(e) => {
                let _ = process::kill(pid, libc::SIGKILL);
                Err(e)
            }
        }
    }

    /// Waits until the new VMM answers on its API, or ends.
    pub(super) async fn wait_for_api(&self, name: &str, runtime: &Runtime) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self
                .lock()
                .get(name)
                .ok()
                .and_then(|e| e.record.runtime.as_ref())
                .is_none()
            {
                let reason = self
                    .lock()
                    .get(name)
                    .ok()
                    .and_then(|e| e.record.reason.clone());
                return Err(Failure::internal(format!(
                    "VM {name} failed to start: {}",
                    reason.unwrap_or_else(|| "the VMM ended".into())
                )));
            }
            if let Ok(info) = vmm_info(&runtime.files.api_socket).await {
                if info.state == VmState::Running {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Failure::internal(format!(
                    "VM {name}: the VMM did not answer within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Follows the VMM until it ends, then records how.
    pub(super) fn watch(self: &Arc<Self>, name: &str, runtime: &Runtime) {
        let supervisor = self.clone();
        let name = name.to_string();
        let runtime = runtime.clone();
        tokio::spawn(async move {
            match process::pidfd(runtime.record.pid).and_then(watch_fd) {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(e) => {
                    tracing::warn!(
                        "{name}: cannot watch pid {}: {e}; polling",
                        runtime.record.pid
                    );
                    while process::is_alive(&runtime.record) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            // Reaping, files, netlink and nft: blocking work, off the runtime's threads.
            let ended = supervisor.clone();
            let (vm, gone) = (name.clone(), runtime.clone());
            let _ = tokio::task::spawn_blocking(move || ended.vmm_ended(&vm, &gone)).await;
            // A guest that powered off to reboot starts again, from a task of its own (a start
            // watches its new VMM from here).
            if supervisor.restart_due(&name) {
                let _ = supervisor.restarts.send(name);
            }
        });
    }

    /// Records how a VMM ended and cleans its runtime directory up.
    pub(super) fn vmm_ended(&self, name: &str, runtime: &Runtime) {
        let status = process::reap(runtime.record.pid);
        let report: Option<ExitReport> = std::fs::read(&runtime.files.exit_report)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let (state, reason) = match (&report, status) {
            (Some(r), _) if r.outcome == "error" => (
                DomainState::Crashed,
                r.error
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", r.code)),
            ),
            (Some(r), _) => (DomainState::Shutoff, r.outcome.clone()),
            (None, Some(code)) if code > 128 => (
                DomainState::Crashed,
                format!("the VMM was killed by signal {}", code - 128),
            ),
            (None, _) => (DomainState::Crashed, last_error(&runtime.files.stderr)),
        };
        // Keep the VMM's log (and its rotated files) for the post-mortem; the rest goes.
        let _ = guest_log::move_log(
            &runtime.files.stderr,
            &self.store.console_log(name).with_extension("vmm.log"),
            guest_log::LogLimits::DEFAULT.backups,
        );
        let _ = std::fs::remove_dir_all(&runtime.files.dir);
        let ours = |vms: &VmTable| {
            vms.get(name)
                .ok()
                .and_then(|e| e.record.runtime.as_ref())
                .map(|r| r.record)
                == Some(runtime.record)
        };
        if !ours(&self.lock()) {
            return; // undefined, or a newer VMM of the same VM
        }
        // The TAP devices go while the runtime is still recorded, so a new start of this VM
        // (same TAP names) is refused as running until they are gone; and without the VM
        // table's lock, which the whole API needs, held over netlink and nft.
        self.networks.detach(name);
        let mut vms = self.lock();
        if !ours(&vms) {
            return;
        }
        let Ok(entry) = vms.get_mut(name) else {
            return;
        };
        // A VMM ended by destroy is said to be destroyed from the moment it is gone, so that a
        // shutdown waiting on it meanwhile sees why.
        let (state, reason) = match entry.record.busy {
            Some("destroy") => (DomainState::Shutoff, "destroyed".to_string()),
            _ => (state, reason),
        };
        // A definition changed while the VM ran takes effect now.
        entry.set_runtime(None);
        entry.record.state = state;
        entry.record.reason = Some(reason.clone());
        drop(vms);
        let kind = if state == DomainState::Crashed {
            "crashed"
        } else {
            "stopped"
        };
        self.emit(name, kind, Some(reason));
    }

    /// Finds the VMMs a previous daemon started and manages them again.
    pub async fn adopt(self: &Arc<Self>) {
        for name in self.store.run_dirs() {
            let files = VmmFiles::new(self.store.run_dir(&name));
            let record: Option<ProcessRecord> = std::fs::read(&files.record)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let known = self.lock().entries().contains_key(&name);
            let runtime = record.map(|record| Runtime {
                record,
                files: files.clone(),
            });
            match runtime {
                Some(runtime) if known && process::is_alive(&runtime.record) => {
                    let state = match vmm_info(&files.api_socket).await {
                        Ok(info) if info.state == VmState::Paused => DomainState::Paused,
                        _ => DomainState::Running,
                    };
                    if let Ok(entry) = self.lock().get_mut(&name) {
                        entry.record.state = state;
                        entry.set_runtime(Some(runtime.clone()));
                        adopt_running_definition(entry, &files);
                        self.networks
                            .reattach(&name, &network_nics(entry.current(), true));
                    }
                    tracing::info!("{name}: found its VMM (pid {}) again", runtime.record.pid);
                    self.watch(&name, &runtime);
                }
                Some(runtime) if known => {
                    // It ended while no daemon was watching.
                    if let Ok(entry) = self.lock().get_mut(&name) {
                        entry.set_runtime(Some(runtime.clone()));
                    }
                    self.vmm_ended(&name, &runtime);
                }
                _ => {
                    let _ = std::fs::remove_dir_all(&files.dir);
                }
            }
        }
        let running: Vec<String> = self
            .lock()
            .entries()
            .values()
            .filter(|e| e.active)
            .map(|e| e.definition.name.clone())
            .collect();
        let networks = self.networks.clone();
        let _ = tokio::task::spawn_blocking(move || networks.forget_all_but(&running)).await;
    }

    /// Starts the VMs marked autostart that are not running.
    pub async fn autostart(self: &Arc<Self>) {
        let names: Vec<String> = self
            .lock()
            .entries()
            .values()
            .filter(|e| e.definition.autostart && !e.active)
            .map(|e| e.definition.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.start(&name).await {
                tracing::error!("autostart of {name} failed: {}", e.message);
            }
        }
    }
}

/// The NICs of `definition` that are on virtual networks, with their TAP devices (the names
/// daemons before VM ids gave them, when `legacy`).
pub(super) fn network_nics(definition: &VmDefinition, legacy: bool) -> Vec<NetworkNic> {
    let tap = |index| match (legacy, definition.id) {
        (false, Some(id)) => Some(api::daemon_api::network_tap_name(id, index)),
        (false, None) => None,
        (true, _) => Some(api::daemon_api::legacy_network_tap_name(
            &definition.name,
            index,
        )),
    };
    definition
        .config
        .nets
        .iter()
        .enumerate()
        .filter_map(|(index, nic)| {
            Some(NetworkNic {
                network: nic.network()?.to_string(),
                mac: nic.mac?,
                tap: tap(index)?,
                dns_name: definition.dns_name().map(str::to_string),
            })
        })
        .collect()
}

/// Where the definition a VMM was started with is kept while it runs.
pub(super) fn running_definition_path(files: &VmmFiles) -> std::path::PathBuf {
    files.dir.join("definition.json")
}

/// Keeps the definition the VMM starts with, so a daemon that restarts while a changed
/// definition is pending knows which one runs. Without it (a write error, or a VMM started by
/// an older daemon) the stored definition is taken as the running one.
pub(super) fn save_running_definition(files: &VmmFiles, definition: &VmDefinition) {
    let saved = serde_json::to_vec(definition)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            write_atomic(&running_definition_path(files), &bytes).map_err(|e| chain(&e))
        });
    if let Err(e) = saved {
        tracing::warn!("VM {}: {e}", definition.name);
    }
}

/// Makes an adopted VM's definition in effect the one its VMM was started with, the stored
/// one pending when they differ.
pub(super) fn adopt_running_definition(entry: &mut VmEntry, files: &VmmFiles) {
    let running: Option<VmDefinition> = std::fs::read(running_definition_path(files))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    entry.record.running = running.filter(|r| *r != entry.definition);
}

/// Registers a pidfd with the runtime.
pub(super) fn watch_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for the
    // AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Checks that the files a VM configuration names exist now.
impl Supervisor {
    /// Checks that the files `config` names exist and lie where VM files may be
    /// (`file_dirs`: the daemon's directories or a pool's).
    pub(super) fn check_files(&self, config: &VmConfig) -> Result<(), String> {
        let mut files = vec![("kernel", config.kernel.as_path())];
        if let Some(initrd) = &config.initrd {
            files.push(("initrd", initrd));
        }
        for disk in &config.disks {
            files.extend(disk.path().map(|path| ("disk", path)));
            files.extend(
                disk.backing_dir
                    .as_deref()
                    .map(|dir| ("disk's backing_dir", dir)),
            );
        }
        let pool_dirs = self.pools.paths();
        for (what, path) in files {
            if let Err(e) = std::fs::metadata(path) {
                return Err(format!("the {what} {}: {e}", path.display()));
            }
            self.file_dirs.check(what, path, &pool_dirs)?;
        }
        Ok(())
    }
}

/// The last error line the VMM printed, or a generic reason.
pub(super) fn last_error(stderr: &Path) -> String {
    let text = std::fs::read_to_string(stderr).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("error"))
        .map(|l| l.trim_start_matches("ferro: error: ").to_string())
        .unwrap_or_else(|| "the VMM ended without saying why (killed?)".into())
}
