//! The daemon and its CLI, end to end on the local /dev/kvm with a tiny guest (it prints "up",
//! waits for the ACPI power button, prints "bye" and powers off): define, start, console log,
//! suspend/resume, stats, shutdown, destroy, undefine; a daemon restart that finds its VMs
//! again; a SIGKILLed VMM reported as crashed; autostart; bad input and racing clients. Every
//! daemon response the tests read is checked against docs/api/daemon.openapi.json.
//!
//! Needs /dev/kvm; FERRO_SKIP_KVM_TESTS=1 skips.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::daemon_api::{paths, DomainState, VmDetails, VmStats, VmSummary};
use arch::test_images::{self, asm};
use http_unix::Client;
use openapi_check::OpenApi;

fn kvm_tests_enabled() -> bool {
    std::env::var_os("FERRO_SKIP_KVM_TESTS").is_none()
}

fn ferro() -> &'static str {
    env!("CARGO_BIN_EXE_ferro")
}

/// A daemon on a temporary socket and state directory.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    api: OpenApi,
    /// Runs in a network namespace of its own (and its VMMs and dnsmasq with it).
    own_netns: bool,
    /// Environment the daemon (and so its VMMs) gets.
    env: Vec<(&'static str, &'static str)>,
}

impl Daemon {
    fn start() -> Daemon {
        Self::start_with(false)
    }

