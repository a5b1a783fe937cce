//! KVM smoke tests of the per-VM control API (`--api-socket`) on the local /dev/kvm, with tiny
//! guests: info, counters, pause and resume (the guest makes no progress while paused), the
//! power button (the guest polls the GED event register), reset, stop, and the errors of bad
//! requests. Every response is checked against docs/api/vmm.openapi.json.
//!
//! They need /dev/kvm. Set FERRO_SKIP_KVM_TESTS=1 to skip them on a machine without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::vmm_api::{paths, VmCounters, VmInfo};
use api::{VmConfig, VmState};
use arch::test_images;
use common::{asm, guest, kvm_tests_enabled, runnable, Captured};
use http_unix::Client;
use openapi_check::OpenApi;
use vmm::{Console, Error, Outcome};

/// Polls the GED event register until the power button is pressed, then prints "P" and
/// powers off.
fn power_button_guest() -> Vec<u8> {
    test_images::bzimage(&asm::program(&[
        asm::WAIT_FOR_POWER_BUTTON,
        &asm::serial(b"P"),
        asm::POWEROFF,
    ]))
}

fn openapi() -> OpenApi {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/vmm.openapi.json");
    OpenApi::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A VMM running in a thread with its API on a socket in the guest's directory.
struct Running {
    api: OpenApi,
    client: Client,
    socket: PathBuf,
    out: Captured,
    vm: JoinHandle<Result<Outcome, Error>>,
}

impl Running {
    fn start(config: &VmConfig, socket: PathBuf) -> Running {
        let out = Captured::default();
        let mut console =
            Console::new(Box::new(std::io::empty()), Box::new(out.clone()), false).unwrap();
        let (config, path) = (config.clone(), socket.clone());
        let vm = std::thread::spawn(move || {
            vmm::run(
                &runnable(&config)?,
                &mut console,
                Some(&path),
                vmm::Faults::default(),
                false,
            )
        });
        let running = Running {
            api: openapi(),
            client: Client::new(&socket, Some(Duration::from_secs(30))),
            socket,
            out,
            vm,
        };
        running.wait_for(
            |r| r.try_info().is_some_and(|i| i.state == VmState::Running),
            "the VM to run",
        );
        running
    }

    /// Sends a request, checks the response against the OpenAPI document, returns it.
    fn call(&self, method: &str, path: &str) -> http_unix::ClientResponse {
        let response = self.client.request(method, path, None).unwrap();
        self.api
            .check(method, path, response.status, &response.body)
            .unwrap();
        response
    }

    /// The VM's info, or None while the API is not up yet (a stale socket file may exist).
    fn try_info(&self) -> Option<VmInfo> {
        let response = self.client.request("GET", paths::VM, None).ok()?;
        serde_json::from_slice(&response.body).ok()
    }

    fn info(&self) -> VmInfo {
        let response = self.call("GET", paths::VM);
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).unwrap()
    }

    fn counters(&self) -> VmCounters {
        let response = self.call("GET", paths::COUNTERS);
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).unwrap()
    }

    fn io_in_exits(&self) -> u64 {
        self.counters().vcpus[0].exits["io_in"]
    }

    fn put(&self, path: &str) -> u16 {
        self.call("PUT", path).status
    }

    fn wait_for(&self, done: impl Fn(&Running) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists() && done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            assert!(
                !self.vm.is_finished(),
                "the VMM ended while waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> (Result<Outcome, Error>, String, PathBuf) {
        let result = self.vm.join().unwrap();
        (result, self.out.text(), self.socket)
    }
}

