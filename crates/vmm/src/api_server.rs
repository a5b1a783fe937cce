//! The per-VM control API: HTTP/1.1 + JSON on a Unix socket (`ferro run --api-socket PATH`).
//! The OpenAPI document is `docs/api/vmm.openapi.json`.
//!
//! Threads: an acceptor thread waits for connections (and for the shutdown eventfd); each
//! connection gets its own short-lived thread that reads requests, turns them into
//! [`ApiCommand`]s for the VMM's control loop and waits for the answer. The control loop owns
//! the VM and its state machine, so every command is decided there, one at a time.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use api::vmm_api::{paths, ErrorBody, VmCounters, VmInfo};
use http_unix::{Method, Request, Response};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How long a connection may stay idle, or a request take to arrive.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for the control loop (which may be rebuilding the machine).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more get 503.
const MAX_CONNECTIONS: usize = 16;

/// What a client asks the control loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiCommand {
    Info,
    Counters,
    Pause,
    Resume,
    PowerButton,
    Reset,
    Stop,
}

/// The control loop's answer.
#[derive(Debug)]
pub(crate) enum ApiReply {
    Info(Box<VmInfo>),
    Counters(VmCounters),
    /// Done (or, for reset and stop, accepted).
    Done,
    /// The command does not fit the VM's state (409).
    Conflict(String),
    /// The command failed (500).
    Failed(String),
}

/// One command with the way back to its connection.
#[derive(Debug)]
pub(crate) struct ApiRequest {
    pub command: ApiCommand,
    pub reply: SyncSender<ApiReply>,
}

/// The control loop's end: readable `event` means requests wait in `requests`.
#[derive(Debug)]
pub(crate) struct ApiInbox {
    pub requests: Receiver<ApiRequest>,
    pub event: EventFd,
}

impl ApiInbox {
    /// Takes the next waiting request, if any.
    pub fn next(&self) -> Option<ApiRequest> {
        let _ = self.event.read();
        self.requests.try_recv().ok()
    }
}

/// Clients' end of the inbox.
#[derive(Clone)]
struct Outbox {
    requests: Sender<ApiRequest>,
    event: Arc<EventFd>,
}

/// Why the API socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("another process serves {}", .0.display())]
    InUse(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// A running API server; dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub(crate) struct ApiServer {
    path: PathBuf,
    shutdown: EventFd,
    acceptor: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file left by a dead process is replaced).
    pub fn start(path: &Path) -> Result<(ApiServer, ApiInbox), ApiSocketError> {
        let listener = bind(path)?;
        let thread_err = ApiSocketError::Thread;
        let (requests_tx, requests) = mpsc::channel();
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
        let outbox = Outbox {
            requests: requests_tx,
            event: Arc::new(event.try_clone().map_err(thread_err)?),
        };
        let shutdown = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
        let acceptor_shutdown = shutdown.try_clone().map_err(thread_err)?;
        let acceptor = crate::signals::spawn_without_termination_signals(
            std::thread::Builder::new().name("api".into()),
            move || accept_loop(listener, acceptor_shutdown, outbox),
        )
        .map_err(thread_err)?;
        let server = ApiServer {
            path: path.to_path_buf(),
            shutdown,
            acceptor: Some(acceptor),
        };
        Ok((server, ApiInbox { requests, event }))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.write(1);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bind(path: &Path) -> Result<UnixListener, ApiSocketError> {
    let bind_err = |source| ApiSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiSocketError::InUse(path.to_path_buf()));
            }
            // Nobody listens: a leftover of a process that died.
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

fn accept_loop(listener: UnixListener, shutdown: EventFd, outbox: Outbox) {
    const LISTENER: u64 = 0;
    const SHUTDOWN: u64 = 1;
    let epoll = match Epoll::new() {
        Ok(epoll) => epoll,
        Err(e) => return tracing::error!("API server: {e}"),
    };
    for (fd, token) in [
        (listener.as_raw_fd(), LISTENER),
        (shutdown.as_raw_fd(), SHUTDOWN),
    ] {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            return tracing::error!("API server: {e}");
        }
    }
    let active = Arc::new(AtomicUsize::new(0));
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("API server: {e}"),
        };
        for event in &events[..n] {
            if event.data() == SHUTDOWN {
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => serve_in_thread(stream, &outbox, &active),
                Err(e) => tracing::warn!("API server: accept failed: {e}"),
            }
        }
    }
}

fn serve_in_thread(stream: UnixStream, outbox: &Outbox, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        let busy = error_response(503, "too many API connections; try again");
        let _ = http_unix::write_response(&mut &stream, &busy, false);
        return;
    }
    let outbox = outbox.clone();
    let count = active.clone();
    let spawned = crate::signals::spawn_without_termination_signals(
        std::thread::Builder::new().name("api-conn".into()),
        move || {
            serve_connection(&stream, &outbox);
            count.fetch_sub(1, Ordering::AcqRel);
        },
    );
    if let Err(e) = spawned {
        active.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("API server: cannot serve a connection: {e}");
    }
}

