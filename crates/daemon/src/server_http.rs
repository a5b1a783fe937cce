//! The daemon's HTTP connections: the accept loop on its Unix socket, with the limits that keep
//! one client from holding the daemon (hyper's HTTP/1.1 serves each connection; the router
//! answers its requests):
//! - a request's head (and the wait for it on an idle keep-alive connection) must arrive whole
//!   within [`Limits::header_timeout`] (hyper's header read timeout, one deadline);
//! - its body must keep coming: no gap longer than [`Limits::body_timeout`], and on average at
//!   least [`Limits::min_body_rate`] after the first [`Limits::body_timeout`] (a 4 GiB upload at
//!   local speed is never near it, one byte a second is cut off within the timeout);
//! - a response the client does not read for [`Limits::write_stall`] ends the connection;
//! - at most [`Limits::max_connections`] connections are open; a new one past that closes the
//!   connection that has waited longest without a request in flight, or, when every one is busy
//!   with a request, is answered 503 and closed. So idle connections cannot use up the daemon's
//!   file descriptors nor lock a good client out.
//!
//! Threading: one task per connection on the daemon's runtime, plus the accept loop; the table
//! of connections is behind a mutex held for a few instructions at a time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, Instant, Sleep};

/// The bounds of one client (see the module's text).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes per second.
    pub min_body_rate: u64,
    pub write_stall: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(20),
            min_body_rate: 64 << 10,
            write_stall: Duration::from_secs(60),
            max_connections: 128,
        }
    }
}

