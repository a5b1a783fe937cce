//! A running VM's power: the ACPI shutdown and reboot (the guest decides, the daemon waits),
//! destroy (pull the plug), and what the daemon passes to the VMM as it is (pause, resume,
//! hard reset).
//!
//! The VMM offers the guest only a power button, so an ACPI reboot is a shutdown followed by a
//! start: the daemon presses the button, and when the guest has powered off it starts the VM
//! again (a new VMM, so a definition changed meanwhile applies). Waiting for the guest holds
//! no lock on the VM: `destroy` (or anything else) may come in meanwhile, and a client that
//! stops waiting leaves nothing held. Runs on the daemon's runtime, like the rest of
//! [`Supervisor`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::daemon_api::{DomainState, VmDetails};
use api::vmm_api::paths as vmm_paths;

use super::vmm::vmm_put;
use super::{Runtime, Supervisor, DESTROY_GRACE};
use crate::failure::Failure;
use crate::vms::process;

/// What a waiting shutdown or reboot sees of the VM.
enum Seen {
    /// The VMM it pressed the button of still runs.
    Same,
    /// That VMM ended; a reboot's restart is still to come or under way.
    Restarting,
    /// The VM runs again on a new VMM.
    Restarted,
    /// That VMM ended, and no restart follows.
    Stopped,
}

impl Supervisor {
    /// Presses the power button of a running VM for `operation`, the VM then shutting down
    /// (`restart`: to start again); a paused guest cannot react, so it is refused.
    async fn press_power_button(
        &self,
        name: &str,
        operation: &'static str,
        restart: bool,
    ) -> Result<Runtime, Failure> {
        let _busy = self.begin(name, operation)?;
        let runtime = self.runtime(name)?;
        if self.state(name) == Some(DomainState::Paused) {
            return Err(Failure::conflict(format!(
                "VM {name} is paused; resume it first (a paused guest cannot react to the power button)"
            )));
        }
        vmm_put(&runtime.files.api_socket, vmm_paths::POWER_BUTTON).await?;
        if let Ok(entry) = self.lock().get_mut(name) {
            entry.record.state = DomainState::ShuttingDown;
            entry.record.reason = None;
            entry.record.restart = restart;
        }
        let kind = if restart {
            "reboot-requested"
        } else {
            "shutdown-requested"
        };
        self.emit(name, kind, None);
        Ok(runtime)
    }

