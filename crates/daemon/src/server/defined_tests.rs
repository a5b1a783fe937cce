//! Pools and networks through the routes they share, over a real Unix socket: the same
//! answers, in the same words, as the API document says.

use std::path::{Path, PathBuf};

use http_unix::{Client, ClientResponse};
use tokio::net::UnixListener;

use crate::networks::Networks;
use crate::pools::Pools;
use crate::server::app::App;
use crate::server::http::{serve, Limits};
use crate::server::router;
use crate::vms::store::Store;
use crate::vms::supervisor::Supervisor;

/// The daemon's router over a state directory, served on a thread of its own.
struct Daemon {
    dir: tempfile::TempDir,
    client: Client,
    api: openapi_check::OpenApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// A daemon whose state directory `prepare` fills first.
    fn start(prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        prepare(&state);
        let sys_net = dir.path().join("sys-net");
        std::fs::create_dir(&sys_net).unwrap();
        let socket = dir.path().join("api.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let listening = socket.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let pools = std::sync::Arc::new(Pools::open(state.join("pools")).unwrap());
                let networks =
                    std::sync::Arc::new(Networks::open(state.join("networks"), sys_net).unwrap());
                let store = Store::open(&state).unwrap();
                let ferro = PathBuf::from("/nonexistent/ferro");
                let dirs = crate::vms::file_dirs::FileDirs::new(vec![state.clone()]);
                let vms =
                    Supervisor::new(store, ferro, pools.clone(), networks.clone(), dirs).unwrap();
                let app = router(App {
                    vms,
                    pools,
                    networks,
                });
                let listener = UnixListener::bind(&listening).unwrap();
                ready.send(()).unwrap();
                let stop = async {
                    let _ = stopped.await;
                };
                serve(listener, app, Limits::default(), stop).await;
            });
        });
        is_ready.recv().unwrap();
        let document =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/daemon.openapi.json");
        let api = openapi_check::OpenApi::parse(&std::fs::read_to_string(document).unwrap());
        Daemon {
            dir,
            client: Client::new(socket, Some(std::time::Duration::from_secs(10))),
            api: api.unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A request whose answer the API document allows.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> ClientResponse {
        let answer = self
            .client
            .request(method, path, body.map(str::as_bytes))
            .unwrap();
        let checked = self.api.check(method, path, answer.status, &answer.body);
        checked.unwrap_or_else(|e| panic!("{e}"));
        answer
    }

    /// A refusal: its status and message.
    fn refused(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let answer = self.call(method, path, body);
        let error: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        (answer.status, error["error"].as_str().unwrap().to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every step refused the same way for a pool and a network, `active` and `inactive` being
/// two of kind `kind` under `collection`; the inactive one is undefined at the end.
fn check_refusals(d: &Daemon, collection: &str, kind: &str, active: &str, inactive: &str) {
    let path = |name: &str, action: &str| format!("{collection}/{name}{action}");
    let conflict = |what: String| (409, what);
    let list = d.call("GET", collection, None);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&list.body).unwrap();
    let mut names: Vec<&str> = list
        .iter()
        .map(|info| info["definition"]["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let mut expected = [active, inactive];
    expected.sort_unstable();
    assert_eq!(names, expected, "{kind}");

    let nothing = (404, format!("no {kind} named \"nope\""));
    assert_eq!(d.refused("GET", &path("nope", ""), None), nothing);
    assert_eq!(d.refused("DELETE", &path("nope", ""), None), nothing);
    assert_eq!(d.refused("POST", &path("nope", "/start"), None), nothing);
    assert_eq!(d.refused("POST", &path("nope", "/stop"), None), nothing);
    let enable = Some(r#"{"enabled": true}"#);
    assert_eq!(
        d.refused("PUT", &path("nope", "/autostart"), enable),
        nothing
    );

    assert_eq!(
        d.refused("POST", &path(active, "/start"), None),
        conflict(format!("{kind} {active} is already active"))
    );
    assert_eq!(
        d.refused("DELETE", &path(active, ""), None),
        conflict(format!("{kind} {active} is active; stop it first"))
    );
    assert_eq!(
        d.refused("POST", &path(inactive, "/stop"), None),
        conflict(format!("{kind} {inactive} is not active"))
    );
    let (status, message) = d.refused("PUT", &path(inactive, "/autostart"), Some("{}"));
    assert_eq!(status, 400);
    assert!(message.contains("missing field `enabled`"), "{message}");

    let info = d.call("PUT", &path(inactive, "/autostart"), enable);
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["definition"]["autostart"], true, "{kind}");
    assert_eq!(info["state"], "inactive", "{kind}");
    let info = d.call("GET", &path(active, ""), None);
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["state"], "active", "{kind}");

    let gone = d.call("DELETE", &path(inactive, ""), None);
    assert_eq!((gone.status, gone.body.as_slice()), (204, &b""[..]));
    let again = (404, format!("no {kind} named \"{inactive}\""));
    assert_eq!(d.refused("DELETE", &path(inactive, ""), None), again);
}

#[test]
fn pools_and_networks_answer_alike() {
    let d = Daemon::start(|state| {
        // A network with a runtime directory is one a new daemon takes as active: nothing
        // on the host is changed to get one.
        let networks = state.join("networks");
        std::fs::create_dir_all(networks.join("lab.run")).unwrap();
        let lab = "name = \"lab\"\nmode = \"nat\"\nbridge = \"ferrotest9\"\n\
                   subnet = \"10.217.0.0/24\"\n";
        std::fs::write(networks.join("lab.toml"), lab).unwrap();
    });
    let pool_dir = d.dir.path().join("images");
    let pool = |name: &str| {
        let path = pool_dir.join(name);
        serde_json::json!({"name": name, "path": path}).to_string()
    };
    let pools = api::pool_api::paths::POOLS;
    for name in ["fast", "slow"] {
        assert_eq!(d.call("POST", pools, Some(&pool(name))).status, 201);
    }
    assert_eq!(d.call("POST", "/api/v1/pools/fast/start", None).status, 200);
    let taken = d.refused("POST", pools, Some(&pool("fast")));
    assert_eq!(taken, (409, "a pool named fast already exists".into()));

    let networks = api::net_api::paths::NETWORKS;
    let idle = r#"{"name": "idle", "mode": "isolated", "bridge": "ferrotest8",
                   "subnet": "10.218.0.0/24"}"#;
    assert_eq!(d.call("POST", networks, Some(idle)).status, 201);
    let taken = d.refused("POST", networks, Some(idle));
    assert_eq!(taken, (409, "a network named idle already exists".into()));

    check_refusals(&d, pools, "pool", "fast", "slow");
    check_refusals(&d, networks, "network", "lab", "idle");
}