/// One open connection: since when it has had no request in flight (None while one is), and
/// the way to close it.
#[derive(Debug)]
struct Open {
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

fn lock(table: &Shared) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Table {
    /// Makes room for one more connection: Some(id) for it, None when every open connection is
    /// busy. The connection idle longest is told to close.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Notify>)> {
        if self.open.len() >= max {
            let oldest = self
                .open
                .iter()
                .filter_map(|(id, open)| Some((*id, open.idle_since?)))
                .min_by_key(|(_, since)| *since)
                .map(|(id, _)| id)?;
            if let Some(evicted) = self.open.remove(&oldest) {
                evicted.close.notify_one();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        self.open.insert(
            id,
            Open {
                idle_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        Some((id, close))
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(open) = self.open.get_mut(&id) {
            open.idle_since = idle.then(Instant::now);
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then lets the
/// requests in flight finish (as axum's graceful shutdown does) and returns.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let table: Shared = Arc::default();
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => admit(stream, &router, limits, &table, stopping.clone()),
                Err(e) => {
                    // Out of descriptors, most likely: wait for connections to end.
                    tracing::warn!("cannot accept a connection: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection task holds a receiver: they are all done when the channel closes.
    drop(stopping);
    stop.closed().await;
}

/// Serves a new connection, or refuses it when every connection is busy.
fn admit(
    stream: UnixStream,
    router: &Router,
    limits: Limits,
    table: &Shared,
    stopping: watch::Receiver<bool>,
) {
    let Some((id, close)) = lock(table).admit(limits.max_connections) else {
        // Best effort, never waiting: a client that does not read gets the close alone.
        let _ = stream.try_write(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
              content-length: 53\r\nconnection: close\r\n\r\n\
              {\"error\":\"the daemon is busy with other clients; retry\"}",
        );
        return;
    };
    let router = router.clone();
    let table = table.clone();
    tokio::spawn(async move {
        serve_connection(stream, router, limits, &table, id, close, stopping).await;
        lock(&table).open.remove(&id);
    });
}

async fn serve_connection(
    stream: UnixStream,
    router: Router,
    limits: Limits,
    table: &Shared,
    id: u64,
    close: Arc<Notify>,
    mut stopping: watch::Receiver<bool>,
) {
    let service_table = table.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let table = service_table.clone();
        let router = TowerToHyperService::new(router.clone());
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
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::path::PathBuf;
    use std::time::Instant as StdInstant;

    use axum::routing::{get, post};

    use super::*;

    /// A server of a small router on a thread of its own, with `limits`.
    struct TestServer {
        _dir: tempfile::TempDir,
        path: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    fn router() -> Router {
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/echo",
                post(|body: Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/stream",
                get(|| async {
                    Body::from_stream(tokio_stream::pending::<Result<Bytes, Infallible>>())
                }),
            )
            .route("/big", get(|| async { vec![b'x'; 32 << 20] }))
    }

    impl TestServer {
        fn start(limits: Limits) -> TestServer {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("api.sock");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (ready, is_ready) = std::sync::mpsc::channel();
            let socket = path.clone();
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = UnixListener::bind(&socket).unwrap();
                    ready.send(()).unwrap();
                    // Dropped, not shut down gracefully: streams that never end would wait.
                    tokio::select! {
                        () = serve(listener, router(), limits, std::future::pending()) => {}
                        _ = stopped => {}
                    }
                });
            });
            is_ready.recv().unwrap();
            TestServer {
                _dir: dir,
                path,
                stop: Some(stop),
                thread: Some(thread),
            }
        }

        fn connect(&self) -> StdStream {
            StdStream::connect(&self.path).unwrap()
        }

        /// A whole request on a new connection: the response's text.
        fn get(&self, path: &str) -> String {
            let mut stream = self.connect();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nconnection: close\r\n\r\n").unwrap();
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            min_body_rate: 1000,
            write_stall: Duration::from_secs(1),
            max_connections: 8,
        }
    }

    /// Sends `head` at once, then one byte of `trickle` every `every` until the server closes
    /// the connection; how long that took (None: not within `give_up`).
    fn trickle(
        stream: &mut StdStream,
        head: &[u8],
        every: Duration,
        give_up: Duration,
    ) -> Option<Duration> {
        let start = StdInstant::now();
        stream.write_all(head).unwrap();
        stream.set_read_timeout(Some(every)).unwrap();
        let mut buffer = [0u8; 4096];
        while start.elapsed() < give_up {
            if stream.write_all(b"x").is_err() {
                return Some(start.elapsed());
            }
            match stream.read(&mut buffer) {
                Ok(0) => return Some(start.elapsed()),
                // An error answer comes before the close.
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(start.elapsed()),
            }
        }
        None
    }

    /// Whether the server still holds `stream` open (nothing to read yet, no end).
    fn still_open(stream: &mut StdStream) -> bool {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut byte = [0u8; 1];
        matches!(stream.read(&mut byte), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// A head that never ends, a byte every 100 ms: one deadline for the whole head cuts it
    /// off after the header timeout (1 s here), not at the first 1-second gap (never).
    #[test]
    fn a_head_sent_a_byte_at_a_time_is_cut_off() {
        let server = TestServer::start(limits());
        let mut stream = server.connect();
        let head = b"GET / HTTP/1.1\r\nx-slow: ";
        let closed = trickle(
            &mut stream,
            head,
            Duration::from_millis(100),
            Duration::from_secs(6),
        );
        let closed = closed.expect("a trickling head holds its connection");
        assert!(closed < Duration::from_millis(2500), "{closed:?}");
        assert!(server.get("/").ends_with("ok"));
    }

    /// A body at 10 bytes/s (the minimum is 1000) is cut off after about the body timeout; a
    /// fast one is taken whole.
    #[test]
    fn a_body_sent_a_byte_at_a_time_is_cut_off() {
        let server = TestServer::start(limits());
        let mut stream = server.connect();
        let head = b"POST /echo HTTP/1.1\r\ncontent-length: 100000\r\n\r\n";
        let closed = trickle(
            &mut stream,
            head,
            Duration::from_millis(100),
            Duration::from_secs(6),
        );
        let closed = closed.expect("a trickling body holds its connection");
        assert!(closed < Duration::from_millis(3000), "{closed:?}");

        let mut stream = server.connect();
        let body = vec![b'y'; 1 << 20];
        write!(
            stream,
            "POST /echo HTTP/1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(&body).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.ends_with(&body.len().to_string()), "{answer}");
    }

    /// Idle connections past the limit close the oldest idle ones: at most the limit stays
    /// open, and a client that comes after them is served at once (long before the header
    /// timeout would have freed anything).
    #[test]
    fn idle_connections_past_the_limit_make_room_for_a_good_client() {
        let server = TestServer::start(Limits {
            header_timeout: Duration::from_secs(30),
            max_connections: 4,
            ..limits()
        });
        let mut idle: Vec<StdStream> = (0..6)
            .map(|_| {
                let stream = server.connect();
                std::thread::sleep(Duration::from_millis(20));
                stream
            })
            .collect();
        let start = StdInstant::now();
        let answer = server.get("/");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let open: Vec<bool> = idle.iter_mut().map(still_open).collect();
        // The good client's connection took one place: the three newest idle ones remain.
        assert_eq!(open, [false, false, false, true, true, true]);
    }

    /// When every connection is busy with a request, a new one is answered 503 and closed.
    #[test]
    fn a_connection_past_the_limit_of_busy_ones_gets_503() {
        let server = TestServer::start(Limits {
            max_connections: 2,
            ..limits()
        });
        let busy: Vec<StdStream> = (0..2)
            .map(|_| {
                let mut stream = server.connect();
                stream.write_all(b"GET /stream HTTP/1.1\r\n\r\n").unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut head = [0u8; 12];
                stream.read_exact(&mut head).unwrap();
                assert_eq!(&head, b"HTTP/1.1 200");
                stream
            })
            .collect();
        let answer = server.get("/");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        drop(busy);
    }

    /// A client that does not read its response loses the connection once writes have made
    /// no progress for the write stall limit (1 s here).
    #[test]
    fn a_client_that_does_not_read_is_cut_off() {
        let server = TestServer::start(limits());
        let mut stream = server.connect();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nconnection: close\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        assert!(
            got.len() < 32 << 20,
            "the whole response came: {}",
            got.len()
        );
    }
}
