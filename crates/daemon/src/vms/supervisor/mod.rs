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
//! daemon restart tells them apart).
//!
//! Here: the VM table and what every operation shares (one operation per VM at a time, states,
//! events). [`definitions`], [`lifecycle`] (start, VMM ends, adoption, autostart), [`power`],
//! [`queries`] and [`vmm`] (requests to a VMM's API) hold the rest.
//!
//! Threading: one mutex over the VM table, held for a few instructions at a time, never
//! across a wait; operations run on the daemon's runtime, blocking work on its blocking pool.

mod definitions;
mod lifecycle;
mod power;
mod queries;
mod vmm;

pub use power::Control;
pub use vmm::vmm_counters;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::daemon_api::{DomainState, Event, VmDefinition};
use tokio::sync::broadcast;

use crate::failure::Failure;
use crate::fs::DirError;
use crate::networks::Networks;
use crate::pools::Pools;
use crate::registry::{Entry, Registry};
use crate::vms::file_dirs::FileDirs;
use crate::vms::process::{ProcessRecord, VmmFiles};
use crate::vms::store::Store;
use definitions::{give_ids, warn_of_shared_taps};

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

/// What the daemon keeps of a VM besides its stored definition.
#[derive(Debug)]
struct VmRecord {
    state: DomainState,
    reason: Option<String>,
    runtime: Option<Runtime>,
    /// The operation in progress, if any.
    busy: Option<&'static str>,
    /// The definition its VMM runs with, when the stored one changed since it started.
    running: Option<VmDefinition>,
    /// Start the VM again once its guest powers off (an ACPI reboot in progress).
    restart: bool,
}

impl Default for VmRecord {
    fn default() -> Self {
        VmRecord {
            state: DomainState::Shutoff,
            reason: None,
            runtime: None,
            busy: None,
            running: None,
            restart: false,
        }
    }
}

/// A VM: its stored definition (the one its next start uses), whether a VMM runs it, and
/// its record.
type VmEntry = Entry<VmDefinition, VmRecord>;
type VmTable = Registry<VmDefinition, VmRecord>;

impl VmEntry {
    /// The definition in effect: the one its VMM runs with, or the stored one.
    fn current(&self) -> &VmDefinition {
        self.record.running.as_ref().unwrap_or(&self.definition)
    }

    /// The stored definition, when it waits for the running VMM to end.
    fn pending(&self) -> Option<&VmDefinition> {
        self.record.running.as_ref().map(|_| &self.definition)
    }

    /// Every definition this VM has now: the one in effect and the pending one.
    fn definitions(&self) -> impl Iterator<Item = &VmDefinition> {
        std::iter::once(self.current()).chain(self.pending())
    }

    /// Records the VMM that runs this VM from now on; without one, the stored definition is
    /// the one in effect.
    fn set_runtime(&mut self, runtime: Option<Runtime>) {
        self.active = runtime.is_some();
        if runtime.is_none() {
            self.record.running = None;
        }
        self.record.runtime = runtime;
    }
}

/// The daemon's VMs.
#[derive(Debug)]
pub struct Supervisor {
    store: Store,
    pools: Arc<Pools>,
    networks: Arc<Networks>,
    ferro: std::path::PathBuf,
    /// Where the files definitions name may be.
    file_dirs: FileDirs,
    vms: Mutex<VmTable>,
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
        if let Ok(entry) = self.supervisor.lock().get_mut(&self.name) {
            entry.record.busy = None;
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Supervisor {
    /// Loads the definitions (the VMMs that outlived the previous daemon are adopted by
    /// [`Supervisor::adopt`]).
    pub fn new(
        store: Store,
        ferro: std::path::PathBuf,
        pools: Arc<Pools>,
        networks: Arc<Networks>,
        file_dirs: FileDirs,
    ) -> Result<Arc<Self>, DirError> {
        let mut vms = VmTable::open(store.vms_dir())?;
        give_ids(&mut vms, networks.recorded_tap_ids());
        // What definitions say of their volumes' formats, before anything probes a volume.
        for entry in vms.entries().values() {
            for disk in &entry.definition.config.disks {
                if let (Some((pool, volume)), Some(format)) = (disk.volume_ref(), &disk.format) {
                    pools.seed_format(pool, volume, format);
                }
            }
        }
        warn_of_shared_taps(&vms);
        let (events, _) = broadcast::channel(256);
        let (restarts, restart_queue) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Supervisor {
            store,
            pools,
            networks,
            ferro,
            file_dirs,
            vms: Mutex::new(vms),
            events,
            restarts,
            restart_queue: Mutex::new(Some(restart_queue)),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, VmTable> {
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
        let entry = vms.get_mut(name)?;
        if let Some(other) = entry.record.busy {
            return Err(Failure::conflict(format!(
                "VM {name} is busy ({other} in progress); try again"
            )));
        }
        entry.record.busy = Some(operation);
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
        check(self.lock().get(name)?)
    }

    fn set_state(&self, name: &str, state: DomainState, reason: Option<String>) {
        if let Ok(entry) = self.lock().get_mut(name) {
            entry.record.state = state;
            entry.record.reason = reason;
        }
    }

    fn state(&self, name: &str) -> Option<DomainState> {
        self.lock().get(name).ok().map(|e| e.record.state)
    }

    fn runtime(&self, name: &str) -> Result<Runtime, Failure> {
        self.with_entry(name, |entry| {
            entry
                .record
                .runtime
                .clone()
                .ok_or_else(|| not_running(name, entry.record.state))
        })
    }
}

fn not_running(name: &str, state: DomainState) -> Failure {
    Failure::conflict(format!("VM {name} is not running (it is {state})"))
}
