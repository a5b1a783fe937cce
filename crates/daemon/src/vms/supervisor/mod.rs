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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::daemon_api::{DomainState, Event, VmDefinition};
use tokio::sync::broadcast;

use crate::failure::{chain, Failure};
use crate::networks::Networks;
use crate::pools::Pools;
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
            for disk in &definition.config.disks {
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
}

fn not_running(name: &str, state: DomainState) -> Failure {
    Failure::conflict(format!("VM {name} is not running (it is {state})"))
}