    /// Presses the power button and waits up to `timeout` for the guest to power off (not at
    /// all for a zero `timeout`).
    pub async fn shutdown(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<VmDetails, Failure> {
        let runtime = self.press_power_button(name, "shutdown", false).await?;
        if timeout.is_zero() || self.wait_for(name, &runtime, timeout, false).await {
            return self.details(name);
        }
        Err(Failure::timed_out(format!(
            "VM {name} is still running {} s after the power button was pressed",
            timeout.as_secs()
        )))
    }

    /// An ACPI reboot: presses the power button, and starts the VM again once the guest has
    /// powered off; waits up to `timeout` for it to run again (not at all for a zero
    /// `timeout`). A guest still up at the timeout is left running, and no restart is armed.
    pub async fn reboot(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<VmDetails, Failure> {
        let runtime = self.press_power_button(name, "reboot", true).await?;
        if timeout.is_zero() || self.wait_for(name, &runtime, timeout, true).await {
            let details = self.details(name)?;
            let up = matches!(
                details.state,
                DomainState::Starting | DomainState::Running | DomainState::Paused
            );
            if timeout.is_zero() || up {
                return Ok(details);
            }
            let why = details.reason.unwrap_or_else(|| "no reason given".into());
            return Err(Failure::conflict(format!(
                "VM {name} did not start again: it is {} ({why})",
                details.state
            )));
        }
        Err(Failure::timed_out(format!(
            "VM {name} is still running {} s after the power button was pressed: the \
                 guest did not power off to reboot, and keeps running (`ferro vm reset` \
                 resets it at once)",
            timeout.as_secs()
        )))
    }

    /// Whether, within `timeout`, the VMM of `runtime` ended (`restart`: and the VM runs
    /// again, or will not). At the timeout, a VM still on that VMM and shutting down is
    /// running again as far as the daemon knows, with no restart armed.
    async fn wait_for(
        &self,
        name: &str,
        runtime: &Runtime,
        timeout: Duration,
        restart: bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.seen(name, runtime) {
                Seen::Same | Seen::Restarting if Instant::now() > deadline => break,
                Seen::Same => {}
                Seen::Restarting if restart => {}
                Seen::Restarting | Seen::Restarted | Seen::Stopped => return true,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut vms = self.lock();
        let Ok(entry) = vms.get_mut(name) else {
            return true;
        };
        let same = entry.record.runtime.as_ref().map(|r| r.record) == Some(runtime.record);
        if !same {
            return true; // the restart is under way: it answers for itself
        }
        entry.record.restart = false;
        if entry.record.state == DomainState::ShuttingDown {
            entry.record.state = DomainState::Running;
        }
        false
    }

    fn seen(&self, name: &str, runtime: &Runtime) -> Seen {
        let vms = self.lock();
        let Ok(entry) = vms.get(name) else {
            return Seen::Stopped;
        };
        match &entry.record.runtime {
            Some(r) if r.record == runtime.record => Seen::Same,
            Some(_) if entry.record.state == DomainState::Running => Seen::Restarted,
            Some(_) => Seen::Restarting,
            None if entry.record.restart => Seen::Restarting,
            None => Seen::Stopped,
        }
    }

    /// After a VMM ended: whether its VM is to start again (an ACPI reboot whose guest powered
    /// off); a VM that crashed instead is not, and its restart is disarmed.
    pub(super) fn restart_due(&self, name: &str) -> bool {
        let mut vms = self.lock();
        let Ok(entry) = vms.get_mut(name) else {
            return false;
        };
        if entry.record.runtime.is_some() || !entry.record.restart {
            return false;
        }
        if entry.record.state != DomainState::Shutoff {
            entry.record.restart = false;
            return false;
        }
        true
    }

    /// Starts the VMs whose guests powered off to reboot, one at a time, as they come; runs
    /// for the daemon's life.
    pub async fn run_restarts(self: Arc<Self>) {
        let queue = self
            .restart_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut queue) = queue else {
            return;
        };
        while let Some(name) = queue.recv().await {
            let result = self.start(&name).await;
            let mut vms = self.lock();
            let Ok(entry) = vms.get_mut(&name) else {
                continue;
            };
            entry.record.restart = false;
            if let Err(e) = result {
                tracing::error!(
                    "VM {name} powered off to reboot and cannot start: {}",
                    e.message
                );
                if entry.record.runtime.is_none() {
                    entry.record.reason = Some(format!(
                        "powered off to reboot, then could not start: {}",
                        e.message
                    ));
                }
            }
        }
    }

    /// Stops the VM at once (asks its VMM; kills it if it does not answer).
    pub async fn destroy(self: &Arc<Self>, name: &str) -> Result<VmDetails, Failure> {
        let _busy = self.begin(name, "destroy")?;
        let runtime = self.runtime(name)?;
        if let Ok(entry) = self.lock().get_mut(name) {
            entry.record.restart = false;
        }
        let asked = vmm_put(&runtime.files.api_socket, vmm_paths::STOP)
            .await
            .is_ok();
        if !asked || !self.wait_until_stopped(name, &runtime, DESTROY_GRACE).await {
            let _ = process::kill(runtime.record.pid, libc::SIGKILL);
            if !self.wait_until_stopped(name, &runtime, DESTROY_GRACE).await {
                return Err(Failure::internal(format!(
                    "the VMM of {name} (pid {}) does not die",
                    runtime.record.pid
                )));
            }
        }
        self.set_state(name, DomainState::Shutoff, Some("destroyed".into()));
        drop(_busy);
        self.details(name)
    }

    /// Whether the VMM of `runtime` ended within `timeout`.
    async fn wait_until_stopped(&self, name: &str, runtime: &Runtime, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self
                .lock()
                .get(name)
                .ok()
                .and_then(|e| e.record.runtime.as_ref().map(|r| r.record));
            if current != Some(runtime.record) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Forwards a pause, resume or hard reset to the VMM.
    pub async fn control(
        self: &Arc<Self>,
        name: &str,
        action: Control,
    ) -> Result<VmDetails, Failure> {
        let _busy = self.begin(name, action.operation())?;
        let runtime = self.runtime(name)?;
        vmm_put(&runtime.files.api_socket, action.vmm_path()).await?;
        match action {
            Control::Suspend => self.set_state(name, DomainState::Paused, None),
            Control::Resume => self.set_state(name, DomainState::Running, None),
            Control::Reset => {
                // The guest boots again on the same VMM: a shutdown or reboot it was asked
                // for is over, and no restart is due.
                if let Ok(entry) = self.lock().get_mut(name) {
                    entry.record.restart = false;
                    if entry.record.state == DomainState::ShuttingDown {
                        entry.record.state = DomainState::Running;
                    }
                }
            }
        }
        self.emit(name, action.event(), None);
        drop(_busy);
        self.details(name)
    }
}

/// Commands the daemon passes to a VMM as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Suspend,
    Resume,
    /// A hard reset (the reset line), not the guest's own reboot.
    Reset,
}

impl Control {
    fn operation(self) -> &'static str {
        match self {
            Control::Suspend => "suspend",
            Control::Resume => "resume",
            Control::Reset => "reset",
        }
    }

    fn vmm_path(self) -> &'static str {
        match self {
            Control::Suspend => vmm_paths::PAUSE,
            Control::Resume => vmm_paths::RESUME,
            Control::Reset => vmm_paths::RESET,
        }
    }

    fn event(self) -> &'static str {
        match self {
            Control::Suspend => "paused",
            Control::Resume => "resumed",
            Control::Reset => "reset",
        }
    }
}
