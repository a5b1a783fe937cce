//! Tests of the daemon's HTTP connection limits, over real Unix sockets.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::path::PathBuf;
use std::time::Instant as StdInstant;

use axum::routing::{get, post};
use axum::Extension;

use super::*;

/// A server of a small router on a thread of its own, with `limits`.
struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Told when `serve` returns.
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn never_ending() -> Body {
    Body::from_stream(tokio_stream::pending::<Result<Bytes, Infallible>>())
}

fn router() -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .route("/stream", get(|| async { never_ending() }))
        .route(
            "/long",
            get(|Extension(client): Extension<Client>| async move {
                client.long_lived(never_ending()).map_err(ApiError::from)
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
        let (returned, done) = std::sync::mpsc::channel();
        let socket = path.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = UnixListener::bind(&socket).unwrap();
                ready.send(()).unwrap();
                // A dropped sender stops it too.
                let stop = async {
                    let _ = stopped.await;
                };
                serve(listener, router(), limits, stop).await;
            });
            let _ = returned.send(());
        });
        is_ready.recv().unwrap();
        TestServer {
            _dir: dir,
            path,
            stop: Some(stop),
            done,
            thread: Some(thread),
        }
    }

    /// Stops the server: how long `serve` took to return (None: not within 10 s; its
    /// thread is left behind).
    fn shut_down(&mut self) -> Option<Duration> {
        let start = StdInstant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take()?;
        self.done.recv_timeout(Duration::from_secs(10)).ok()?;
        thread.join().unwrap();
        Some(start.elapsed())
    }

    /// A request for a response that does not end, on a new connection, its head read: the
    /// status line's first 12 bytes.
    fn open_stream(&self, path: &str) -> (StdStream, String) {
        let mut stream = self.connect();
        write!(stream, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        (stream, String::from_utf8_lossy(&head).into_owned())
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
        // A refused connection (503) is answered and closed at once: this write may meet a
        // closed socket, and the answer is read all the same.
        let _ = write!(stream, "GET {path} HTTP/1.1\r\nconnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// The `error` of a JSON error answer.
fn error_of(answer: &str) -> String {
    let (_, body) = answer.split_once("\r\n\r\n").unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    body["error"].as_str().unwrap_or_default().to_owned()
}

fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        min_body_rate: 1000,
        write_stall: Duration::from_secs(1),
        max_connections: 8,
        max_connections_per_user: 8,
        max_streams_per_user: 8,
        shutdown_grace: Duration::from_millis(500),
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

/// The time the table tests count from.
static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Admits a connection of `uid` at `at` seconds, busy or idle.
fn admit_at(table: &mut Table, uid: Uid, limits: &Limits, at: u64, busy: bool) -> u64 {
    let (id, _) = table
        .admit(uid, limits, *BASE + Duration::from_secs(at))
        .unwrap();
    if busy {
        table.set_idle(id, false);
    }
    id
}

fn uids(table: &Table) -> Vec<Uid> {
    let mut uids: Vec<Uid> = table.open.values().map(|open| open.uid).collect();
    uids.sort_unstable();
    uids
}

/// A user whose connections are all busy gets no more; another user still does.
#[test]
fn a_user_at_its_cap_is_refused_while_others_are_admitted() {
    let limits = Limits {
        max_connections: 8,
        max_connections_per_user: 2,
        ..limits()
    };
    let mut table = Table::default();
    admit_at(&mut table, 1000, &limits, 0, true);
    admit_at(&mut table, 1000, &limits, 0, true);
    let refused = table.admit(1000, &limits, Instant::now()).unwrap_err();
    assert_eq!(refused, Refused::UserFull { uid: 1000, max: 2 });
    assert!(table.admit(1001, &limits, Instant::now()).is_ok());
    assert_eq!(uids(&table), [1000, 1000, 1001]);
}

/// A user at its cap (and the table full) makes room by closing its own idle connection,
/// though another user's have been idle longer; with none idle it is refused, and the
/// other user keeps its connections.
#[test]
fn a_user_at_its_cap_closes_only_its_own_idle_connections() {
    let limits = Limits {
        max_connections: 4,
        max_connections_per_user: 2,
        ..limits()
    };
    let mut table = Table::default();
    let other = [
        admit_at(&mut table, 1001, &limits, 0, false),
        admit_at(&mut table, 1001, &limits, 0, false),
    ];
    admit_at(&mut table, 1000, &limits, 1, true);
    let own_idle = admit_at(&mut table, 1000, &limits, 1, false);
    let newest = admit_at(&mut table, 1000, &limits, 2, true);
    assert!(!table.open.contains_key(&own_idle));
    assert!(table.open.contains_key(&newest));
    assert!(other.iter().all(|id| table.open.contains_key(id)));

    let refused = table.admit(1000, &limits, Instant::now());
    assert!(
        matches!(refused, Err(Refused::UserFull { uid: 1000, .. })),
        "{refused:?}"
    );
    assert_eq!(uids(&table), [1000, 1000, 1001, 1001]);
}

/// Past the global cap, the idle connection closed is one of the user with the most
/// connections, not the one idle longest overall (another user's).
#[test]
fn past_the_global_cap_the_heaviest_users_idle_connection_goes() {
    let limits = Limits {
        max_connections: 4,
        max_connections_per_user: 3,
        ..limits()
    };
    let mut table = Table::default();
    let light = admit_at(&mut table, 1001, &limits, 0, false);
    admit_at(&mut table, 1000, &limits, 1, true);
    let heavy_oldest = admit_at(&mut table, 1000, &limits, 2, false);
    let heavy_newest = admit_at(&mut table, 1000, &limits, 3, false);
    admit_at(&mut table, 1002, &limits, 4, false);
    assert!(table.open.contains_key(&light));
    assert!(!table.open.contains_key(&heavy_oldest));
    assert!(table.open.contains_key(&heavy_newest));
    assert_eq!(uids(&table), [1000, 1000, 1001, 1002]);
}

/// Over the socket (every connection here is this test's uid): with room left overall, a
/// user's connection past its cap of busy ones gets 503 saying what to do.
#[test]
fn a_users_connection_past_its_cap_gets_503_saying_why() {
    let server = TestServer::start(Limits {
        max_connections: 8,
        max_connections_per_user: 2,
        ..limits()
    });
    let busy: Vec<StdStream> = (0..2)
        .map(|_| {
            let (stream, head) = server.open_stream("/stream");
            assert_eq!(head, "HTTP/1.1 200");
            stream
        })
        .collect();
    let answer = server.get("/");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let error = error_of(&answer);
    assert!(
        error.contains("uid") && error.contains("close some"),
        "{error}"
    );
    drop(busy);
}

/// A user's long-lived responses past its cap get 429 (its other requests are served);
/// one that ends gives its place back.
#[test]
fn a_stream_past_the_users_cap_gets_429() {
    let server = TestServer::start(Limits {
        max_streams_per_user: 2,
        ..limits()
    });
    let mut streams: Vec<StdStream> = (0..2)
        .map(|_| {
            let (stream, head) = server.open_stream("/long");
            assert_eq!(head, "HTTP/1.1 200");
            stream
        })
        .collect();
    let answer = server.get("/long");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(error_of(&answer).contains("close one"), "{answer}");
    // As the API document says the event stream answers.
    let document =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/daemon.openapi.json");
    let api = openapi_check::OpenApi::parse(&std::fs::read_to_string(document).unwrap());
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    api.unwrap()
        .check("GET", "/api/v1/events", 429, body.as_bytes())
        .unwrap();
    assert!(server.get("/").ends_with("ok"));

    streams.pop();
    let deadline = StdInstant::now() + Duration::from_secs(3);
    loop {
        let (stream, head) = server.open_stream("/long");
        if head == "HTTP/1.1 200" {
            streams.push(stream);
            break;
        }
        assert!(StdInstant::now() < deadline, "the place was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On stop, a long-lived response ends cleanly at once (not after the grace period).
#[test]
fn on_stop_long_lived_responses_end_at_once() {
    let mut server = TestServer::start(Limits {
        shutdown_grace: Duration::from_secs(5),
        ..limits()
    });
    let (mut stream, head) = server.open_stream("/long");
    assert_eq!(head, "HTTP/1.1 200");
    let took = server.shut_down().expect("serve returns");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.ends_with("0\r\n\r\n"), "{rest}");
}

/// On stop, connections still busy after the grace period (a response that never ends, a
/// client that does not read) are closed and `serve` returns.
#[test]
fn on_stop_connections_left_after_the_grace_period_are_closed() {
    let mut server = TestServer::start(Limits {
        header_timeout: Duration::from_secs(30),
        write_stall: Duration::from_secs(30),
        shutdown_grace: Duration::from_millis(500),
        ..limits()
    });
    let (mut endless, head) = server.open_stream("/stream");
    assert_eq!(head, "HTTP/1.1 200");
    let mut unread = server.connect();
    unread
        .write_all(b"GET /big HTTP/1.1\r\nconnection: close\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let took = server.shut_down().expect("serve returns");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    for stream in [&mut endless, &mut unread] {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        // The end (or a reset), not the read timeout.
        if let Err(e) = stream.read_to_end(&mut got) {
            assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{e}"
            );
        }
        assert!(got.len() < 32 << 20);
    }
}
