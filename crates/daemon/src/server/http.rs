//! The daemon's HTTP connections: the accept loop on its Unix socket, with the limits that keep
//! one client, or one user, from holding the daemon (hyper's HTTP/1.1 serves each connection;
//! the router answers its requests):
//! - a request's head (and the wait for it on an idle keep-alive connection) must arrive whole
//!   within [`Limits::header_timeout`] (hyper's header read timeout, one deadline);
//! - its body must keep coming: no gap longer than [`Limits::body_timeout`], and on average at
//!   least [`Limits::min_body_rate`] after the first [`Limits::body_timeout`] (a 4 GiB upload at
//!   local speed is never near it, one byte a second is cut off within the timeout);
//! - a response the client does not read for [`Limits::write_stall`] ends the connection;
//! - at most [`Limits::max_connections`] connections are open; a new one past that closes an
//!   idle connection (one without a request in flight: of the user with the most connections,
//!   the one idle longest), or, when every one is busy with a request, is answered 503 and
//!   closed. So idle connections cannot use up the daemon's file descriptors nor lock a good
//!   client out;
//! - the socket is shared by the users of group `ferro`, so one user (the peer's uid, from
//!   SO_PEERCRED) has at most [`Limits::max_connections_per_user`]: past that, a new connection
//!   closes that user's own idle connection, never another user's, or is answered 503 saying
//!   to close some. Root is counted like anyone: it gains nothing from an exemption (it can
//!   stop the daemon anyway), and a runaway root script must not lock the tenants out;
//! - a response that lasts until the client leaves (the event stream) is opened through the
//!   [`Client`] each request carries as an extension: at most
//!   [`Limits::max_streams_per_user`] per user (429 past that), so a user's streams leave it
//!   connections for its other requests; they end when the daemon stops;
//! - on stop, requests in flight get [`Limits::shutdown_grace`] to finish; connections still
//!   open then are closed, so a stalled client cannot keep the daemon from exiting.
//!
//! Threading: one task per connection on the daemon's runtime, plus the accept loop; the table
//! of connections and the count of streams are behind mutexes held for a few instructions at a
//! time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant, Sleep};

use crate::server::error::ApiError;

/// The bounds of one client and of one user (see the module's text).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes per second.
    pub min_body_rate: u64,
    pub write_stall: Duration,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_streams_per_user: usize,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(20),
            min_body_rate: 64 << 10,
            write_stall: Duration::from_secs(60),
            max_connections: 128,
            // Four users can fill the daemon between them, one cannot.
            max_connections_per_user: 32,
            max_streams_per_user: 8,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// A peer's user id (SO_PEERCRED: the credentials it connected with).
type Uid = u32;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One open connection: whose it is, since when it has had no request in flight (None while
/// one is), and the way to close it.
#[derive(Debug)]
struct Open {
    uid: Uid,
    idle_since: Option<Instant>,
    close: Arc<Notify>,
}

/// The open connections.
#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Open>,
}

type Shared = Arc<Mutex<Table>>;

/// Why a new connection is turned away (with 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("the daemon is busy with other clients; retry")]
    Busy,
    #[error(
        "uid {uid} has {max} connections open, all busy with requests (the most one user may \
         have; an event stream holds one): close some of them and retry"
    )]
    UserFull { uid: Uid, max: usize },
}

impl Table {
    /// Makes room for one more connection of `uid`: its id and the way to close it. A user at
    /// its cap makes room among its own idle connections only; past the global cap, the idle
    /// connection that goes is one of the user with the most connections (its flood pays
    /// first), the one idle longest.
    fn admit(
        &mut self,
        uid: Uid,
        limits: &Limits,
        now: Instant,
    ) -> Result<(u64, Arc<Notify>), Refused> {
        let counts = self.counts();
        let mine = counts.get(&uid).copied().unwrap_or(0);
        if mine >= limits.max_connections_per_user {
            let own = self.idlest(|open| (open.uid == uid).then_some(()));
            self.close(own.ok_or(Refused::UserFull {
                uid,
                max: limits.max_connections_per_user,
            })?);
        } else if self.open.len() >= limits.max_connections {
            let victim = self.idlest(|open| counts.get(&open.uid).copied());
            self.close(victim.ok_or(Refused::Busy)?);
        }
        Ok(self.insert(uid, now))
    }

    fn counts(&self) -> HashMap<Uid, usize> {
        let mut counts = HashMap::new();
        for open in self.open.values() {
            *counts.entry(open.uid).or_default() += 1;
        }
        counts
    }