    /// A daemon in a network namespace of its own, for tests that make network interfaces;
    /// `None` (the test is skipped) where that is not possible (not root, no unshare) or the
    /// tools of nat networks (nft, dnsmasq) or KVM are missing.
    fn start_in_own_netns() -> Option<Daemon> {
        let usable = Command::new("unshare")
            .args(["-n", "true"])
            .status()
            .is_ok_and(|s| s.success());
        let tools = ["nft", "dnsmasq", "ip", "nsenter"].iter().all(|tool| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|dir| Path::new(dir).join(tool).exists())
        });
        if !usable || !tools || !kvm_tests_enabled() {
            eprintln!("skipped: needs root (unshare -n), nft, dnsmasq, ip, nsenter and KVM");
            return None;
        }
        Some(Self::start_with(true))
    }

    fn start_with(own_netns: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let api = OpenApi::parse(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/daemon.openapi.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut daemon = Daemon {
            dir,
            child: None,
            api,
            own_netns,
            env: Vec::new(),
        };
        daemon.restart();
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("ferro.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the daemon process (again) and waits for its socket.
    fn restart(&mut self) {
        self.stop();
        let mut command = if self.own_netns {
            let mut unshare = Command::new("unshare");
            unshare.args(["-n", ferro()]);
            unshare
        } else {
            Command::new(ferro())
        };
        let child = command
            .args(["daemon", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            // The tests' kernels and disks are in the test's directory.
            .arg("--file-dir")
            .arg(self.dir.path())
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::new(self.socket(), None)
            .request("GET", paths::VMS, None)
            .is_err()
        {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would (VMs keep running).
    fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Stops the daemon with SIGTERM (VMs keep running).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = host_sys::signal::kill(child.id(), libc::SIGTERM);
            let status = child.wait().unwrap();
            assert!(status.success(), "daemon exit: {status}");
        }
    }

    /// Runs `ferro ARGS` against this daemon: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(ferro())
            .args(args)
            .env("FERRO_SOCKET", self.socket())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `ferro ARGS` against this daemon without waiting for it (stdout piped).
    fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new(ferro())
            .args(args)
            .env("FERRO_SOCKET", self.socket())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.cli(args);
        assert_eq!(code, 0, "ferro {args:?}: {stdout}{stderr}");
        stdout
    }

    /// Expects exit `code` and one `ferro: error:` line containing `message`.
    fn fails(&self, args: &[&str], code: i32, message: &str) {
        let (got, stdout, stderr) = self.cli(args);
        assert_eq!(got, code, "ferro {args:?}: {stdout}{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("ferro: error:"))
            .collect();
        assert!(
            errors.len() == 1 && errors[0].contains(message),
            "ferro {args:?}: expected one error with {message:?}, got {stderr:?}"
        );
    }

    /// Runs `args` in the daemon's network namespace: (success, stdout and stderr).
    fn in_netns(&self, args: &[&str]) -> (bool, String) {
        assert!(self.own_netns);
        let pid = self.child.as_ref().unwrap().id().to_string();
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-n", "--"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The interfaces on `bridge`, in the daemon's network namespace.
    fn bridge_ports(&self, bridge: &str) -> Vec<String> {
        let (ok, out) = self.in_netns(&["ip", "-o", "link", "show", "master", bridge]);
        assert!(ok, "{out}");
        let mut ports: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect();
        ports.sort();
        ports
    }

    /// A raw API request, checked against the OpenAPI document.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> http_unix::ClientResponse {
        let client = Client::new(self.socket(), Some(Duration::from_secs(60)));
        let response = client.request(method, path, body).unwrap();
        self.api
            .check(method, path, response.status, &response.body)
            .unwrap();
        response
    }

    fn details(&self, name: &str) -> VmDetails {
        let response = self.call("GET", &paths::vm(name), None);
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).unwrap()
    }

    fn wait_for_state(&self, name: &str, state: DomainState) -> VmDetails {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let details = self.details(name);
            if details.state == state {
                return details;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {:?}, not {state:?}",
                details.state
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the VMM `pid` of `name` and expects it reported crashed with `reason`.
    fn kill_vmm_and_expect_crash(&self, name: &str, pid: u32, reason: &str) {
        host_sys::signal::kill(pid, libc::SIGKILL).unwrap();
        let crashed = self.wait_for_state(name, DomainState::Crashed);
        let got = crashed.reason.clone().unwrap_or_default();
        assert!(got.contains(reason), "{crashed:?}");
    }

    fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.details(name).console_log).unwrap_or_default()
    }

    fn wait_for_console(&self, name: &str, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.console_log(name).matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {text:?} x{count} in {:?}",
                self.console_log(name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A definition of a guest that prints "up" and halts for good: it ignores the power button.
    fn deaf_definition(&self, name: &str) -> PathBuf {
        let code = asm::program(&[&asm::serial(b"up\n")]);
        self.definition_with(name, "deaf-kernel", &code, "")
    }

    /// Writes a definition of the tiny guest (it prints "up", waits for the power button, prints
    /// "bye" and powers off) and returns its path.
    fn definition(&self, name: &str, extra: &str) -> PathBuf {
        let code = asm::program(&[
            &asm::serial(b"up\n"),
            asm::WAIT_FOR_POWER_BUTTON,
            &asm::serial(b"bye\n"),
            asm::POWEROFF,
        ]);
        self.definition_with(name, "kernel", &code, extra)
    }

    /// Writes the kernel file `kernel` running `code` (once) and a definition using it.
    fn definition_with(&self, name: &str, kernel: &str, code: &[u8], extra: &str) -> PathBuf {
        let kernel = self.dir.path().join(kernel);
        if !kernel.exists() {
            std::fs::write(&kernel, test_images::bzimage(code)).unwrap();
        }
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nmemory = \"128M\"\nkernel = \"{}\"\n{extra}",
            kernel.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Leave no VMM behind: destroy whatever runs, then stop the daemon.
        if self.child.is_some() {
            let client = Client::new(self.socket(), Some(Duration::from_secs(30)));
            if let Ok(list) = client.request("GET", paths::VMS, None) {
                let vms: Vec<VmSummary> = serde_json::from_slice(&list.body).unwrap_or_default();
                for vm in vms {
                    let _ = client.request("POST", &paths::vm_action(&vm.name, "destroy"), None);
                }
            }
            // dnsmasq outlives its daemon: stop the networks.
            let networks = api::net_api::paths::NETWORKS;
            if let Ok(list) = client.request("GET", networks, None) {
                let list: Vec<api::net_api::NetworkInfo> =
                    serde_json::from_slice(&list.body).unwrap_or_default();
                for network in list {
                    let name = &network.definition.name;
                    let stop = format!("{}/stop", api::net_api::paths::network(name));
                    let _ = client.request("POST", &stop, None);
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pool_snapshots_path(pool: &str, volume: &str) -> String {
    api::pool_api::paths::snapshots(pool, volume)
}

/// The config the daemon handed the running VM `name`'s VMM (`run/NAME/vm.json`).
fn running_config(d: &Daemon, name: &str) -> api::VmConfig {
    let path = d.state_dir().join(format!("run/{name}/vm.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn lifecycle_through_the_cli() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let file = d.definition("tiny", "");
    assert!(d
        .ok(&["vm", "define", file.to_str().unwrap()])
        .contains("VM tiny defined"));
    let list: Vec<VmSummary> = serde_json::from_str(&d.ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!((list.len(), list[0].state), (1, DomainState::Shutoff));
    assert!(d.ok(&["vm", "list"]).contains("tiny"));

    d.ok(&["vm", "start", "tiny"]);
    let running = d.details("tiny");
    assert_eq!(running.state, DomainState::Running);
    let pid = running.pid.unwrap();
    assert!(pid_alive(pid));
    d.wait_for_console("tiny", "up", 1);

    d.ok(&["vm", "suspend", "tiny"]);
    assert_eq!(d.details("tiny").state, DomainState::Paused);
    d.fails(&["vm", "shutdown", "tiny"], 4, "paused");
    d.ok(&["vm", "resume", "tiny"]);
    assert_eq!(d.details("tiny").state, DomainState::Running);

    let stats: VmStats = serde_json::from_str(&d.ok(&["vm", "stats", "tiny", "--json"])).unwrap();
    assert_eq!(stats.vcpu_time_ns.len(), 1);
    assert!(stats.rss_bytes > 0 && stats.memory_bytes == 128 << 20);
    assert!(stats.counters.vcpus[0].exits["io_in"] > 0, "{stats:?}");
    d.call("GET", &paths::vm_action("tiny", "stats"), None);

    // The stall report: the guest waits in a loop of port reads, its one vCPU answers.
    let report: api::diagnostics::VmDiagnostics =
        serde_json::from_str(&d.ok(&["vm", "diagnose", "tiny", "--json"])).unwrap();
    assert_eq!(report.vcpus.len(), 1);
    assert!(report.vcpus[0].registers.is_some(), "{report:?}");
    let text = d.ok(&["vm", "diagnose", "tiny"]);
    assert!(text.starts_with("VM tiny: running"), "{text}");
    assert!(
        text.contains("vCPU 0: runnable") && text.contains("IOAPIC"),
        "{text}"
    );
    let diagnostics = d.call("GET", &paths::vm_action("tiny", "diagnostics"), None);
    assert_eq!(diagnostics.status, 200);

    // A live console client sees what the guest prints from now on, and ends with the VM.
    let console = Command::new(ferro())
        .args(["vm", "console", "tiny"])
        .env("FERRO_SOCKET", d.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // let it connect
                                                    // The guest waits for the power button: shutdown is graceful.
    assert!(d.ok(&["vm", "shutdown", "tiny"]).contains("shut down"));
    let seen = console.wait_with_output().unwrap();
    assert!(seen.status.success());
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "bye\n");
    let off = d.details("tiny");
    assert_eq!(off.state, DomainState::Shutoff);
    assert_eq!(off.reason.as_deref(), Some("powered-off"));
    assert!(d.console_log("tiny").contains("up\nbye\n"));
    assert!(!pid_alive(pid));

    d.ok(&["vm", "start", "tiny"]);
    d.wait_for_console("tiny", "up", 2);
    let pid = d.details("tiny").pid.unwrap();
    // A reboot asks the guest (power button): it powers off, and the daemon starts it again.
    assert!(d.ok(&["vm", "reboot", "tiny"]).contains("VM tiny rebooted"));
    let rebooted = d.details("tiny");
    assert_eq!(rebooted.state, DomainState::Running);
    assert_ne!(rebooted.pid, Some(pid), "a new VMM runs the rebooted VM");
    assert!(d.console_log("tiny").contains("up\nbye\nup\nbye\n"));
    d.wait_for_console("tiny", "up", 3);
    // A reset is the hard one: the same VMM boots the guest again.
    d.ok(&["vm", "reset", "tiny"]);
    d.wait_for_console("tiny", "up", 4);
    assert_eq!(d.details("tiny").pid, rebooted.pid);
    d.ok(&["vm", "destroy", "tiny"]);
    assert_eq!(d.details("tiny").state, DomainState::Shutoff);
    d.ok(&["vm", "undefine", "tiny"]);
    d.fails(&["vm", "info", "tiny"], 3, "no VM named \"tiny\"");
    assert!(!d.state_dir().join("vms/tiny.toml").exists());
}

#[test]
fn daemon_restart_crash_and_autostart() {
    if !kvm_tests_enabled() {
        return;
    }
    let mut d = Daemon::start();
    let limited = d.definition("keep", "rng = true\nrng_bytes_per_sec = 4096\n");
    d.ok(&["vm", "define", limited.to_str().unwrap()]);
    d.ok(&[
        "vm",
        "define",
        d.definition("auto", "autostart = true\n").to_str().unwrap(),
    ]);
    d.wait_for_state("auto", DomainState::Shutoff);
    d.ok(&["vm", "start", "keep"]);
    let pid = d.details("keep").pid.unwrap();
    // The VMM logs into a file it caps itself.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let log = d.state_dir().join("run/keep/vmm.log");
    let wanted = format!("--log-file\0{}\0", log.display());
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains(&wanted), "{cmdline:?}");
    // The VM itself is one file the daemon wrote, mode 0600.
    let config_path = d.state_dir().join("run/keep/vm.json");
    assert!(
        cmdline.contains(&format!("run\0--config\0{}\0", config_path.display())),
        "{cmdline:?}"
    );
    let config = running_config(&d, "keep");
    assert_eq!(config.rng_bytes_per_sec, Some(4096));
    let mode = std::fs::metadata(&config_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The daemon goes away and comes back: the VM ran on and is managed again; autostart
    // starts the other one.
    d.stop();
    assert!(pid_alive(pid), "stopping the daemon killed a VM");
    d.restart();
    let found = d.details("keep");
    assert_eq!((found.state, found.pid), (DomainState::Running, Some(pid)));
    d.wait_for_state("auto", DomainState::Running);
    d.ok(&["vm", "suspend", "keep"]);
    // A daemon that crashes leaves its VMs (and a stale socket) behind; the next one copes.
    d.crash();
    assert!(pid_alive(pid), "a crashing daemon took a VM down");
    d.restart();
    assert_eq!(d.details("keep").state, DomainState::Paused);
    d.ok(&["vm", "resume", "keep"]);

    // A VMM killed behind the daemon's back is a crash, with the reason: an adopted VMM is
    // not the daemon's child, so its exit status is unknown; a VMM it started is.
    d.kill_vmm_and_expect_crash("keep", pid, "without saying why");
    assert!(
        !d.state_dir().join("run/keep").exists(),
        "runtime files were cleaned up"
    );
    assert!(
        d.state_dir().join("logs/keep.console.vmm.log").exists(),
        "the VMM's log is kept"
    );
    // A crashed VM can be started again.
    d.ok(&["vm", "start", "keep"]);
    let pid = d.details("keep").pid.unwrap();
    d.kill_vmm_and_expect_crash("keep", pid, "killed by signal 9");
    d.ok(&["vm", "start", "keep"]);

    // Killed while no daemon watches: found crashed at the next start.
    let pid = d.details("keep").pid.unwrap();
    d.stop();
    host_sys::signal::kill(pid, libc::SIGKILL).unwrap();
    while pid_alive(pid) {
        std::thread::sleep(Duration::from_millis(10));
    }
    d.restart();
    let crashed = d.details("keep");
    assert_eq!(crashed.state, DomainState::Crashed, "{crashed:?}");
    assert!(crashed.reason.unwrap().contains("without saying why"));

    d.ok(&["vm", "autostart", "auto", "--disable"]);
    assert!(!d.details("auto").definition.autostart);
    let text = std::fs::read_to_string(d.state_dir().join("vms/auto.toml")).unwrap();
    assert!(text.contains("autostart = false"), "{text}");
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nkernel = \"/k\"\ncpu = 2\n").unwrap();
    d.fails(
        &["vm", "define", bad.to_str().unwrap()],
        2,
        "unknown field `cpu`",
    );
    std::fs::write(&bad, "name = \"../x\"\nkernel = \"/k\"\n").unwrap();
    d.fails(
        &["vm", "define", bad.to_str().unwrap()],
        2,
        "invalid VM name",
    );
    std::fs::write(&bad, "name = \"x\"\nkernel = \"/k\"\nrng_period_ms = 5\n").unwrap();
    d.fails(&["vm", "define", bad.to_str().unwrap()], 2, "they need rng");
    std::fs::write(
        &bad,
        "name = \"x\"\nkernel = \"/k\"\nrng = true\nrng_bytes_per_sec = 0\n",
    )
    .unwrap();
    d.fails(
        &["vm", "define", bad.to_str().unwrap()],
        2,
        "virtio-rng: option bytes_per_sec: must be at least 1",
    );
    std::fs::write(&bad, "name = \"x\"\nkernel = \"/nonexistent/kernel\"\n").unwrap();
    d.fails(
        &["vm", "define", bad.to_str().unwrap()],
        2,
        "/nonexistent/kernel",
    );
    d.fails(&["vm", "start", "ghost"], 3, "no VM named \"ghost\"");

    let file = d.definition("one", "");
    d.ok(&["vm", "define", file.to_str().unwrap()]);
    // Defining it again updates it (as virsh define does).
    assert!(d
        .ok(&["vm", "define", file.to_str().unwrap()])
        .contains("VM one updated"));
    d.fails(&["vm", "suspend", "one"], 4, "not running");
    d.ok(&["vm", "start", "one"]);
    d.fails(&["vm", "start", "one"], 4, "already running");
    d.fails(
        &["vm", "undefine", "one"],
        4,
        "destroy or shut it down first",
    );
    d.ok(&["vm", "destroy", "one"]);

    // The kernel vanished since the VM was defined: the definition is wrong (exit 2), not
    // the VM's state.
    let kernel = d.dir.path().join("kernel");
    std::fs::rename(&kernel, kernel.with_extension("moved")).unwrap();
    d.fails(&["vm", "start", "one"], 2, "No such file or directory");
    assert_eq!(d.details("one").state, DomainState::Shutoff);
    std::fs::rename(kernel.with_extension("moved"), &kernel).unwrap();

    // Files outside the daemon's --file-dir and the pools are refused, at define and start:
    // defining a VM must not be a way to read any file on the host.
    let outside = tempfile::tempdir().unwrap();
    let elsewhere = outside.path().join("kernel");
    std::fs::copy(&kernel, &elsewhere).unwrap();
    let refused = "outside the directories VM files may be in";
    for (name, extra) in [
        ("shadow", "kernel = \"/etc/passwd\"\n".to_string()),
        ("far", format!("kernel = \"{}\"\n", elsewhere.display())),
        (
            "disk",
            format!(
                "[[disks]]\npath = \"{}\"\nformat = \"raw\"\n",
                elsewhere.display()
            ),
        ),
    ] {
        let file = d.definition(name, "");
        let text = std::fs::read_to_string(&file).unwrap();
        // A later `kernel =` line would be a duplicate key: replace the test's own.
        let text = if extra.starts_with("kernel") {
            text.lines()
                .filter(|l| !l.starts_with("kernel"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                + &extra
        } else {
            text + &extra
        };
        std::fs::write(&file, text).unwrap();
        d.fails(&["vm", "define", file.to_str().unwrap()], 2, refused);
    }
    // The defined VM's kernel becomes a link out of the directory: the start refuses it.
    std::fs::rename(&kernel, kernel.with_extension("real")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &kernel).unwrap();
    d.fails(&["vm", "start", "one"], 2, refused);
    std::fs::remove_file(&kernel).unwrap();
    std::fs::rename(kernel.with_extension("real"), &kernel).unwrap();

    // Raw API: malformed JSON and a client that hangs up mid-request.
    let response = d.call("POST", paths::VMS, Some(b"{\"name\": "));
    assert_eq!(response.status, 400, "{}", response.text());
    let mut quitter = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    std::io::Write::write_all(
        &mut quitter,
        b"POST /api/v1/vms/one/start HTTP/1.1\r\nContent-Le",
    )
    .unwrap();
    drop(quitter);

    // Two clients race to start the same VM: one wins, the other is told why it lost.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| d.cli(&["vm", "start", "one"]));
        let b = s.spawn(|| d.cli(&["vm", "start", "one"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let codes = [a.0, b.0];
    assert!(codes.contains(&0) && codes.contains(&4), "{a:?} {b:?}");
    assert_eq!(d.details("one").state, DomainState::Running);
    d.ok(&["vm", "destroy", "one"]);
    let list: Vec<VmSummary> =
        serde_json::from_slice(&d.call("GET", paths::VMS, None).body).unwrap();
    assert_eq!(list.len(), 1, "nothing else was defined");
}

/// A VMM that makes a system call outside its thread's seccomp filter dies of SIGSYS; the
/// daemon reports the VM crashed with the call and the thread kind, in `vm info` and in the
/// `crashed` event.
#[test]
fn a_seccomp_violation_is_reported_as_the_crash_reason() {
    if !kvm_tests_enabled() {
        return;
    }
    let mut d = Daemon::start();
    // The daemon's VMMs inherit its environment: `ferro run --fault` from FERRO_FAULT.
    d.env = vec![("FERRO_FAULT", "forbidden-syscall")];
    d.restart();
    let mut events = Command::new(ferro())
        .args(["events", "--json"])
        .env("FERRO_SOCKET", d.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // let it subscribe
    d.ok(&["vm", "define", d.definition("sys", "").to_str().unwrap()]);
    let said = "seccomp: the vcpu thread made system call socket (41), which its filter does not \
                allow; the VMM was killed (SIGSYS)";
    // The VMM may die before the start is confirmed: then the start fails with the reason.
    let (code, _, stderr) = d.cli(&["vm", "start", "sys"]);
    assert!(code == 0 || stderr.contains(said), "{code}: {stderr}");
    let crashed = d.wait_for_state("sys", DomainState::Crashed);
    assert_eq!(crashed.reason.as_deref(), Some(said), "{crashed:?}");
    assert!(d.ok(&["vm", "info", "sys"]).contains(said));
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let crash = loop {
        let event: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if event["kind"] == "crashed" {
            break event;
        }
    };
    assert_eq!(crash["detail"], said);
    events.kill().unwrap();
    events.wait().unwrap();
}

#[test]
fn host_info_and_events() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let host = d.ok(&["host", "info"]);
    assert!(host.contains("KVM:") && host.contains("VMs:"), "{host}");
    d.call("GET", paths::HOST, None);
    let mut events = Command::new(ferro())
        .args(["events", "--json"])
        .env("FERRO_SOCKET", d.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // let it subscribe
    d.ok(&["vm", "define", d.definition("ev", "").to_str().unwrap()]);
    d.ok(&["vm", "start", "ev"]);
    d.ok(&["vm", "destroy", "ev"]);
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let line = lines.next().unwrap().unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        d.api.check_schema("Event", &event).unwrap();
        kinds.push(event["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["defined", "started", "stopped"]);
    // A user may hold 8 event streams; the 9th is refused with what to do.
    let mut more: Vec<_> = (0..7)
        .map(|_| {
            Command::new(ferro())
                .args(["events"])
                .env("FERRO_SOCKET", d.socket())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // let them subscribe
    d.fails(
        &["events"],
        1,
        "event streams open, the most one user may have: close one",
    );
    for child in more.iter_mut().chain([&mut events]) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let completions = d.ok(&["completions", "bash"]);
    assert!(completions.contains("ferro") && completions.contains("undefine"));
}

#[test]
fn a_failed_write_under_the_state_directory_loses_nothing() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    d.ok(&["vm", "define", d.definition("one", "").to_str().unwrap()]);
    let vms = d.state_dir().join("vms");
    let before = std::fs::read_to_string(vms.join("one.toml")).unwrap();
    // The daemon writes a definition to NAME.toml.tmp, made afresh (what is there is removed,
    // never followed), and renames it over NAME.toml; a directory in the way makes that write
    // fail, as a full disk would.
    let block = |name: &str| {
        let dir = vms.join(format!("{name}.toml.tmp"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("x"), b"").unwrap();
        dir
    };
    let blocked = block("one");
    d.fails(&["vm", "autostart", "one"], 1, "cannot write");
    assert_eq!(
        std::fs::read_to_string(vms.join("one.toml")).unwrap(),
        before
    );
    assert!(
        !d.details("one").definition.autostart,
        "the daemon kept the old state"
    );
    let blocked_two = block("two");
    d.fails(
        &["vm", "define", d.definition("two", "").to_str().unwrap()],
        1,
        "cannot write",
    );
    assert!(!vms.join("two.toml").exists());
    d.fails(&["vm", "info", "two"], 3, "no VM named");
    // Once the way is clear again, both work.
    std::fs::remove_dir_all(blocked).unwrap();
    std::fs::remove_dir_all(blocked_two).unwrap();
    d.ok(&["vm", "autostart", "one"]);
    d.ok(&["vm", "define", d.definition("two", "").to_str().unwrap()]);
}

/// Every operation of the daemon's API, called directly, each response checked against the
/// OpenAPI document (the CLI tests go through typed clients).
#[test]
fn every_route_answers_as_documented() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let kernel_file = d.definition("api", "");
    let definition =
        api::definition_file::parse_vm(&std::fs::read_to_string(kernel_file).unwrap()).unwrap();
    let body = serde_json::to_vec(&definition).unwrap();
    let status = |method: &str, path: &str, body: Option<&[u8]>| d.call(method, path, body).status;
    assert_eq!(status("POST", paths::VMS, Some(&body)), 201);
    assert_eq!(status("POST", paths::VMS, Some(&body)), 200);
    assert_eq!(status("POST", paths::VMS, Some(b"{\"name\": \"x\"}")), 400);
    assert_eq!(status("GET", paths::VMS, None), 200);
    assert_eq!(status("GET", &paths::vm("api"), None), 200);
    assert_eq!(status("GET", &paths::vm("nope"), None), 404);
    let action = |name: &str, what: &str| paths::vm_action(name, what);
    assert_eq!(status("POST", &action("api", "suspend"), None), 409);
    assert_eq!(status("GET", &action("api", "stats"), None), 409);
    assert_eq!(status("GET", &action("api", "diagnostics"), None), 409);
    assert_eq!(status("GET", &action("nope", "diagnostics"), None), 404);
    assert_eq!(status("POST", &action("api", "start"), None), 200);
    assert_eq!(status("POST", &action("api", "start"), None), 409);
    assert_eq!(status("GET", &action("api", "stats"), None), 200);
    assert_eq!(status("POST", &action("api", "suspend"), None), 200);
    assert_eq!(status("POST", &action("api", "resume"), None), 200);
    assert_eq!(status("POST", &action("api", "reboot"), None), 200);
    assert_eq!(status("POST", &action("api", "reset"), None), 200);
    assert_eq!(
        status("POST", &action("api", "reboot"), Some(b"{\"wait\": 1}")),
        400
    );
    assert_eq!(
        status(
            "PUT",
            &action("api", "autostart"),
            Some(b"{\"enabled\": true}")
        ),
        200
    );
    assert_eq!(
        status("PUT", &action("api", "autostart"), Some(b"{\"on\": 1}")),
        400
    );
    assert_eq!(status("DELETE", &paths::vm("api"), None), 409);
    assert_eq!(
        status(
            "POST",
            &action("api", "shutdown"),
            Some(b"{\"timeout_secs\": 30}")
        ),
        200
    );
    assert_eq!(status("POST", &action("api", "destroy"), None), 409);
    assert_eq!(status("GET", paths::HOST, None), 200);
    let wrong = Client::new(d.socket(), None)
        .request("PUT", paths::HOST, None)
        .unwrap();
    assert_eq!(wrong.status, 405);
    let body: serde_json::Value = serde_json::from_slice(&wrong.body).unwrap();
    d.api.check_schema("Error", &body).unwrap();
    assert_eq!(status("DELETE", &paths::vm("api"), None), 204);
    assert_eq!(status("DELETE", &paths::vm("api"), None), 404);
}

#[test]
fn a_guest_that_ignores_the_power_button_is_reported_still_running() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    d.ok(&["vm", "define", d.deaf_definition("deaf").to_str().unwrap()]);
    d.ok(&["vm", "start", "deaf"]);
    d.wait_for_console("deaf", "up", 1);
    d.fails(
        &["vm", "shutdown", "deaf", "--timeout", "1"],
        4,
        "still running 1 s after the power button was pressed",
    );
    assert_eq!(d.details("deaf").state, DomainState::Running);
    // A reboot it ignores leaves it running, with no restart armed.
    d.fails(
        &["vm", "reboot", "deaf", "--timeout", "1"],
        4,
        "did not power off to reboot",
    );
    assert_eq!(d.details("deaf").state, DomainState::Running);
    // --timeout 0: press the button and return.
    let pressed = d.ok(&["vm", "shutdown", "deaf", "--timeout", "0"]);
    assert!(pressed.contains("power button was pressed"), "{pressed}");
    assert_eq!(d.details("deaf").state, DomainState::ShuttingDown);
    d.ok(&["vm", "destroy", "deaf"]);
    let off = d.details("deaf");
    assert_eq!(off.state, DomainState::Shutoff);
    assert_eq!(off.reason.as_deref(), Some("destroyed"));

    // A waiting shutdown holds nothing: destroy goes through at once, and the waiting client
    // hears how its VM ended.
    d.ok(&["vm", "start", "deaf"]);
    let waiting = d.spawn_cli(&["vm", "shutdown", "deaf", "--timeout", "120"]);
    d.wait_for_state("deaf", DomainState::ShuttingDown);
    let started = Instant::now();
    d.ok(&["vm", "destroy", "deaf"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("destroyed while it shut down"));

    // Ctrl-C stops the waiting; the VM is not left busy.
    d.ok(&["vm", "start", "deaf"]);
    let mut waiting = d.spawn_cli(&["vm", "shutdown", "deaf", "--timeout", "120"]);
    d.wait_for_state("deaf", DomainState::ShuttingDown);
    host_sys::signal::kill(waiting.id(), libc::SIGINT).unwrap();
    let status = waiting.wait().unwrap();
    assert!(!status.success());
    d.ok(&["vm", "suspend", "deaf"]);
    d.ok(&["vm", "destroy", "deaf"]);
}

#[test]
fn pools_and_volumes_through_the_cli() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let images = d.dir.path().join("images");
    let pool_file = d.dir.path().join("pool.toml");
    std::fs::write(
        &pool_file,
        format!("name = \"p\"\npath = \"{}\"\n", images.display()),
    )
    .unwrap();
    d.ok(&["pool", "define", pool_file.to_str().unwrap()]);
    d.fails(&["vol", "list", "--pool", "p"], 4, "not active");
    d.ok(&["pool", "start", "p"]);
    assert!(d.ok(&["pool", "list"]).contains("active"));
    d.ok(&[
        "vol", "create", "base.raw", "--pool", "p", "--size", "8M", "--format", "raw",
    ]);
    d.ok(&[
        "vol", "clone", "base.raw", "a.qcow2", "--pool", "p", "--linked",
    ]);
    d.ok(&["vol", "clone", "a.qcow2", "full.qcow2", "--pool", "p"]);
    let list: Vec<api::pool_api::VolumeInfo> =
        serde_json::from_str(&d.ok(&["vol", "list", "--pool", "p", "--json"])).unwrap();
    let names: Vec<&str> = list.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a.qcow2", "base.raw", "full.qcow2"]);
    assert_eq!(list[0].backing.as_deref(), Some("base.raw"));
    d.fails(
        &["vol", "delete", "base.raw", "--pool", "p"],
        4,
        "backing of a.qcow2",
    );
    d.fails(
        &["vol", "create", "../x", "--pool", "p", "--size", "1M"],
        2,
        "invalid volume name",
    );
    d.fails(
        &["vol", "create", "big", "--pool", "p", "--size", "1000T"],
        4,
        "free",
    );
    d.ok(&["vol", "resize", "full.qcow2", "16M", "--pool", "p"]);
    // Sizes of volumes read as qemu-img reads them: a bare number is bytes; +SIZE grows.
    d.ok(&["vol", "resize", "full.qcow2", "+1048576", "--pool", "p"]);
    d.ok(&[
        "vol",
        "create",
        "bytes.raw",
        "--pool",
        "p",
        "--size",
        "1048576",
        "--format",
        "raw",
    ]);
    let capacity = |name: &str| {
        let info: api::pool_api::VolumeInfo =
            serde_json::from_str(&d.ok(&["vol", "info", name, "--pool", "p", "--json"])).unwrap();
        info.capacity_bytes
    };
    assert_eq!(capacity("full.qcow2"), 17 << 20);
    assert_eq!(capacity("bytes.raw"), 1 << 20);
    assert!(d
        .ok(&["vol", "info", "bytes.raw", "--pool", "p"])
        .contains("1.0 MiB"));
    d.fails(
        &["vol", "resize", "bytes.raw", "-1M", "--pool", "p"],
        2,
        "shrinking",
    );
    d.ok(&["vol", "delete", "bytes.raw", "--pool", "p"]);

    // VMs name volumes as POOL/VOLUME (or by path); a volume in use cannot be deleted, and
    // the daemon hands the VMM the volume's path.
    let vm = d.definition("user", "[[disks]]\nvolume = \"p/full.qcow2\"\n");
    d.ok(&["vm", "define", vm.to_str().unwrap()]);
    let unsaid = d.definition(
        "other",
        &format!(
            "[[disks]]\npath = \"{}\"\n",
            images.join("a.qcow2").display()
        ),
    );
    d.fails(
        &["vm", "define", unsaid.to_str().unwrap()],
        2,
        "needs a format (format = \"raw\" or \"qcow2\")",
    );
    let by_path = d.definition(
        "other",
        &format!(
            "[[disks]]\npath = \"{}\"\nformat = \"qcow2\"\n",
            images.join("a.qcow2").display()
        ),
    );
    d.ok(&["vm", "define", by_path.to_str().unwrap()]);
    d.fails(
        &["vol", "delete", "full.qcow2", "--pool", "p"],
        4,
        "disk of VM user",
    );
    d.fails(
        &["vol", "delete", "a.qcow2", "--pool", "p"],
        4,
        "disk of VM other",
    );
    d.ok(&["vm", "start", "user"]);
    // The volume as its file, with the format recorded for it: the VMM never guesses it.
    let disk = &running_config(&d, "user").disks[0];
    assert_eq!(disk.path(), Some(images.join("full.qcow2").as_path()));
    assert_eq!(disk.format.as_deref(), Some("qcow2"));
    d.fails(
        &[
            "vol",
            "snapshot",
            "create",
            "full.qcow2",
            "s1",
            "--pool",
            "p",
        ],
        4,
        "VM user is running and writes volume full.qcow2",
    );
    d.ok(&["vm", "destroy", "user"]);
    d.ok(&[
        "vol",
        "snapshot",
        "create",
        "full.qcow2",
        "s1",
        "--pool",
        "p",
    ]);
    let listed = d.ok(&["vol", "snapshot", "list", "full.qcow2", "--pool", "p"]);
    assert!(listed.contains("s1"), "{listed}");
    d.ok(&[
        "vol",
        "snapshot",
        "revert",
        "full.qcow2",
        "s1",
        "--pool",
        "p",
    ]);
    d.fails(
        &[
            "vol",
            "snapshot",
            "revert",
            "full.qcow2",
            "nope",
            "--pool",
            "p",
        ],
        3,
        "no snapshot named \"nope\"",
    );
    d.fails(
        &["vol", "snapshot", "create", "base.raw", "s1", "--pool", "p"],
        2,
        "internal snapshots need qcow2",
    );
    let snapshots = pool_snapshots_path("p", "full.qcow2");
    assert_eq!(d.call("GET", &snapshots, None).status, 200);
    assert_eq!(
        d.call("DELETE", &format!("{snapshots}/s1"), None).status,
        200
    );
    let missing = d.definition("ghost", "[[disks]]\nvolume = \"p/none.qcow2\"\n");
    d.fails(
        &["vm", "define", missing.to_str().unwrap()],
        2,
        "no volume named \"none.qcow2\"",
    );
    d.ok(&["vm", "undefine", "user"]);
    d.ok(&["vm", "undefine", "other"]);
    d.ok(&["vol", "delete", "full.qcow2", "--pool", "p"]);

    // A full clone reports its progress as it goes (JSON lines with --json), then the result.
    let lines = d.ok(&[
        "vol",
        "clone",
        "a.qcow2",
        "prog.qcow2",
        "--pool",
        "p",
        "--json",
    ]);
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["bytes"] == e["total"] && e["total"].as_u64() > Some(0)),
        "{lines}"
    );
    assert_eq!(
        events.last().unwrap()["done"]["name"],
        "prog.qcow2",
        "{lines}"
    );
    d.fails(
        &["vol", "clone", "a.qcow2", "prog.qcow2", "--pool", "p"],
        4,
        "already exists",
    );
    d.ok(&["vol", "delete", "prog.qcow2", "--pool", "p"]);

    // Upload and download stream image files; an upload whose backing file would reach
    // outside the pool is refused and changes nothing.
    let local = d.dir.path().join("local.raw");
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    d.ok(&[
        "vol", "create", "up.raw", "--pool", "p", "--size", "2M", "--format", "raw",
    ]);
    let progress = d.ok(&[
        "vol",
        "upload",
        "up.raw",
        local.to_str().unwrap(),
        "--pool",
        "p",
        "--json",
    ]);
    let last = progress.lines().last().unwrap();
    assert_eq!(
        last,
        format!("{{\"bytes\": {}, \"total\": {}}}", data.len(), data.len())
    );
    let back = d.dir.path().join("back.raw");
    d.ok(&[
        "vol",
        "download",
        "up.raw",
        back.to_str().unwrap(),
        "--pool",
        "p",
    ]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "downloaded bytes differ"
    );
    let evil = d.dir.path().join("evil.qcow2");
    d.ok(&[
        "img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        evil.to_str().unwrap(),
        "1M",
    ]);
    d.fails(
        &[
            "vol",
            "upload",
            "up.raw",
            evil.to_str().unwrap(),
            "--pool",
            "p",
            "--format",
            "qcow2",
        ],
        2,
        "is not a volume of pool p",
    );
    assert!(std::fs::read(images.join("up.raw")).unwrap() == data);
    let hidden: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') && name.ends_with(".part"))
        .collect();
    assert!(
        hidden.is_empty(),
        "the rejected upload was removed: {hidden:?}"
    );
    d.ok(&["vol", "delete", "up.raw", "--pool", "p"]);

    // The raw API, checked against the document.
    use api::pool_api::paths as pool_paths;
    assert_eq!(d.call("GET", pool_paths::POOLS, None).status, 200);
    assert_eq!(d.call("GET", &pool_paths::pool("p"), None).status, 200);
    assert_eq!(d.call("GET", &pool_paths::volumes("p"), None).status, 200);
    assert_eq!(
        d.call("GET", &pool_paths::volume("p", "a.qcow2"), None)
            .status,
        200
    );
    assert_eq!(
        d.call("GET", &pool_paths::volume("p", "nope"), None).status,
        404
    );
    let created = d.call(
        "POST",
        &pool_paths::volumes("p"),
        Some(br#"{"name": "n.qcow2", "size": "1M"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let bad = d.call(
        "POST",
        &pool_paths::volumes("p"),
        Some(br#"{"name": "m", "sise": "1M"}"#),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        d.call("DELETE", &pool_paths::volume("p", "n.qcow2"), None)
            .status,
        204
    );
    assert_eq!(
        d.call(
            "PUT",
            &pool_paths::pool_action("p", "autostart"),
            Some(br#"{"enabled": true}"#)
        )
        .status,
        200
    );
    assert_eq!(d.call("DELETE", &pool_paths::pool("p"), None).status, 409);
    assert_eq!(
        d.call("POST", &pool_paths::pool_action("p", "stop"), None)
            .status,
        200
    );
    assert_eq!(d.call("DELETE", &pool_paths::pool("p"), None).status, 204);
    assert!(
        images.join("a.qcow2").exists(),
        "undefining a pool keeps its files"
    );
}

/// Hidden files in `dir` whose names end with `suffix`.
fn hidden_ending(dir: &Path, suffix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') && name.ends_with(suffix))
        // Volumes' format records stay with their volumes.
        .filter(|name| !name.ends_with(".format"))
        .collect()
}

#[test]
fn a_volume_of_unknown_format_waits_for_its_owner() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let images = d.dir.path().join("images");
    let pool_file = d.dir.path().join("pool.toml");
    let text = format!("name = \"p\"\npath = \"{}\"\n", images.display());
    std::fs::write(&pool_file, text).unwrap();
    d.ok(&["pool", "define", pool_file.to_str().unwrap()]);
    d.ok(&["pool", "start", "p"]);
    d.ok(&[
        "vol", "create", "base.raw", "--pool", "p", "--size", "8M", "--format", "raw",
    ]);
    // Copied into the pool by hand: a qcow2 overlay, which could be a guest's raw disk.
    let legacy = images.join("legacy.qcow2");
    let created = std::process::Command::new(ferro())
        .args(["img", "create", "-b", "base.raw", "-F", "raw"])
        .arg(&legacy)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let info = d.ok(&["vol", "info", "legacy.qcow2", "--pool", "p"]);
    assert!(
        info.contains("unknown") && info.contains("vol set-format"),
        "{info}"
    );
    let listed = d.call("GET", &api::pool_api::paths::volumes("p"), None);
    assert_eq!(listed.status, 200);
    let vm = d.definition("user", "[[disks]]\nvolume = \"p/legacy.qcow2\"\n");
    d.fails(
        &["vm", "define", vm.to_str().unwrap()],
        2,
        "no recorded format",
    );
    let format_path = api::pool_api::paths::volume_action("p", "legacy.qcow2", "format");
    assert_eq!(
        d.call("PUT", &format_path, Some(b"{\"format\": \"vmdk\"}"))
            .status,
        400
    );
    d.ok(&["vol", "set-format", "legacy.qcow2", "qcow2", "--pool", "p"]);
    let confirmed = d.call("PUT", &format_path, Some(b"{\"format\": \"qcow2\"}"));
    assert_eq!(confirmed.status, 200);
    d.ok(&["vm", "define", vm.to_str().unwrap()]);
    // A download says the format it must come back with; the volume is an overlay's base now.
    let saved = d.dir.path().join("saved.qcow2");
    let out = d.ok(&[
        "vol",
        "download",
        "legacy.qcow2",
        saved.to_str().unwrap(),
        "--pool",
        "p",
    ]);
    assert!(out.contains("--format qcow2"), "{out}");
    d.fails(
        &[
            "vol",
            "upload",
            "base.raw",
            saved.to_str().unwrap(),
            "--pool",
            "p",
        ],
        2,
        "say its format with --format",
    );
    let raw = d.dir.path().join("new.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
    d.fails(
        &[
            "vol",
            "upload",
            "base.raw",
            raw.to_str().unwrap(),
            "--pool",
            "p",
            "--format",
            "raw",
        ],
        4,
        "is the backing of legacy.qcow2",
    );
}

#[test]
fn a_clone_that_a_host_crash_cut_short_is_reported_and_refused() {
    let mut d = Daemon::start();
    let images = d.dir.path().join("images");
    let pool_file = d.dir.path().join("pool.toml");
    std::fs::write(
        &pool_file,
        format!(
            "name = \"p\"\npath = \"{}\"\nautostart = true\n",
            images.display()
        ),
    )
    .unwrap();
    d.ok(&["pool", "define", pool_file.to_str().unwrap()]);
    d.ok(&["pool", "start", "p"]);
    d.ok(&[
        "vol", "create", "base.raw", "--pool", "p", "--size", "8M", "--format", "raw",
    ]);
    std::fs::write(images.join("base.raw"), vec![5u8; 8 << 20]).unwrap();
    d.ok(&["vol", "clone", "base.raw", "c.raw", "--pool", "p"]);
    assert!(std::fs::read(images.join("c.raw")).unwrap() == vec![5u8; 8 << 20]);
    // The clone reaches storage in the background, then its record goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hidden_ending(&images, ".unsynced").is_empty() {
        assert!(Instant::now() < deadline, "the clone never settled");
        std::thread::sleep(Duration::from_millis(20));
    }

    let vm = d.definition("user", "[[disks]]\nvolume = \"p/c.raw\"\n");
    d.ok(&["vm", "define", vm.to_str().unwrap()]);

    // What a daemon leaves when the host goes down before the clone is on storage: its
    // record, from another boot.
    let inode =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(images.join("c.raw")).unwrap());
    std::fs::write(
        images.join(".c.raw.wb-1-0.unsynced"),
        format!("an-earlier-boot {inode}\n"),
    )
    .unwrap();
    d.restart();
    assert!(d
        .ok(&["vol", "info", "c.raw", "--pool", "p"])
        .contains("incomplete"));
    let info: api::pool_api::VolumeInfo =
        serde_json::from_str(&d.ok(&["vol", "info", "c.raw", "--pool", "p", "--json"])).unwrap();
    assert!(info.incomplete);
    d.fails(&["vm", "start", "user"], 4, "may miss data");
    let other = d.definition("other", "[[disks]]\nvolume = \"p/c.raw\"\n");
    d.fails(
        &["vm", "define", other.to_str().unwrap()],
        2,
        "may miss data",
    );
    d.fails(
        &["vol", "clone", "c.raw", "d.raw", "--pool", "p"],
        4,
        "may miss data",
    );
    d.ok(&["vm", "undefine", "user"]);
    d.ok(&["vol", "delete", "c.raw", "--pool", "p"]);
    assert!(hidden_ending(&images, "").is_empty());
    d.ok(&["vol", "clone", "base.raw", "c.raw", "--pool", "p"]);
    assert!(!d
        .ok(&["vol", "info", "c.raw", "--pool", "p"])
        .contains("incomplete"));
}

#[test]
fn network_definitions_through_the_cli() {
    let d = Daemon::start();
    let file = d.dir.path().join("net.toml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    write(
        "name = \"default\"\nmode = \"nat\"\nbridge = \"ferrotest0\"\nsubnet = \"10.213.0.0/24\"\n",
    );
    d.ok(&["net", "define", file.to_str().unwrap()]);
    assert!(d.ok(&["net", "list"]).contains("10.213.0.0/24"));
    let info = d.ok(&["net", "info", "default"]);
    assert!(
        info.contains("DHCP:      10.213.0.2 - 10.213.0.254"),
        "{info}"
    );
    let refused = |text: &str, code: i32, message: &str| {
        write(text);
        d.fails(&["net", "define", file.to_str().unwrap()], code, message);
    };
    refused(
        "name = \"other\"\nmode = \"isolated\"\nbridge = \"ferrotest1\"\nsubnet = \"10.213.0.128/25\"\n",
        4,
        "overlaps 10.213.0.0/24",
    );
    refused(
        "name = \"lo-net\"\nmode = \"nat\"\nbridge = \"lo\"\nsubnet = \"10.214.0.0/24\"\n",
        4,
        "an interface named lo already exists",
    );
    refused(
        "name = \"x\"\nmode = \"nat\"\nbridge = \"b\"\nsubnet = \"10.215.0.1/24\"\n",
        2,
        "host bits are set",
    );
    refused(
        "name = \"x\"\nmode = \"nat\"\nbridge = \"b\"\nsubnet = \"10.215.0.0/24\"\nforward = true\n",
        2,
        "unknown field `forward`",
    );
    use api::net_api::paths as net_paths;
    assert_eq!(d.call("GET", net_paths::NETWORKS, None).status, 200);
    assert_eq!(
        d.call("GET", &net_paths::network("default"), None).status,
        200
    );
    assert_eq!(d.call("GET", &net_paths::network("nope"), None).status, 404);
    let bad = d.call(
        "POST",
        net_paths::NETWORKS,
        Some(br#"{"name": "y", "mode": "nat", "bridge": "b"}"#),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        d.call("DELETE", &net_paths::network("default"), None)
            .status,
        204
    );
}

/// Network lifecycle requests that leave the host's interfaces alone (the host side itself is
/// tested in network namespaces by the daemon's unit tests and with real guests end to end).
#[test]
fn network_lifecycle_requests_and_vm_nics() {
    use api::net_api::paths as net_paths;
    let d = Daemon::start();
    let file = d.dir.path().join("net.toml");
    std::fs::write(
        &file,
        "name = \"lab\"\nmode = \"nat\"\nbridge = \"ferrotest2\"\nsubnet = \"10.216.0.0/24\"\n",
    )
    .unwrap();
    d.ok(&["net", "define", file.to_str().unwrap()]);
    d.fails(&["net", "stop", "lab"], 4, "network lab is not active");
    assert!(d.ok(&["net", "leases", "lab"]).starts_with("MAC"));
    let leases = d.call("GET", &net_paths::leases("lab"), None);
    assert_eq!((leases.status, leases.body.as_slice()), (200, &b"[]"[..]));
    d.ok(&["net", "autostart", "lab"]);
    assert!(d.ok(&["net", "info", "lab"]).contains("Autostart: yes"));
    d.ok(&["net", "autostart", "lab", "--disable"]);
    assert!(d.ok(&["net", "info", "lab"]).contains("Autostart: no"));
    // A subnet the host already uses (lo's 127.0.0.1/8) is refused before anything is made.
    std::fs::write(
        &file,
        "name = \"loop\"\nmode = \"isolated\"\nbridge = \"ferrotest3\"\nsubnet = \"127.0.0.0/8\"\n",
    )
    .unwrap();
    d.ok(&["net", "define", file.to_str().unwrap()]);
    d.fails(
        &["net", "start", "loop"],
        4,
        "in use on this host (lo has 127.0.0.1/8)",
    );
    assert!(!std::path::Path::new("/sys/class/net/ferrotest3").exists());

    // NICs on networks: the network must exist; a MAC is fixed at definition.
    d.fails(
        &[
            "vm",
            "define",
            d.definition("nic0", "[[nets]]\nnetwork = \"nope\"\n")
                .to_str()
                .unwrap(),
        ],
        2,
        "no network named \"nope\"",
    );
    d.ok(&[
        "vm",
        "define",
        d.definition("nic1", "[[nets]]\nnetwork = \"lab\"\n")
            .to_str()
            .unwrap(),
    ]);
    let nic = d.details("nic1").definition.config.nets[0].clone();
    assert_eq!(nic.network(), Some("lab"));
    assert!(nic.mac.is_some());
    assert!(d.ok(&["vm", "info", "nic1"]).contains("network=lab,mac="));
    d.fails(&["vm", "start", "nic1"], 4, "network lab is not active");
    assert_eq!(
        d.details("nic1").state,
        api::daemon_api::DomainState::Shutoff
    );
}

/// What a tenant with API access may not take through a definition: another VM's TAP device,
/// a network's bridge, a name shaped like the daemon's network TAP devices; and a VM on a
/// network whose name dnsmasq could misread is refused. Checked at define and again at start.
#[test]
fn nics_may_not_name_what_belongs_to_others() {
    let mut d = Daemon::start();
    let file = d.dir.path().join("net.toml");
    std::fs::write(
        &file,
        "name = \"lab\"\nmode = \"nat\"\nbridge = \"ferrotest8\"\nsubnet = \"10.218.0.0/24\"\n",
    )
    .unwrap();
    d.ok(&["net", "define", file.to_str().unwrap()]);
    let define = |name: &str, nets: &str| {
        let path = d.definition(name, nets);
        d.cli(&["vm", "define", path.to_str().unwrap()])
    };
    let refused = |name: &str, nets: &str, code: i32, message: &str| {
        let path = d.definition(name, nets);
        d.fails(&["vm", "define", path.to_str().unwrap()], code, message);
    };
    assert_eq!(define("owner", "[[nets]]\ntap = \"tap-owner\"\n").0, 0);
    refused(
        "thief",
        "[[nets]]\ntap = \"tap-owner\"\n",
        4,
        "the TAP device tap-owner belongs to VM owner",
    );
    refused("squat", "[[nets]]\ntap = \"fv1n0\"\n", 4, "reserved");
    refused("squat", "[[nets]]\ntap = \"fvdeadbeefn0\"\n", 4, "reserved");
    refused(
        "squat",
        "[[nets]]\ntap = \"ferrotest8\"\n",
        4,
        "ferrotest8 is the bridge of network lab",
    );
    for hostile in ["db_1", "123", "a.b"] {
        refused(
            hostile,
            "[[nets]]\nnetwork = \"lab\"\n",
            2,
            "cannot be its DNS name on network lab",
        );
    }
    let list: Vec<VmSummary> = serde_json::from_str(&d.ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    // Nor may a network take a VM's TAP as its bridge.
    std::fs::write(
        &file,
        "name = \"thief-net\"\nmode = \"isolated\"\nbridge = \"tap-owner\"\nsubnet = \"10.221.0.0/24\"\n",
    )
    .unwrap();
    d.fails(
        &["net", "define", file.to_str().unwrap()],
        4,
        "tap-owner is the TAP device of VM owner",
    );

    // At start: a network stored before these checks with the NIC's TAP as its bridge (the
    // daemon refuses to define one now).
    assert_eq!(define("late", "[[nets]]\ntap = \"ferrotest9\"\n").0, 0);
    let late_net = "name = \"late-net\"\nmode = \"isolated\"\nbridge = \"ferrotest9\"\nsubnet = \"10.219.0.0/24\"\n";
    std::fs::write(&file, late_net).unwrap();
    d.fails(
        &["net", "define", file.to_str().unwrap()],
        4,
        "ferrotest9 is the TAP device of VM late",
    );
    d.stop();
    std::fs::write(d.state_dir().join("networks/late-net.toml"), late_net).unwrap();
    d.restart();
    d.fails(
        &["vm", "start", "late"],
        4,
        "ferrotest9 is the bridge of network late-net",
    );
    assert_eq!(d.details("late").state, DomainState::Shutoff);
}

/// Ids are the daemon's: given at define (a requested one is replaced), unique, and given to
/// definitions stored before ids when they are loaded; such an old VM on a network whose name
/// cannot be a DNS name runs without one, with a warning.
#[test]
fn vm_ids_are_given_by_the_daemon() {
    let mut d = Daemon::start();
    let file = d.dir.path().join("net.toml");
    std::fs::write(
        &file,
        "name = \"lab\"\nmode = \"nat\"\nbridge = \"ferrotest10\"\nsubnet = \"10.220.0.0/24\"\n",
    )
    .unwrap();
    d.ok(&["net", "define", file.to_str().unwrap()]);
    d.ok(&["vm", "define", d.definition("first", "").to_str().unwrap()]);
    let path = d.definition("second", "id = 1\n");
    d.ok(&["vm", "define", path.to_str().unwrap()]);
    assert_eq!(d.details("first").definition.id, Some(1));
    assert_eq!(d.details("second").definition.id, Some(2));
    // Definitions of an older daemon: no ids, a name that is no DNS name, on a network.
    d.stop();
    let old = d.definition(
        "db_1",
        "[[nets]]\nnetwork = \"lab\"\nmac = \"52:54:00:00:00:07\"\n",
    );
    std::fs::copy(&old, d.state_dir().join("vms/db_1.toml")).unwrap();
    let stored = d.state_dir().join("vms/first.toml");
    let text = std::fs::read_to_string(&stored)
        .unwrap()
        .replace("id = 1\n", "");
    std::fs::write(&stored, text).unwrap();
    d.restart();
    let ids: Vec<Option<u32>> = ["first", "second", "db_1"]
        .iter()
        .map(|vm| d.details(vm).definition.id)
        .collect();
    assert!(ids.iter().all(Option::is_some), "{ids:?}");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "{ids:?}");
    assert!(std::fs::read_to_string(d.state_dir().join("vms/db_1.toml"))
        .unwrap()
        .contains("id = "));
    let warnings = d.details("db_1").warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("is not a DNS name"), "{warnings:?}");
    assert!(d.ok(&["vm", "info", "db_1"]).contains("Warning:"));
    assert!(d.details("first").warnings.is_empty());
}

/// FNV-1a, 32 bits: what daemons before VM ids named network TAP devices by.
fn old_tap_hash(name: &str) -> u32 {
    api::net::stable_hash(name) as u32
}

/// Two VM names whose old TAP names were the same.
fn colliding_names() -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0u32.. {
        let name = format!("c{i}");
        if let Some(other) = seen.insert(old_tap_hash(&name), name.clone()) {
            return (other, name);
        }
    }
    unreachable!()
}

/// Two VMs whose names collided in the old 32-bit TAP names each get their own TAP device;
/// a link the daemon did not make, under a VM's TAP name, is left alone (the start refused).
#[test]
fn network_taps_are_unique_and_foreign_links_are_left_alone() {
    let Some(d) = Daemon::start_in_own_netns() else {
        return;
    };
    let file = d.dir.path().join("net.toml");
    std::fs::write(
        &file,
        "name = \"lab\"\nmode = \"nat\"\nbridge = \"ferrotest7\"\nsubnet = \"10.217.0.0/24\"\n",
    )
    .unwrap();
    d.ok(&["net", "define", file.to_str().unwrap()]);
    d.ok(&["net", "start", "lab"]);
    let (a, b) = colliding_names();
    for vm in [&a, &b] {
        let path = d.definition(vm, "[[nets]]\nnetwork = \"lab\"\n");
        d.ok(&["vm", "define", path.to_str().unwrap()]);
    }
    d.ok(&["vm", "start", &a]);
    let a_taps = d.bridge_ports("ferrotest7");
    assert_eq!(a_taps.len(), 1, "{a_taps:?}");
    d.ok(&["vm", "start", &b]);
    let both = d.bridge_ports("ferrotest7");
    assert_eq!(both.len(), 2, "{a} and {b} share a TAP device: {both:?}");
    for vm in [&a, &b] {
        assert_eq!(d.details(vm).state, DomainState::Running);
    }

    d.ok(&["vm", "destroy", &a]);
    assert_eq!(d.bridge_ports("ferrotest7").len(), 1);
    let tap = &a_taps[0];
    let (made, out) = d.in_netns(&["ip", "link", "add", tap, "type", "bridge"]);
    assert!(made, "{out}");
    d.fails(&["vm", "start", &a], 4, "the daemon did not make it");
    let (exists, out) = d.in_netns(&["ip", "-d", "link", "show", tap]);
    assert!(exists && out.contains("bridge"), "{out}");
    assert_eq!(d.details(&a).state, DomainState::Shutoff);
    d.ok(&["vm", "destroy", &b]);
    assert!(d.bridge_ports("ferrotest7").is_empty());
    d.ok(&["net", "stop", "lab"]);
}

/// Hundreds of idle connections neither exhaust the daemon's file descriptors nor lock a client
/// out: past its connection limit the oldest idle ones are closed.
#[test]
fn idle_connections_do_not_exhaust_the_daemon() {
    let d = Daemon::start();
    let pid = d.child.as_ref().unwrap().id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    let idle: Vec<std::os::unix::net::UnixStream> = (0..400)
        .map(|_| std::os::unix::net::UnixStream::connect(d.socket()).unwrap())
        .collect();
    let started = Instant::now();
    assert!(d.ok(&["vm", "list"]).starts_with("NAME"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let during = fds();
    assert!(
        during < before + 140,
        "{during} descriptors with 400 idle clients ({before} before)"
    );
    drop(idle);
}

/// `vm define` on an existing VM updates it (id and MACs kept; a running VM takes it at its
/// next start, also across a daemon restart); `vm dump` prints what `vm define` takes back;
/// `vm edit` checks an edit before it is saved.
#[test]
fn definitions_update_dump_and_edit() {
    if !kvm_tests_enabled() {
        return;
    }
    let mut d = Daemon::start();
    let file = d.definition("ed", "[[nets]]\ntap = \"edtap0\"\n");
    d.ok(&["vm", "define", file.to_str().unwrap()]);
    let first = d.details("ed").definition;
    let mac = first.config.nets[0].mac;
    assert!(mac.is_some());
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("cpus = 2\n{text}")).unwrap();
    assert!(d
        .ok(&["vm", "define", file.to_str().unwrap()])
        .contains("VM ed updated"));
    let second = d.details("ed").definition;
    assert_eq!(
        (second.config.cpus, second.id, second.config.nets[0].mac),
        (2, first.id, mac)
    );

    // The dump is a definition file: defined back, nothing changes.
    let dumped = d.ok(&["vm", "dump", "ed"]);
    assert_eq!(api::definition_file::parse_vm(&dumped).unwrap(), second);
    let dump_file = d.dir.path().join("dumped.toml");
    std::fs::write(&dump_file, &dumped).unwrap();
    d.ok(&["vm", "define", dump_file.to_str().unwrap()]);
    assert_eq!(d.details("ed").definition, second);
    assert_eq!(d.ok(&["vm", "dump", "ed"]), dumped);

    // vm edit: the editor's change is saved; an invalid one is refused and kept.
    let edit = |editor: &str| {
        Command::new(ferro())
            .args(["vm", "edit", "ed"])
            .env("FERRO_SOCKET", d.socket())
            .env("EDITOR", editor)
            .env_remove("VISUAL")
            .output()
            .unwrap()
    };
    let out = edit("sed -i s/^cpus\\ =\\ 2/cpus\\ =\\ 3/");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.details("ed").definition.config.cpus, 3);
    let out = edit("true");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    let out = edit("sed -i s/^cpus\\ =/cpu\\ =/");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `cpu`"), "{stderr}");
    let kept = stderr
        .split("kept in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    assert!(std::fs::read_to_string(kept).unwrap().contains("cpu = 3"));
    std::fs::remove_file(kept).unwrap();
    assert_eq!(
        d.details("ed").definition.config.cpus,
        3,
        "the refused edit changed nothing"
    );
    d.fails(&["vm", "dump", "ghost"], 3, "no VM named");

    // A running VM runs on as it is; its new definition waits for the next start.
    d.ok(&["vm", "define", d.definition("run", "").to_str().unwrap()]);
    d.ok(&["vm", "start", "run"]);
    d.wait_for_console("run", "up", 1);
    let changed = d.definition("run", "cpus = 2\n");
    let said = d.ok(&["vm", "define", changed.to_str().unwrap()]);
    assert!(said.contains("runs on as it is"), "{said}");
    let details = d.details("run");
    assert_eq!(details.definition.config.cpus, 1);
    assert_eq!(details.pending_definition.as_ref().unwrap().config.cpus, 2);
    assert!(d.ok(&["vm", "info", "run"]).contains("Pending:"));
    assert!(d.ok(&["vm", "dump", "run"]).contains("cpus = 2"));
    d.restart();
    let details = d.details("run");
    assert_eq!(details.state, DomainState::Running);
    assert_eq!(
        details.definition.config.cpus, 1,
        "the adopted VMM runs the old definition"
    );
    assert_eq!(details.pending_definition.unwrap().config.cpus, 2);
    // A reboot starts a new VMM: the new definition applies.
    d.ok(&["vm", "reboot", "run"]);
    let details = d.details("run");
    assert_eq!(
        (details.state, details.definition.config.cpus),
        (DomainState::Running, 2)
    );
    assert!(details.pending_definition.is_none());
    d.ok(&["vm", "destroy", "run"]);
}

/// The CLI as a virsh user writes it: `-c SOCKET` before the subcommand, `vm stats` of every
/// VM, states spelled as in JSON, human sizes, and each command's own exit codes in its help.
#[test]
fn the_cli_reads_like_virsh() {
    if !kvm_tests_enabled() {
        return;
    }
    let d = Daemon::start();
    let socket = d.socket();
    let run = |args: &[&str]| {
        Command::new(ferro())
            .args(args)
            .env_remove("FERRO_SOCKET")
            .output()
            .unwrap()
    };
    let s = socket.to_str().unwrap();
    assert!(run(&["-c", s, "vm", "list"]).status.success());
    assert!(run(&["--socket", s, "vm", "list"]).status.success());
    assert!(run(&["vm", "list", "-c", s]).status.success());
    let nowhere = d.dir.path().join("nowhere.sock");
    let out = run(&["-c", nowhere.to_str().unwrap(), "vm", "list"]);
    assert_eq!(out.status.code(), Some(5));
    // A socket given after the subcommand wins over one before it.
    let out = run(&["-c", nowhere.to_str().unwrap(), "vm", "list", "-c", s]);
    assert!(out.status.success());

    d.ok(&["vm", "define", d.definition("on", "").to_str().unwrap()]);
    d.ok(&["vm", "define", d.definition("off", "").to_str().unwrap()]);
    d.ok(&["vm", "start", "on"]);
    let text = d.ok(&["vm", "stats"]);
    assert!(
        text.contains("on: running") && text.contains("cpu.time"),
        "{text}"
    );
    assert!(text.contains("off: shutoff"), "{text}");
    let all: Vec<VmStats> = serde_json::from_str(&d.ok(&["vm", "stats", "--json"])).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "on");

    let list = d.ok(&["vm", "list"]);
    let json = d.ok(&["vm", "list", "--json"]);
    for state in ["shutoff", "running"] {
        assert!(list.contains(state) && json.contains(state), "{list}{json}");
    }
    let host = d.ok(&["host", "info"]);
    assert!(host.contains("iB") && !host.contains("bytes"), "{host}");
    let info: api::daemon_api::HostInfo =
        serde_json::from_str(&d.ok(&["host", "info", "--json"])).unwrap();
    assert!(info.memory_bytes > 0);

    let help = |args: &[&str]| d.ok(args);
    let list_help = help(&["vm", "list", "--help"]);
    assert!(list_help.contains("Exit codes:") && !list_help.contains("3  no such"));
    assert!(!list_help.contains("4  the state"));
    let start_help = help(&["vm", "start", "--help"]);
    assert!(start_help.contains("3  no such VM") && start_help.contains("4  the state"));
    let info_help = help(&["vm", "info", "--help"]);
    assert!(info_help.contains("3  no such VM") && !info_help.contains("4  the state"));
    assert!(help(&["vol", "info", "--help"]).contains("3  no such pool or volume"));
    d.ok(&["vm", "destroy", "on"]);
}
