//! The VMs the daemon manages: their definitions, states and VMM processes. Every lifecycle
//! operation is here: define, undefine, start, shutdown, destroy, reboot, suspend, resume,
//! autostart, and what happens when a VMM ends (expected or not) or is found again after a
//! daemon restart.
//!
//! Each VM has an id, unique among the defined VMs, given at define time (or when a definition
//! older than ids is loaded) and stored in its definition; its TAP devices on networks are
//! named after it. A NIC's own `tap =` may not name what belongs to others: the daemon's
//! network TAP names, a network's bridge or TAP device, or another VM's TAP (checked at define
//! against every definition, at start against the VMs that run or are starting).
//!
//! Defining an existing VM again updates its definition (id and MACs kept): a VM that is not
//! running takes it at once, a running one keeps its VMM's definition and holds the new one
//! as pending until its VMM ends (the runtime directory keeps the running definition, so a
//! daemon restart tells them apart). The power operations are in [`power`].

mod power;

pub use power::Control;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::daemon_api::{DomainState, Event, VmDefinition, VmDetails, VmSummary};
use api::net_api::NetworkMode;
use api::vmm_api::{paths as vmm_paths, ExitReport, VmInfo};
use api::{VmConfig, VmState};
use http_unix::Client;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::failure::{chain, Failure, Kind};
use crate::fs::write_atomic;
use crate::networks::{NetworkNic, Networks};
use crate::pools::Pools;
use crate::vms::process::{self, ProcessRecord, VmmFiles};
use crate::vms::store::Store;

/// How long a VMM may take to answer on its API socket after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default wait for a graceful shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long destroy waits for a VMM to end after asking it, before SIGKILL.
const DESTROY_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one request to a VMM's API.
const VMM_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VMM.
#[derive(Debug, Clone)]
struct Runtime {
    record: ProcessRecord,
    files: VmmFiles,
}

#[derive(Debug)]
struct VmEntry {
    definition: VmDefinition,
    state: DomainState,
    reason: Option<String>,
    runtime: Option<Runtime>,
    /// The operation in progress, if any.
    busy: Option<&'static str>,
    /// The stored definition, when it differs from the running `definition`.
    pending: Option<VmDefinition>,
    /// Start the VM again once its guest powers off (an ACPI reboot in progress).
    restart: bool,
}

impl VmEntry {
    fn new(definition: VmDefinition) -> Self {
        VmEntry {
            definition,
            state: DomainState::Shutoff,
            reason: None,
            runtime: None,
            busy: None,
            pending: None,
            restart: false,
        }
    }

    /// The definition the next start uses.
    fn next_definition(&self) -> &VmDefinition {
        self.pending.as_ref().unwrap_or(&self.definition)
    }

    /// Every definition this VM has now: the running one and the pending one.
    fn definitions(&self) -> impl Iterator<Item = &VmDefinition> {
        std::iter::once(&self.definition).chain(self.pending.iter())
    }
}