#[test]
fn pause_resume_and_power_button() {
    if !kvm_tests_enabled() {
        return;
    }
    let g = guest(power_button_guest());
    let vm = Running::start(&g.config, g.dir.path().join("api.sock"));

    let info = vm.info();
    assert_eq!((info.vcpus, info.memory_bytes), (1, 128 << 20));
    assert_eq!((info.boots, info.pid), (1, std::process::id()));
    assert_eq!(info.config, g.config);
    vm.wait_for(|r| r.io_in_exits() > 0, "the guest to poll the GED");
    assert_eq!(vm.put(paths::RESUME), 409, "resume while running");

    assert_eq!(vm.put(paths::PAUSE), 204);
    assert_eq!(vm.info().state, VmState::Paused);
    let parked = vm.io_in_exits();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.io_in_exits(), parked, "a paused guest made progress");
    assert_eq!(vm.put(paths::PAUSE), 409, "pause while paused");
    let refused = vm.call("PUT", paths::POWER_BUTTON);
    assert_eq!(refused.status, 409);
    assert!(refused.text().contains("paused"), "{}", refused.text());

    assert_eq!(vm.put(paths::RESUME), 204);
    assert_eq!(vm.info().state, VmState::Running);
    vm.wait_for(|r| r.io_in_exits() > parked, "the guest to run again");

    assert_eq!(vm.put(paths::POWER_BUTTON), 204);
    let (result, out, socket) = vm.finish();
    assert_eq!(result.unwrap(), Outcome::PoweredOff);
    assert_eq!(out, "P");
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn reset_boots_again_and_stop_ends_the_vmm() {
    if !kvm_tests_enabled() {
        return;
    }
    let g = guest(test_images::bzimage(&asm::program(&[&asm::serial(b"B")])));
    let vm = Running::start(&g.config, g.dir.path().join("api.sock"));
    vm.wait_for(|r| r.out.text() == "B", "the first boot");
    assert_eq!(vm.put(paths::RESET), 204);
    vm.wait_for(|r| r.out.text() == "BB", "the second boot");
    let info = vm.info();
    assert_eq!((info.boots, info.state), (2, VmState::Running));
    // Counters survive the reset: both boots wrote one byte.
    assert_eq!(vm.counters().vcpus[0].exits["io_out"], 2);
    // Resuming a paused VM is not needed to stop it.
    assert_eq!(vm.put(paths::PAUSE), 204);
    assert_eq!(vm.put(paths::STOP), 204);
    let (result, out, _) = vm.finish();
    assert_eq!(result.unwrap(), Outcome::Stopped);
    assert_eq!(out, "BB");
}

/// Sends raw bytes on a new connection; returns the status and body of the answer.
fn raw_request(socket: &Path, bytes: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = answer[text.find("\r\n\r\n").unwrap() + 4..].to_vec();
    (status, body)
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    if !kvm_tests_enabled() {
        return;
    }
    let g = guest(test_images::bzimage(&asm::program(&[&asm::serial(b"up")])));
    let socket = g.dir.path().join("api.sock");
    // A socket file left by a dead process is replaced.
    drop(UnixListener::bind(&socket).unwrap());
    let vm = Running::start(&g.config, socket.clone());
    let api = openapi();
    let check_error = |status: u16, body: &[u8], expected: u16| {
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(body));
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        api.check_schema("Error", &json).unwrap();
    };

    let missing = vm.client.request("GET", "/api/v1/nothing", None).unwrap();
    check_error(missing.status, &missing.body, 404);
    let wrong_method = vm.client.request("POST", paths::PAUSE, None).unwrap();
    check_error(wrong_method.status, &wrong_method.body, 405);
    let with_body = vm
        .client
        .request("PUT", paths::PAUSE, Some(br#"{"now": true}"#))
        .unwrap();
    check_error(with_body.status, &with_body.body, 400);
    let (status, body) = raw_request(&socket, b"NONSENSE\r\n\r\n");
    check_error(status, &body, 400);
    let (status, body) = raw_request(
        &socket,
        b"PUT /api/v1/vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    check_error(status, &body, 411);
    // A client that goes away in the middle of a request.
    let mut quitter = UnixStream::connect(&socket).unwrap();
    quitter.write_all(b"PUT /api/v1/vm/pa").unwrap();
    drop(quitter);
    // None of that touched the VM, and the API still answers.
    assert_eq!(vm.info().state, VmState::Running);

    // A second VMM cannot take the socket.
    let (second, _) = common::run_with_api(&g.config, &socket);
    let err = second.unwrap_err();
    assert!(
        err.to_string().contains("cannot serve the control API"),
        "{err}"
    );
    assert!(socket.exists(), "the first VMM's socket is left alone");

    assert_eq!(vm.put(paths::STOP), 204);
    let (result, out, _) = vm.finish();
    assert_eq!(result.unwrap(), Outcome::Stopped);
    assert_eq!(out, "up");
}

#[test]
fn the_document_covers_every_route() {
    let documented = openapi().operations();
    for (method, path) in [
        ("GET", paths::VM),
        ("GET", paths::COUNTERS),
        ("GET", paths::DIAGNOSTICS),
        ("PUT", paths::PAUSE),
        ("PUT", paths::RESUME),
        ("PUT", paths::POWER_BUTTON),
        ("PUT", paths::RESET),
        ("PUT", paths::STOP),
    ] {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not documented"
        );
    }
    assert_eq!(
        documented.len(),
        8,
        "the document lists routes the VMM lacks"
    );
}
