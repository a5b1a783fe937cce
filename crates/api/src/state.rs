//! The lifecycle of a running VMM's virtual machine, as an explicit state machine.
//!
//! ```text
//! Created --start--> Running <--pause/resume--> Paused
//!    |                  |                          |
//!    |                  +--------stop--------------+--> Stopping --> Stopped
//!    +-------------------(setup failure)-------------------------------^
//! ```
//! A reset is a stop followed by a fresh machine in `Created`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Built: memory, devices and vCPUs exist, no vCPU runs yet.
    Created,
    /// vCPU threads run the guest.
    Running,
    /// vCPU threads are parked; guest time does not advance.
    Paused,
    /// vCPUs are being stopped.
    Stopping,
    /// All vCPUs have stopped; only teardown remains.
    Stopped,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a VM cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: VmState,
    pub to: VmState,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
        };
        f.write_str(name)
    }
}

impl VmState {
    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Created, Running)
                | (Created, Stopped)
                | (Running, Paused)
                | (Paused, Running)
                | (Running, Stopping)
                | (Paused, Stopping)
                | (Stopping, Stopped)
        )
    }

    /// Moves to `to` if the lifecycle allows it.
    pub fn transition(&mut self, to: VmState) -> Result<(), InvalidTransition> {
        if !self.can_become(to) {
            return Err(InvalidTransition { from: *self, to });
        }
        *self = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_life_with_a_pause() {
        let mut s = VmState::Created;
        for to in [
            VmState::Running,
            VmState::Paused,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Stopped,
        ] {
            s.transition(to).unwrap();
        }
        assert_eq!(s, VmState::Stopped);
    }

    #[test]
    fn refused_transitions_leave_the_state_alone() {
        let mut s = VmState::Running;
        let err = s.transition(VmState::Created).unwrap_err();
        assert_eq!(err.to_string(), "a VM cannot go from running to created");
        assert_eq!(s, VmState::Running);
        assert!(s.transition(VmState::Running).is_err(), "running twice");
        let mut stopped = VmState::Stopped;
        assert!(stopped.transition(VmState::Running).is_err());
        let mut created = VmState::Created;
        assert!(created.transition(VmState::Paused).is_err());
        assert!(created.transition(VmState::Stopping).is_err());
        created.transition(VmState::Stopped).unwrap();
    }

    #[test]
    fn states_serialize_in_lower_case() {
        let json = serde_json::to_string(&VmState::Paused).unwrap();
        assert_eq!(json, "\"paused\"");
    }
}
