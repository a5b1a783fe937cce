//! The per-VM control API: HTTP/1.1 + JSON on a Unix socket (`ferro run --api-socket PATH`).
//! The OpenAPI document is `docs/api/vmm.openapi.json`.
//!
//! Threads: an acceptor thread waits for connections (and for the shutdown eventfd); each
//! connection gets its own short-lived thread that reads requests, turns them into
//! [`ApiCommand`]s for the VMM's control loop and waits for the answer. The control loop owns
//! the VM and its state machine, so every command is decided there, one at a time.
//!
//! Limits ([`Limits`]): a request (and the wait for it on a kept-alive connection) must arrive
//! whole within one deadline, however the client spaces its bytes; at most `max_connections`
//! are served at once, and one more closes the connection that has waited longest for a
//! request (a client that connects and sends nothing cannot keep the daemon out), or gets 503
//! when every connection is busy with a command.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::diagnostics::VmDiagnostics;
use api::vmm_api::{paths, ErrorBody, VmCounters, VmInfo};
use http_unix::{DeadlineReader, Method, Request, Response};
use sandbox::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The API server's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a request may take to arrive whole, counted from when the connection is
    /// ready for it (accepted, or the previous answer sent): idle time included.
    pub request_timeout: Duration,
    /// How long writing an answer may take.
    pub write_timeout: Duration,
    /// How long a request waits for the control loop (which may be rebuilding the machine).
    pub reply_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            max_connections: 16,
        }
    }
}

/// What a client asks the control loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiCommand {
    Info,
    Counters,
    Diagnostics,
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
    Diagnostics(Box<VmDiagnostics>),
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
        Self::start_with(path, Limits::default())
    }

    /// [`ApiServer::start`] with other limits.
    pub fn start_with(
        path: &Path,
        limits: Limits,
    ) -> Result<(ApiServer, ApiInbox), ApiSocketError> {
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
        let acceptor = crate::signals::spawn_thread(ThreadKind::Api, "api", move || {
            accept_loop(listener, acceptor_shutdown, outbox, limits)
        })
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

fn accept_loop(listener: UnixListener, shutdown: EventFd, outbox: Outbox, limits: Limits) {
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
    let connections = Arc::new(Connections::default());
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
                Ok((stream, _)) => serve_in_thread(stream, &outbox, &connections, limits),
                Err(e) => tracing::warn!("API server: accept failed: {e}"),
            }
        }
    }
}

/// One connection being served: a handle to close it, and since when it waits for a request
/// (None while it carries one out).
#[derive(Debug)]
struct Slot {
    id: u64,
    stream: UnixStream,
    waiting_since: Option<Instant>,
}

/// The connections being served.
#[derive(Debug, Default)]
struct Connections {
    slots: Mutex<(u64, Vec<Slot>)>,
}

impl Connections {
    /// Takes a place for `stream`, closing the connection that has waited longest for a
    /// request if all are taken; None when every one is busy.
    fn admit(&self, stream: &UnixStream, max: usize) -> Option<u64> {
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let (next_id, slots) = &mut *guard;
        if slots.len() >= max {
            let oldest = slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| Some((i, slot.waiting_since?)))
                .min_by_key(|(_, since)| *since)
                .map(|(i, _)| i)?;
            let evicted = slots.swap_remove(oldest);
            // Its thread's read ends at once.
            let _ = evicted.stream.shutdown(std::net::Shutdown::Both);
        }
        let handle = stream.try_clone().ok()?;
        let id = *next_id;
        *next_id += 1;
        slots.push(Slot {
            id,
            stream: handle,
            waiting_since: Some(Instant::now()),
        });
        Some(id)
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = guard.1.iter_mut().find(|slot| slot.id == id) {
            slot.waiting_since = waiting.then(Instant::now);
        }
    }

    fn remove(&self, id: u64) {
        let mut guard = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        guard.1.retain(|slot| slot.id != id);
    }
}

fn serve_in_thread(
    stream: UnixStream,
    outbox: &Outbox,
    connections: &Arc<Connections>,
    limits: Limits,
) {
    let Some(id) = connections.admit(&stream, limits.max_connections) else {
        let busy = error_response(503, "too many API connections; try again");
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = http_unix::write_response(&mut &stream, &busy, false);
        return;
    };
    let outbox = outbox.clone();
    let served = connections.clone();
    let spawned = crate::signals::spawn_thread(ThreadKind::Api, "api-conn", move || {
        serve_connection(&stream, &outbox, &served, id, limits);
        served.remove(id);
    });
    if let Err(e) = spawned {
        connections.remove(id);
        tracing::warn!("API server: cannot serve a connection: {e}");
    }
}