/// Serves requests on one connection until the client closes it, errs or idles too long.
fn serve_connection(stream: &UnixStream, outbox: &Outbox) {
    if stream.set_read_timeout(Some(CONNECTION_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(CONNECTION_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        let (response, keep_alive) = match http_unix::read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(request)) => (respond(&request, outbox), request.keep_alive),
            Err(e) => match e.status() {
                Some(status) => (error_response(status, &e.to_string()), false),
                None => return, // the connection is gone
            },
        };
        if http_unix::write_response(&mut &*stream, &response, keep_alive).is_err() || !keep_alive {
            return;
        }
    }
}

fn respond(request: &Request, outbox: &Outbox) -> Response {
    let command = match route(&request.method, &request.path) {
        Ok(command) => command,
        Err(response) => return response,
    };
    if !request.body.is_empty() && !is_empty_json(&request.body) {
        return error_response(400, "this request takes no body");
    }
    let (reply_tx, reply) = mpsc::sync_channel(1);
    let sent = outbox.requests.send(ApiRequest {
        command,
        reply: reply_tx,
    });
    if sent.is_err() || outbox.event.write(1).is_err() {
        return error_response(503, "the VM is shutting down");
    }
    match reply.recv_timeout(REPLY_TIMEOUT) {
        Ok(reply) => reply_response(reply),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            error_response(503, "the VMM did not answer in time; try again")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => error_response(503, "the VM is shutting down"),
    }
}

/// `{}` (with any whitespace) counts as no body.
fn is_empty_json(body: &[u8]) -> bool {
    let text: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    text == b"{}"
}

/// The command a method and path ask for, or the error response.
fn route(method: &Method, path: &str) -> Result<ApiCommand, Response> {
    let (command, allowed) = match path {
        paths::VM => (ApiCommand::Info, Method::Get),
        paths::COUNTERS => (ApiCommand::Counters, Method::Get),
        paths::PAUSE => (ApiCommand::Pause, Method::Put),
        paths::RESUME => (ApiCommand::Resume, Method::Put),
        paths::POWER_BUTTON => (ApiCommand::PowerButton, Method::Put),
        paths::RESET => (ApiCommand::Reset, Method::Put),
        paths::STOP => (ApiCommand::Stop, Method::Put),
        _ => return Err(error_response(404, &format!("no such resource: {path}"))),
    };
    if *method != allowed {
        return Err(error_response(
            405,
            &format!("{path} accepts {} only", allowed.as_str()),
        ));
    }
    Ok(command)
}

fn reply_response(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Info(info) => json_response(200, &*info),
        ApiReply::Counters(counters) => json_response(200, &counters),
        ApiReply::Done => Response::empty(204),
        ApiReply::Conflict(message) => error_response(409, &message),
        ApiReply::Failed(message) => error_response(500, &message),
    }
}

fn json_response<T: serde::Serialize>(status: u16, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => Response::json(status, bytes),
        Err(e) => error_response(500, &format!("cannot encode the response: {e}")),
    }
}

fn error_response(status: u16, message: &str) -> Response {
    let body = ErrorBody {
        error: message.to_string(),
    };
    Response::json(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// Replies to a request; a client that went away is not an error.
pub(crate) fn answer(request: ApiRequest, reply: ApiReply) {
    let _ = request.reply.send(reply);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_check_path_and_method() {
        assert_eq!(route(&Method::Get, paths::VM), Ok(ApiCommand::Info));
        assert_eq!(route(&Method::Put, paths::PAUSE), Ok(ApiCommand::Pause));
        assert_eq!(route(&Method::Get, paths::PAUSE).unwrap_err().status, 405);
        assert_eq!(route(&Method::Put, "/api/v1/nope").unwrap_err().status, 404);
        assert_eq!(
            route(&Method::Other("PATCH".into()), paths::STOP)
                .unwrap_err()
                .status,
            405
        );
    }

    #[test]
    fn empty_json_objects_are_no_body() {
        assert!(is_empty_json(b" { }\n"));
        assert!(!is_empty_json(b"{\"a\":1}"));
    }

    #[test]
    fn replies_map_to_statuses() {
        assert_eq!(reply_response(ApiReply::Done).status, 204);
        let conflict = reply_response(ApiReply::Conflict("paused".into()));
        assert_eq!(conflict.status, 409);
        assert_eq!(conflict.body, br#"{"error":"paused"}"#);
        assert_eq!(reply_response(ApiReply::Failed("x".into())).status, 500);
    }
}
