//! The VM lifecycle as an explicit state machine.
//!
//! ```text
//! Created --start--> Running --stop--> Stopping --> Stopped
//!    \___________________________________________/ (setup failure)
//! ```
//! Pause/resume will add `Paused` between `Running` and `Stopping`.

use std::fmt;

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built: memory, devices and vCPUs exist, no vCPU runs yet.
    Created,
    /// vCPU threads run the guest.
    Running,
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
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
        };
        f.write_str(name)
    }
}

impl VmState {
    /// Moves to `to` if the lifecycle allows it.
    pub fn transition(&mut self, to: VmState) -> Result<(), InvalidTransition> {
        use VmState::*;
        let allowed = matches!(
            (*self, to),
            (Created, Running) | (Created, Stopped) | (Running, Stopping) | (Stopping, Stopped)
        );
        if !allowed {
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
    fn normal_life() {
        let mut s = VmState::Created;
        for to in [VmState::Running, VmState::Stopping, VmState::Stopped] {
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
        let mut stopped = VmState::Stopped;
        assert!(stopped.transition(VmState::Running).is_err());
        let mut created = VmState::Created;
        assert!(created.transition(VmState::Stopping).is_err());
        created.transition(VmState::Stopped).unwrap();
    }
}
