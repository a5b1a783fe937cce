//! Why a VM, pool or network operation was refused or failed, in the domain's own terms: what
//! kind of failure it is (the request is invalid, names nothing, conflicts with the current
//! state, ran out of time, failed inside the daemon, or the VMM refused it) and a one-line
//! message saying what to do. The server alone turns a [`Kind`] into an HTTP status
//! (`server::error`); nothing here knows HTTP.
//!
//! Threading: plain values, sent between the API's tasks.

pub use api::error_chain as chain;

/// What kind of failure a [`Failure`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request itself is wrong (a bad definition, an unknown network to attach...).
    Invalid,
    /// What the request names does not exist.
    NotFound,
    /// The request cannot be done in the current state (running, busy, in use, taken...).
    Conflict,
    /// The operation did not finish in time (a guest that does not power off).
    TimedOut,
    /// Something failed inside the daemon or on the host.
    Internal,
    /// The VMM refused the request with this HTTP status of its own API.
    VmmRefused(u16),
}

/// A refused or failed operation: its kind and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, message)
    }

    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(Kind::TimedOut, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
}