/// The daemon's VMs.
#[derive(Debug)]
pub struct Supervisor {
    store: Store,
    pools: Arc<Pools>,
    networks: Arc<Networks>,
    ferro: std::path::PathBuf,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    events: broadcast::Sender<Event>,
    /// VMs whose guest powered off to reboot, for [`Supervisor::run_restarts`] to start again.
    restarts: tokio::sync::mpsc::UnboundedSender<String>,
    restart_queue: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

/// Clears an entry's busy mark when the operation ends, however it ends.
struct Busy<'a> {
    supervisor: &'a Supervisor,
    name: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.supervisor.lock().get_mut(&self.name) {
            entry.busy = None;
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Supervisor {
    /// Loads the definitions and adopts the VMMs that outlived the previous daemon.
    pub fn new(
        store: Store,
        ferro: std::path::PathBuf,
        pools: Arc<Pools>,
        networks: Arc<Networks>,
    ) -> Arc<Self> {
        let (mut definitions, errors) = store.load_definitions();
        for error in errors {
            tracing::error!("skipping a definition: {}", chain(&error));
        }
        give_ids(&store, &mut definitions, networks.recorded_tap_ids());
        // What definitions say of their volumes' formats, before anything probes a volume.
        for definition in &definitions {
            for disk in &definition.disks {
                if let (Some((pool, volume)), Some(format)) = (disk.volume_ref(), &disk.format) {
                    pools.seed_format(pool, volume, format);
                }
            }
        }
        warn_of_shared_taps(&definitions);
        let vms = definitions
            .into_iter()
            .map(|definition| (definition.name.clone(), VmEntry::new(definition)))
            .collect();
        let (events, _) = broadcast::channel(256);
        let (restarts, restart_queue) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Supervisor {
            store,
            pools,
            networks,
            ferro,
            vms: Mutex::new(vms),
            events,
            restarts,
            restart_queue: Mutex::new(Some(restart_queue)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, VmEntry>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, vm: &str, kind: &str, detail: Option<String>) {
        tracing::info!(
            "{vm}: {kind}{}",
            detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        );
        let _ = self.events.send(Event {
            time: now(),
            vm: vm.to_string(),
            kind: kind.to_string(),
            detail,
        });
    }

    /// Marks VM `name` busy with `operation`, or says why it cannot be.
    fn begin(&self, name: &str, operation: &'static str) -> Result<Busy<'_>, Failure> {
        let mut vms = self.lock();
        let entry = vms.get_mut(name).ok_or_else(|| Failure::no_vm(name))?;
        if let Some(other) = entry.busy {
            return Err(Failure::conflict(format!(
                "VM {name} is busy ({other} in progress); try again"
            )));
        }
        entry.busy = Some(operation);
        Ok(Busy {
            supervisor: self,
            name: name.to_string(),
        })
    }

    /// Runs `check` on the entry of `name` (404 if there is none).
    fn with_entry<T>(
        &self,
        name: &str,
        check: impl FnOnce(&VmEntry) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let vms = self.lock();
        check(vms.get(name).ok_or_else(|| Failure::no_vm(name))?)
    }

    fn set_state(&self, name: &str, state: DomainState, reason: Option<String>) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.state = state;
            entry.reason = reason;
        }
    }

    fn state(&self, name: &str) -> Option<DomainState> {
        self.lock().get(name).map(|e| e.state)
    }

    fn runtime(&self, name: &str) -> Result<Runtime, Failure> {
        self.with_entry(name, |entry| {
            entry
                .runtime
                .clone()
                .ok_or_else(|| not_running(name, entry.state))
        })
    }

    // ----- queries -----

    pub fn list(&self) -> Vec<VmSummary> {
        self.lock()
            .values()
            .map(|e| VmSummary {
                name: e.definition.name.clone(),
                state: e.state,
                autostart: e.definition.autostart,
                cpus: e.definition.cpus,
                memory: e.definition.memory,
            })
            .collect()
    }

    pub fn details(&self, name: &str) -> Result<VmDetails, Failure> {
        let vms = self.lock();
        let e = vms.get(name).ok_or_else(|| Failure::no_vm(name))?;
        Ok(VmDetails {
            definition: e.definition.clone(),
            state: e.state,
            pid: e.runtime.as_ref().map(|r| r.record.pid),
            reason: e.reason.clone(),
            console_log: self.store.console_log(name),
            console_socket: e.runtime.as_ref().map(|r| r.files.console_socket.clone()),
            warnings: self.nameless_nics(&e.definition),
            pending_definition: e.pending.clone(),
        })
    }

    /// One line for each NIC of `definition` on a nat or isolated network where the VM gets an
    /// address but no DNS name, its name not being one (definitions from before names were
    /// checked).
    fn nameless_nics(&self, definition: &VmDefinition) -> Vec<String> {
        if definition.dns_name().is_some() {
            return Vec::new();
        }
        definition
            .nets
            .iter()
            .enumerate()
            .filter_map(|(index, nic)| {
                let network = nic.network.as_deref()?;
                let mode = self.networks.mode_of(network)?;
                (mode != NetworkMode::Bridge).then(|| {
                    format!(
                        "NIC {index} on network {network}: the VM's name {:?} is not a DNS name \
                         (letters, digits, inner '-', at most 63, not all digits), so DHCP gives \
                         it an address but DNS no name",
                        definition.name
                    )
                })
            })
            .collect()
    }

    /// Refuses NICs that would take what belongs to others (see the module's text); `others`
    /// are the VMs whose `tap =` devices count as taken.
    fn check_nic_claims<'a>(
        &self,
        definition: &VmDefinition,
        others: impl Iterator<Item = &'a VmEntry>,
    ) -> Result<(), String> {
        let taken: BTreeMap<&str, &str> = others
            .filter(|other| other.definition.name != definition.name)
            .flat_map(|other| {
                let name = other.definition.name.as_str();
                other
                    .definitions()
                    .flat_map(|definition| definition.nets.iter())
                    .filter_map(move |nic| Some((nic.tap.as_deref()?, name)))
            })
            .collect();
        for tap in definition.nets.iter().filter_map(|nic| nic.tap.as_deref()) {
            api::daemon_api::check_own_tap_name(tap)?;
            if let Some(owner) = taken.get(tap) {
                return Err(format!(
                    "the TAP device {tap} belongs to VM {owner}; give this NIC another tap"
                ));
            }
            if let Some(claim) = self.networks.claim_on(tap) {
                return Err(format!("{tap} is {claim}; give this NIC another tap"));
            }
        }
        Ok(())
    }

    /// The VM whose NIC names the TAP device `tap`, if any.
    pub fn vm_naming_tap(&self, tap: &str) -> Option<String> {
        self.lock()
            .values()
            .find(|e| {
                e.definitions()
                    .flat_map(|d| d.nets.iter())
                    .any(|n| n.tap.as_deref() == Some(tap))
            })
            .map(|e| e.definition.name.clone())
    }

    /// Whether `disk` is the image at `path`.
    fn disk_is(&self, disk: &api::daemon_api::DefinitionDisk, path: &Path) -> bool {
        match (&disk.path, disk.volume_ref()) {
            (Some(own), _) => own == path,
            (None, Some((pool, volume))) => {
                self.pools.volume_location(pool, volume).as_deref() == Some(path)
            }
            (None, None) => false,
        }
    }

    /// The VM that has `path` as a disk (a file or a volume), if any.
    pub fn vm_using(&self, path: &Path) -> Option<String> {
        self.lock()
            .values()
            .find(|e| {
                e.definitions()
                    .flat_map(|d| d.disks.iter())
                    .any(|d| self.disk_is(d, path))
            })
            .map(|e| e.definition.name.clone())
    }

    /// A VM that runs or is being started with `path` as a disk (in any mode), if any: its
    /// file must not be replaced or its format changed under it.
    pub fn vm_running_with(&self, path: &Path) -> Option<String> {
        self.lock()
            .values()
            .filter(|e| e.runtime.is_some() || e.busy == Some("start"))
            .find(|e| e.definition.disks.iter().any(|d| self.disk_is(d, path)))
            .map(|e| e.definition.name.clone())
    }

    /// The running VM that may write `path`, if any.
    pub fn vm_writing(&self, path: &Path) -> Option<String> {
        self.lock()
            .values()
            .filter(|e| e.runtime.is_some())
            .find(|e| {
                e.definition
                    .disks
                    .iter()
                    .any(|d| !d.readonly && self.disk_is(d, path))
            })
            .map(|e| e.definition.name.clone())
    }

    /// The VMM configuration of `definition`, its volumes resolved to their paths and
    /// recorded formats; a `path` disk without a format (an old definition) is refused.
    fn resolve(&self, definition: &VmDefinition) -> Result<VmConfig, String> {
        if let Some(path) = definition.disks_without_format().next() {
            return Err(format!(
                "the disk {} has no format, and Ferro does not guess one: give that disk \
                 format = \"raw\" or \"qcow2\" in the VM's definition (ferro vm edit, or \
                 ferro vm define)",
                path.display()
            ));
        }
        definition.vm_config(|pool, volume| {
            self.pools
                .volume_for_vm(pool, volume)
                .map_err(|e| format!("disk volume {pool}/{volume}: {}", e.message))
        })
    }

    pub fn counts(&self) -> (u32, u32) {
        let vms = self.lock();
        let running = vms.values().filter(|e| e.runtime.is_some()).count();
        (running as u32, vms.len() as u32)
    }

    /// What monitoring needs of a running VM.
    pub fn process_of(&self, name: &str) -> Result<RunningVm, Failure> {
        self.with_entry(name, |e| {
            let runtime = e
                .runtime
                .as_ref()
                .ok_or_else(|| not_running(name, e.state))?;
            Ok(RunningVm {
                pid: runtime.record.pid,
                vcpus: e.definition.cpus,
                api_socket: runtime.files.api_socket.clone(),
                state: e.state,
                memory_bytes: e.definition.memory.0,
            })
        })
    }

    // ----- definitions -----

    /// Defines a new VM, or updates an existing one's definition (see the module's text);
    /// the answer says which (`true`: created).
    pub fn define(&self, mut definition: VmDefinition) -> Result<(VmDetails, bool), Failure> {
        definition.validate().map_err(Failure::invalid)?;
        // Ids are the daemon's to give.
        definition.id = None;
        let name = definition.name.clone();
        let exists = self.lock().contains_key(&name);
        // An update waits for no other operation on the VM (a start would race it).
        let busy = exists.then(|| self.begin(&name, "define")).transpose()?;
        let previous = busy
            .as_ref()
            .and_then(|_| self.lock().get(&name).map(|e| e.next_definition().clone()));
        self.prepare_nics(&mut definition, previous.as_ref())?;
        // The files it names exist (the id, not given yet, does not matter here).
        let placeholder = VmDefinition {
            id: Some(0),
            ..definition.clone()
        };
        self.resolve(&placeholder)
            .and_then(|config| check_files(&config))
            .map_err(Failure::invalid)?;
        let created = match previous {
            Some(previous) => {
                definition.id = previous.id;
                self.update_definition(definition)?;
                false
            }
            None => {
                self.add_definition(definition)?;
                true
            }
        };
        drop(busy);
        let detail = (!created).then(|| "updated".to_string());
        self.emit(&name, "defined", detail);
        Ok((self.details(&name)?, created))
    }

    /// Checks the NICs' networks and gives each NIC without a MAC one: the MAC of the NIC at
    /// the same place in `previous` (an update keeps the guest's addresses), or a random one.
    fn prepare_nics(
        &self,
        definition: &mut VmDefinition,
        previous: Option<&VmDefinition>,
    ) -> Result<(), Failure> {
        let dns_name = definition.dns_name().map(str::to_string);
        for (index, nic) in definition.nets.iter_mut().enumerate() {
            if let Some(network) = &nic.network {
                let mode = self.networks.mode_of(network).ok_or_else(|| {
                    Failure::invalid(format!("there is no network named {network:?}"))
                })?;
                if mode != NetworkMode::Bridge && dns_name.is_none() {
                    return Err(Failure::invalid(format!(
                        "the VM name {:?} cannot be its DNS name on network {network}: use letters, \
                         digits and inner '-' (at most 63, not all digits)",
                        definition.name
                    )));
                }
            }
            // A fixed MAC keeps the guest's DHCP lease and DNS name across starts.
            let kept = previous
                .and_then(|p| p.nets.get(index))
                .and_then(|old| old.mac);
            if nic.mac.is_none() {
                nic.mac = Some(kept.unwrap_or_else(api::net::MacAddress::random));
            }
        }
        Ok(())
    }

    /// Stores a new VM's definition with a fresh id.
    fn add_definition(&self, mut definition: VmDefinition) -> Result<(), Failure> {
        let name = definition.name.clone();
        let mut vms = self.lock();
        if vms.contains_key(&name) {
            return Err(Failure::conflict(format!(
                "a VM named {name} was defined at the same time; try again"
            )));
        }
        self.check_nic_claims(&definition, vms.values())
            .map_err(Failure::conflict)?;
        // Ids whose TAP names are still recorded (a device that could not be removed)
        // are not given again.
        let mut used: BTreeSet<u32> = self.networks.recorded_tap_ids();
        used.extend(vms.values().filter_map(|e| e.definition.id));
        definition.id = Some(
            free_id(&used)
                .ok_or_else(|| Failure::conflict("every VM id is taken; undefine a VM first"))?,
        );
        self.store
            .save_definition(&definition)
            .map_err(|e| Failure::internal(chain(&e)))?;
        vms.insert(name, VmEntry::new(definition));
        Ok(())
    }

    /// Stores an existing VM's new definition: in effect at once when the VM is not running,
    /// pending until its VMM ends when it is.
    fn update_definition(&self, definition: VmDefinition) -> Result<(), Failure> {
        let name = definition.name.clone();
        let mut vms = self.lock();
        self.check_nic_claims(&definition, vms.values())
            .map_err(Failure::conflict)?;
        let entry = vms.get_mut(&name).ok_or_else(|| Failure::no_vm(&name))?;
        self.store
            .save_definition(&definition)
            .map_err(|e| Failure::internal(chain(&e)))?;
        if entry.runtime.is_none() {
            entry.definition = definition;
            entry.pending = None;
        } else {
            entry.pending = (definition != entry.definition).then_some(definition);
        }
        Ok(())
    }

    pub fn undefine(&self, name: &str) -> Result<(), Failure> {
        let _busy = self.begin(name, "undefine")?;
        self.with_entry(name, |entry| match entry.runtime {
            Some(_) => Err(Failure::conflict(format!(
                "VM {name} is {}; destroy or shut it down first",
                entry.state
            ))),
            None => Ok(()),
        })?;
        self.store
            .remove_definition(name)
            .map_err(|e| Failure::internal(chain(&e)))?;
        drop(_busy);
        self.lock().remove(name);
        self.emit(name, "undefined", None);
        Ok(())
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<VmDetails, Failure> {
        let _busy = self.begin(name, "autostart")?;
        let mut definition = self
            .lock()
            .get(name)
            .map(|e| e.next_definition().clone())
            .ok_or_else(|| Failure::no_vm(name))?;
        definition.autostart = enabled;
        self.store
            .save_definition(&definition)
            .map_err(|e| Failure::internal(chain(&e)))?;
        if let Some(entry) = self.lock().get_mut(name) {
            entry.definition.autostart = enabled;
            if let Some(pending) = &mut entry.pending {
                pending.autostart = enabled;
            }
        }
        drop(_busy);
        self.details(name)
    }

    // ----- lifecycle -----

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmDetails, Failure> {
        let _busy = self.begin(name, "start")?;
        let definition = self.with_entry(name, |entry| match entry.runtime {
            Some(_) => Err(Failure::conflict(format!(
                "VM {name} is already {}",
                entry.state
            ))),
            None => Ok(entry.definition.clone()),
        })?;
        {
            // VMs that run or are being started (marked before this check, so of two starts
            // at once at least one sees the other).
            let vms = self.lock();
            let running = vms
                .values()
                .filter(|e| e.runtime.is_some() || e.busy == Some("start"));
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
        check_files(&config)
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
        let args = process::vmm_args(&config, &files, &self.store.console_log(name));
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
        if let Some(entry) = self.lock().get_mut(name) {
            entry.state = DomainState::Starting;
            entry.reason = None;
            entry.runtime = Some(runtime.clone());
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
    async fn wait_for_api(&self, name: &str, runtime: &Runtime) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self
                .lock()
                .get(name)
                .and_then(|e| e.runtime.as_ref())
                .is_none()
            {
                let reason = self.lock().get(name).and_then(|e| e.reason.clone());
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
    fn watch(self: &Arc<Self>, name: &str, runtime: &Runtime) {
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
    fn vmm_ended(&self, name: &str, runtime: &Runtime) {
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
        let ours = |vms: &BTreeMap<String, VmEntry>| {
            vms.get(name)
                .and_then(|e| e.runtime.as_ref())
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
        let Some(entry) = vms.get_mut(name) else {
            return;
        };
        // A VMM ended by destroy is said to be destroyed from the moment it is gone, so that a
        // shutdown waiting on it meanwhile sees why.
        let (state, reason) = match entry.busy {
            Some("destroy") => (DomainState::Shutoff, "destroyed".to_string()),
            _ => (state, reason),
        };
        entry.runtime = None;
        entry.state = state;
        entry.reason = Some(reason.clone());
        // A definition changed while the VM ran takes effect now.
        if let Some(next) = entry.pending.take() {
            entry.definition = next;
        }
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
            let known = self.lock().contains_key(&name);
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
                    if let Some(entry) = self.lock().get_mut(&name) {
                        entry.state = state;
                        entry.runtime = Some(runtime.clone());
                        adopt_running_definition(entry, &files);
                        self.networks
                            .reattach(&name, &network_nics(&entry.definition, true));
                    }
                    tracing::info!("{name}: found its VMM (pid {}) again", runtime.record.pid);
                    self.watch(&name, &runtime);
                }
                Some(runtime) if known => {
                    // It ended while no daemon was watching.
                    if let Some(entry) = self.lock().get_mut(&name) {
                        entry.runtime = Some(runtime.clone());
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
            .values()
            .filter(|e| e.runtime.is_some())
            .map(|e| e.definition.name.clone())
            .collect();
        let networks = self.networks.clone();
        let _ = tokio::task::spawn_blocking(move || networks.forget_all_but(&running)).await;
    }

    /// Starts the VMs marked autostart that are not running.
    pub async fn autostart(self: &Arc<Self>) {
        let names: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.definition.autostart && e.runtime.is_none())
            .map(|e| e.definition.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.start(&name).await {
                tracing::error!("autostart of {name} failed: {}", e.message);
            }
        }
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

/// The NICs of `definition` that are on virtual networks, with their TAP devices (the names
/// daemons before VM ids gave them, when `legacy`).
fn network_nics(definition: &VmDefinition, legacy: bool) -> Vec<NetworkNic> {
    let tap = |index| match (legacy, definition.id) {
        (false, Some(id)) => Some(api::daemon_api::network_tap_name(id, index)),
        (false, None) => None,
        (true, _) => Some(api::daemon_api::legacy_network_tap_name(
            &definition.name,
            index,
        )),
    };
    definition
        .nets
        .iter()
        .enumerate()
        .filter_map(|(index, nic)| {
            Some(NetworkNic {
                network: nic.network.clone()?,
                mac: nic.mac?,
                tap: tap(index)?,
                dns_name: definition.dns_name().map(str::to_string),
            })
        })
        .collect()
}

/// Where the definition a VMM was started with is kept while it runs.
fn running_definition_path(files: &VmmFiles) -> std::path::PathBuf {
    files.dir.join("definition.json")
}

/// Keeps the definition the VMM starts with, so a daemon that restarts while a changed
/// definition is pending knows which one runs. Without it (a write error, or a VMM started by
/// an older daemon) the stored definition is taken as the running one.
fn save_running_definition(files: &VmmFiles, definition: &VmDefinition) {
    let saved = serde_json::to_vec(definition)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            write_atomic(&running_definition_path(files), &bytes).map_err(|e| chain(&e))
        });
    if let Err(e) = saved {
        tracing::warn!("VM {}: {e}", definition.name);
    }
}

/// Makes an adopted VM's running definition the one its VMM was started with, the stored one
/// pending when they differ.
fn adopt_running_definition(entry: &mut VmEntry, files: &VmmFiles) {
    let running: Option<VmDefinition> = std::fs::read(running_definition_path(files))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    if let Some(running) = running.filter(|r| *r != entry.definition) {
        entry.pending = Some(std::mem::replace(&mut entry.definition, running));
    }
}

/// The smallest id (from 1) not in `used`.
fn free_id(used: &BTreeSet<u32>) -> Option<u32> {
    (1..=u32::MAX).find(|id| !used.contains(id))
}

/// Gives an id to each loaded definition without one (older than ids) or with one another
/// definition has (an edited file), and stores it.
fn give_ids(store: &Store, definitions: &mut [VmDefinition], recorded: BTreeSet<u32>) {
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (i, definition) in definitions.iter().enumerate() {
        match definition.id {
            Some(id) if used.insert(id) => {}
            _ => missing.push(i),
        }
    }
    // Recorded TAP names of VMs no longer defined keep their ids from new definitions.
    used.extend(recorded);
    for i in missing {
        let Some(id) = free_id(&used) else {
            tracing::error!("no VM id left for {}", definitions[i].name);
            continue;
        };
        used.insert(id);
        let definition = &mut definitions[i];
        definition.id = Some(id);
        tracing::info!("VM {} gets id {id}", definition.name);
        if let Err(e) = store.save_definition(definition) {
            tracing::error!("VM {}: cannot store its id: {}", definition.name, chain(&e));
        }
    }
}

/// Definitions from before `tap =` was checked may share a TAP device: they still load, and
/// only one of them can run at a time.
fn warn_of_shared_taps(definitions: &[VmDefinition]) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for definition in definitions {
        for tap in definition.nets.iter().filter_map(|n| n.tap.as_deref()) {
            if let Some(first) = seen.insert(tap, &definition.name) {
                tracing::warn!(
                    "VMs {first} and {} both name the TAP device {tap}: only one of them can run at a time",
                    definition.name
                );
            }
        }
    }
}

fn not_running(name: &str, state: DomainState) -> Failure {
    Failure::conflict(format!("VM {name} is not running (it is {state})"))
}

/// Registers a pidfd with the runtime.
fn watch_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for the
    // AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Checks that the files a VM configuration names exist now.
fn check_files(definition: &VmConfig) -> Result<(), String> {
    let mut files = vec![("kernel", definition.kernel.as_path())];
    if let Some(initrd) = &definition.initrd {
        files.push(("initrd", initrd));
    }
    for disk in &definition.disks {
        files.push(("disk", &disk.path));
    }
    for (what, path) in files {
        if let Err(e) = std::fs::metadata(path) {
            return Err(format!("the {what} {}: {e}", path.display()));
        }
    }
    Ok(())
}

/// The last error line the VMM printed, or a generic reason.
fn last_error(stderr: &Path) -> String {
    let text = std::fs::read_to_string(stderr).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("error"))
        .map(|l| l.trim_start_matches("ferro: error: ").to_string())
        .unwrap_or_else(|| "the VMM ended without saying why (killed?)".into())
}

async fn vmm_request(
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
async fn vmm_put(socket: &Path, path: &'static str) -> Result<(), Failure> {
    let response = vmm_request(socket, "PUT", path).await?;
    if response.status == 204 {
        return Ok(());
    }
    let message = serde_json::from_slice::<api::vmm_api::ErrorBody>(&response.body)
        .map(|b| b.error)
        .unwrap_or_else(|_| response.text());
    Err(Failure::new(
        Kind::VmmRefused(response.status),
        format!("the VMM refused: {message}"),
    ))
}

/// Counters from a VMM.
pub async fn vmm_counters(socket: &Path) -> Result<api::vmm_api::VmCounters, Failure> {
    let response = vmm_request(socket, "GET", vmm_paths::COUNTERS).await?;
    serde_json::from_slice(&response.body)
        .map_err(|e| Failure::internal(format!("bad answer from the VMM: {e}")))
}