/// Serves requests on one connection until the client closes it, errs, or a request does not
/// arrive whole in time.
fn serve_connection(
    stream: &UnixStream,
    outbox: &Outbox,
    connections: &Connections,
    id: u64,
    limits: Limits,
) {
    if stream
        .set_write_timeout(Some(limits.write_timeout))
        .is_err()
    {
        return;
    }
    let mut reader = BufReader::new(DeadlineReader::new(stream));
    loop {
        connections.set_waiting(id, true);
        reader
            .get_ref()
            .set_deadline(Instant::now() + limits.request_timeout);
        let read = http_unix::read_request(&mut reader);
        connections.set_waiting(id, false);
        let (response, keep_alive) = match read {
            Ok(None) => return,
            Ok(Some(request)) => (
                respond(&request, outbox, limits.reply_timeout),
                request.keep_alive,
            ),
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

fn respond(request: &Request, outbox: &Outbox, reply_timeout: Duration) -> Response {
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
    match reply.recv_timeout(reply_timeout) {
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
        paths::DIAGNOSTICS => (ApiCommand::Diagnostics, Method::Get),
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
        ApiReply::Diagnostics(report) => json_response(200, &*report),
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
        assert_eq!(
            route(&Method::Get, paths::DIAGNOSTICS),
            Ok(ApiCommand::Diagnostics)
        );
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

    use std::io::{Read, Write};

    fn limits() -> Limits {
        Limits {
            request_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(3),
            max_connections: 4,
        }
    }

    fn server(limits: Limits) -> (tempfile::TempDir, PathBuf, ApiServer, ApiInbox) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (server, inbox) = ApiServer::start_with(&path, limits).unwrap();
        (dir, path, server, inbox)
    }

    /// Whether the server still holds `stream` open (nothing to read yet, no end).
    fn still_open(stream: &mut UnixStream) -> bool {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut byte = [0u8; 1];
        matches!(stream.read(&mut byte), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }

    /// A request on a new connection: the answer's text.
    fn get(path: &Path, resource: &str) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // A server that refuses the connection (503) answers and closes it at once, so this
        // write may meet a closed socket; the answer is read all the same.
        let _ = write!(
            stream,
            "GET {resource} HTTP/1.1\r\nConnection: close\r\n\r\n"
        );
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    }

    /// A client sending a byte every 100 ms never lets a read wait 1 s, yet the whole request
    /// must arrive within 1 s: it is answered 408 and cut off then.
    #[test]
    fn a_request_sent_a_byte_at_a_time_is_cut_off_at_its_deadline() {
        let (_dir, path, _server, _inbox) = server(limits());
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let start = Instant::now();
        stream
            .write_all(b"GET /api/v1/vm HTTP/1.1\r\nX-Slow: ")
            .unwrap();
        let mut answer = Vec::new();
        let closed = loop {
            assert!(
                start.elapsed() < Duration::from_secs(6),
                "still open: {answer:?}"
            );
            if stream.write_all(b"x").is_err() {
                break start.elapsed();
            }
            let mut buffer = [0u8; 512];
            match stream.read(&mut buffer) {
                Ok(0) => break start.elapsed(),
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
                Err(_) => {}
            }
        };
        assert!(closed < Duration::from_millis(2000), "{closed:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }

    /// Idle connections past the limit close the ones that waited longest; a client after
    /// them is served at once.
    #[test]
    fn idle_connections_make_room_for_a_good_client() {
        let (_dir, path, _server, _inbox) = server(Limits {
            request_timeout: Duration::from_secs(30),
            ..limits()
        });
        let mut idle: Vec<UnixStream> = (0..6)
            .map(|_| {
                let stream = UnixStream::connect(&path).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                stream
            })
            .collect();
        let start = Instant::now();
        let answer = get(&path, "/api/v1/nope");
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(start.elapsed() < Duration::from_secs(2));
        // The good client took a place (and left): the three newest idle ones remain.
        let open: Vec<bool> = idle.iter_mut().map(still_open).collect();
        assert_eq!(open, [false, false, false, true, true, true]);
    }

    /// When every connection waits on the control loop, one more gets 503.
    #[test]
    fn a_connection_past_the_limit_of_busy_ones_gets_503() {
        // Busy connections wait for a reply the test holds back: long enough for a loaded
        // machine.
        let (_dir, path, _server, inbox) = server(Limits {
            reply_timeout: Duration::from_secs(30),
            ..limits()
        });
        let busy: Vec<UnixStream> = (0..4)
            .map(|_| {
                let mut stream = UnixStream::connect(&path).unwrap();
                stream
                    .write_all(b"PUT /api/v1/vm/pause HTTP/1.1\r\n\r\n")
                    .unwrap();
                stream
            })
            .collect();
        // Once the four commands reached the control loop's inbox, every connection is busy.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut held = Vec::new();
        while held.len() < 4 {
            assert!(Instant::now() < deadline, "{} commands arrived", held.len());
            match inbox.next() {
                Some(request) => held.push(request),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let answer = get(&path, "/api/v1/nope");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        drop(busy);
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