    /// Of the idle connections `rank` takes (Some), one with the greatest rank, of those the
    /// one idle longest.
    fn idlest<R: Ord>(&self, rank: impl Fn(&Open) -> Option<R>) -> Option<u64> {
        self.open
            .iter()
            .filter_map(|(id, open)| Some((*id, rank(open)?, open.idle_since?)))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
            .map(|(id, _, _)| id)
    }

    fn close(&mut self, id: u64) {
        if let Some(closed) = self.open.remove(&id) {
            closed.close.notify_one();
        }
    }

    fn insert(&mut self, uid: Uid, now: Instant) -> (u64, Arc<Notify>) {
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        let open = Open {
            uid,
            idle_since: Some(now),
            close: close.clone(),
        };
        self.open.insert(id, open);
        (id, close)
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(open) = self.open.get_mut(&id) {
            open.idle_since = idle.then(Instant::now);
        }
    }
}

/// The client of a request, for its handler (inserted into every request's extensions): who
/// it is, and the way to answer with a response that lasts until the client leaves.
#[derive(Debug, Clone)]
pub struct Client {
    uid: Uid,
    streams: Arc<Streams>,
    stopping: watch::Receiver<bool>,
}

impl Client {
    /// `body` as a long-lived response: counted against the user's streams while it is sent,
    /// and ended (cleanly) when the daemon stops.
    pub fn long_lived(&self, body: Body) -> Result<Body, TooManyStreams> {
        let permit = Streams::acquire(&self.streams, self.uid)?;
        let mut stopping = self.stopping.clone();
        // An error means the server is gone: an end as well.
        let stopped = async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        };
        Ok(Body::new(LongLived {
            inner: body,
            stopped: Some(Box::pin(stopped)),
            _permit: permit,
        }))
    }
}

/// Why a long-lived response was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("uid {uid} has {max} event streams open, the most one user may have: close one and retry")]
pub struct TooManyStreams {
    uid: Uid,
    max: usize,
}

impl From<TooManyStreams> for ApiError {
    fn from(e: TooManyStreams) -> Self {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
    }
}

/// The long-lived responses being sent, by user.
#[derive(Debug)]
struct Streams {
    max_per_user: usize,
    open: Mutex<HashMap<Uid, usize>>,
}

impl Streams {
    fn new(max_per_user: usize) -> Self {
        Streams {
            max_per_user,
            open: Mutex::default(),
        }
    }

    fn acquire(streams: &Arc<Streams>, uid: Uid) -> Result<StreamPermit, TooManyStreams> {
        let mut open = lock(&streams.open);
        let count = open.entry(uid).or_default();
        if *count >= streams.max_per_user {
            return Err(TooManyStreams {
                uid,
                max: streams.max_per_user,
            });
        }
        *count += 1;
        Ok(StreamPermit {
            streams: streams.clone(),
            uid,
        })
    }
}

/// One of a user's streams, given back when dropped.
#[derive(Debug)]
struct StreamPermit {
    streams: Arc<Streams>,
    uid: Uid,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.streams.open);
        if let Some(count) = open.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// A long-lived response body: ends when the server stops, holds its permit until dropped.
struct LongLived {
    inner: Body,
    /// None once the server has stopped (the future must not be polled again).
    stopped: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    _permit: StreamPermit,
}

impl std::fmt::Debug for LongLived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongLived")
            .field("stopped", &self.stopped.is_none())
            .field("permit", &self._permit)
            .finish_non_exhaustive()
    }
}

