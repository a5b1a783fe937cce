//! The one place that turns what went wrong into HTTP: a domain [`Failure`]'s kind into a
//! status (its message kept as it is), and the errors that stop the daemon. Handlers answer
//! with [`ApiError`], sent as `{"error": ...}`.
//!
//! Threading: plain values.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::failure::{Failure, Kind};
use crate::fs::DirError;
use crate::vms::store::StoreError;

/// Why the daemon cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("another daemon serves {}", .0.display())]
    InUse(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An error answer: status and a one-line message, sent as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// The HTTP status of each kind of failure.
pub fn status_of(kind: Kind) -> StatusCode {
    match kind {
        Kind::Invalid => StatusCode::BAD_REQUEST,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::Conflict => StatusCode::CONFLICT,
        Kind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        // The VMM's own refusal keeps its status; one that is no status at all is a bad
        // answer from the VMM.
        Kind::VmmRefused(status) => StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> Self {
        ApiError::new(status_of(failure.kind), failure.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = api::vmm_api::ErrorBody {
            error: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_status_and_the_message_is_kept() {
        let cases = [
            (Kind::Invalid, 400),
            (Kind::NotFound, 404),
            (Kind::Conflict, 409),
            (Kind::TimedOut, 504),
            (Kind::Internal, 500),
            (Kind::VmmRefused(409), 409),
            (Kind::VmmRefused(42), 502),
        ];
        for (kind, status) in cases {
            let answer = ApiError::from(Failure::new(kind, "say what to do"));
            assert_eq!(answer.status.as_u16(), status, "{kind:?}");
            assert_eq!(answer.message, "say what to do");
        }
    }
}