impl http_body::Body for LongLived {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(stopped) = self.stopped.as_mut() else {
            return Poll::Ready(None);
        };
        if stopped.as_mut().poll(cx).is_ready() {
            self.stopped = None;
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.stopped.is_none() || self.inner.is_end_stream()
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then lets the
/// requests in flight finish for [`Limits::shutdown_grace`] (as axum's graceful shutdown does,
/// with streams ended), closes the connections left, and returns.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let table: Shared = Arc::default();
    let streams = Arc::new(Streams::new(limits.max_streams_per_user));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let server = Server {
                        router: &router,
                        limits,
                        table: &table,
                        streams: &streams,
                        stopping: &stopping,
                    };
                    admit(stream, &server, &mut connections);
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait for connections to end.
                    tracing::warn!("cannot accept a connection: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
            // Reaped as they end, so the set holds the open connections only.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    finish(connections, limits.shutdown_grace).await;
}

/// Waits up to `grace` for the connections to end, then closes the rest (their tasks are
/// aborted, which drops their sockets and responses).
async fn finish(mut connections: JoinSet<()>, grace: Duration) {
    let ended = timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if ended.is_err() {
        tracing::warn!(
            "closing {} connections still open {grace:?} after the stop",
            connections.len()
        );
        connections.shutdown().await;
    }
}

/// What the accept loop shares with the connections it admits.
#[derive(Debug)]
struct Server<'a> {
    router: &'a Router,
    limits: Limits,
    table: &'a Shared,
    streams: &'a Arc<Streams>,
    stopping: &'a watch::Receiver<bool>,
}

/// One admitted connection, as its task sees it.
#[derive(Debug)]
struct Slot {
    table: Shared,
    id: u64,
    close: Arc<Notify>,
    limits: Limits,
    client: Client,
}

/// Serves a new connection, or refuses it (see [`Table::admit`]).
fn admit(stream: UnixStream, server: &Server<'_>, connections: &mut JoinSet<()>) {
    let uid = match stream.peer_cred() {
        Ok(credentials) => credentials.uid(),
        Err(e) => {
            // Linux always knows a Unix socket's peer; without it no limit could hold.
            tracing::warn!("cannot tell who connected, closing the connection: {e}");
            return;
        }
    };
    let admitted = lock(server.table).admit(uid, &server.limits, Instant::now());
    let (id, close) = match admitted {
        Ok(admitted) => admitted,
        Err(why) => return refuse(&stream, &why),
    };
    let slot = Slot {
        table: server.table.clone(),
        id,
        close,
        limits: server.limits,
        client: Client {
            uid,
            streams: server.streams.clone(),
            stopping: server.stopping.clone(),
        },
    };
    let router = server.router.clone();
    connections.spawn(async move {
        let table = slot.table.clone();
        serve_connection(stream, router, slot).await;
        lock(&table).open.remove(&id);
    });
}

/// Answers 503 with `why`, best effort, never waiting: a client that does not read gets the
/// close alone.
fn refuse(stream: &UnixStream, why: &Refused) {
    let body = api::vmm_api::ErrorBody {
        error: why.to_string(),
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

async fn serve_connection(stream: UnixStream, router: Router, slot: Slot) {
    let Slot {
        table,
        id,
        close,
        limits,
        client,
    } = slot;
    let mut stopping = client.stopping.clone();
    let service_table = table.clone();
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        let table = service_table.clone();
        let router = TowerToHyperService::new(router.clone());
        request.extensions_mut().insert(client.clone());
        async move {
            lock(&table).set_idle(id, false);
            let in_flight = InFlight { table, id };
            let request = request.map(|body| Body::new(TimedBody::new(body, limits)));
            let response = hyper::service::Service::call(&router, request).await?;
            Ok::<_, Infallible>(response.map(|body| TrackedBody {
                inner: body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let io = StallGuard::new(TokioIo::new(stream), limits.write_stall);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = close.notified() => return,
            changed = stopping.changed() => {
                if changed.is_err() || *stopping.borrow() {
                    // Bounded by the grace period of `finish`, which aborts this task.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.as_mut().await;
                    return;
                }
            }
        }
    }
}

/// A request in flight on a connection; the connection is idle again when it is dropped (with
/// the response's body, once hyper has sent it).
#[derive(Debug)]
struct InFlight {
    table: Shared,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.table).set_idle(self.id, true);
    }
}

/// A response body that keeps its request in flight until it is sent (or dropped).
#[derive(Debug)]
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body came too slowly (under {min_rate} bytes/s, or a gap of over {gap:?})")]
struct TooSlow {
    min_rate: u64,
    gap: Duration,
}

/// A request body held to the body limits.
#[derive(Debug)]
struct TimedBody {
    inner: Incoming,
    limits: Limits,
    start: Instant,
    received: u64,
    deadline: Pin<Box<Sleep>>,
}

impl TimedBody {
    fn new(inner: Incoming, limits: Limits) -> Self {
        let start = Instant::now();
        TimedBody {
            inner,
            limits,
            start,
            received: 0,
            deadline: Box::pin(sleep_until(start + limits.body_timeout)),
        }
    }

    /// The next frame must come before the earlier of: a gap of `body_timeout` from now, and
    /// the time the bytes so far earn at the minimum rate (after the first `body_timeout`).
    fn next_deadline(&self) -> Instant {
        let rate = self.limits.min_body_rate.max(1);
        let earned = Duration::from_secs_f64(self.received as f64 / rate as f64);
        let average = self.start + self.limits.body_timeout + earned;
        average.min(Instant::now() + self.limits.body_timeout)
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                let next = self.next_deadline();
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(TooSlow {
                    min_rate: self.limits.min_body_rate,
                    gap: self.limits.body_timeout,
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's I/O, ending writes that make no progress for `limit` (a client that does
/// not read its responses).
#[derive(Debug)]
struct StallGuard<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T, limit: Duration) -> Self {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `result` of a write-side poll, with the stall clock kept.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read its response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, result)
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
