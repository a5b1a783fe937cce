//! The stall watchdog of the end-to-end tests. A test guest that prints nothing, whose vCPUs
//! make no exit to the VMM and whose devices do no work for [`STALL_LIMIT`] is stalled: the
//! waiting test stops there and fails with the VMM's stall report (`GET
//! /api/v1/vm/diagnostics`) instead of sitting out its own timeout, and a test that times out
//! carries the report too.
//!
//! Output alone is not progress enough to call a stall: a guest may work in silence (a disk or
//! network transfer), but then its devices count requests and packets (virtio notifications
//! and interrupts go through KVM's eventfds, not through exits). Activity alone is not either:
//! an idle guest waiting for input has none. All of them standing still while a test waits for
//! output is what a lost interrupt or wakeup looks like. A guest that computes in silence for
//! longer than the limit would be taken for a stalled one: the limit is far above what the
//! tests' guests compute between two lines.
//!
//! Threading: called from the test's thread between its polls of the output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::diagnostics::VmDiagnostics;
use api::vmm_api::{paths, VmCounters};
use http_unix::Client;

/// How long a guest may show no progress (no output, no exit, no device work) before it
/// counts as stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How often the counters are read.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Timeout of one request for counters or a report.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a VM's progress and stall report are read.
pub trait Probe: Send {
    /// The VM's activity so far: exits to the VMM (all vCPUs and reasons) and device
    /// counters (requests, packets, bytes) added up; only its changes matter.
    fn activity(&self) -> Result<u64, String>;
    /// The VMM's stall report, as text for a test's output.
    fn report(&self) -> String;
}

/// A `ferro run` process's own API socket.
#[derive(Debug)]
pub struct VmmProbe {
    client: Client,
}

impl VmmProbe {
    pub fn new(socket: &Path) -> Self {
        VmmProbe {
            client: Client::new(socket, Some(REQUEST_TIMEOUT)),
        }
    }
}

impl Probe for VmmProbe {
    fn activity(&self) -> Result<u64, String> {
        let counters: VmCounters = get_json(&self.client, paths::COUNTERS)?;
        Ok(activity(&counters))
    }

    fn report(&self) -> String {
        report(&self.client, paths::DIAGNOSTICS, "the VM")
    }
}

/// A VM of a daemon, through the daemon's API.
#[derive(Debug)]
pub struct DaemonVmProbe {
    client: Client,
    name: String,
}

impl DaemonVmProbe {
    pub fn new(daemon_socket: &Path, name: &str) -> Self {
        DaemonVmProbe {
            client: Client::new(daemon_socket, Some(REQUEST_TIMEOUT)),
            name: name.to_string(),
        }
    }
}

impl Probe for DaemonVmProbe {
    fn activity(&self) -> Result<u64, String> {
        let stats: api::daemon_api::VmStats =
            get_json(&self.client, &format!("/api/v1/vms/{}/stats", self.name))?;
        Ok(activity(&stats.counters))
    }

    fn report(&self) -> String {
        let path = api::daemon_api::paths::vm_action(&self.name, "diagnostics");
        report(&self.client, &path, &self.name)
    }
}

fn activity(counters: &VmCounters) -> u64 {
    let exits = counters.vcpus.iter().flat_map(|vcpu| vcpu.exits.values());
    let work = counters.devices.iter().flat_map(|d| d.counters.values());
    exits.chain(work).fold(0, |sum, n| sum.wrapping_add(*n))
}

fn get_json<T: serde::de::DeserializeOwned>(client: &Client, path: &str) -> Result<T, String> {
    let response = client
        .request("GET", path, None)
        .map_err(|e| format!("GET {path}: {e}"))?;
    if response.status != 200 {
        return Err(format!(
            "GET {path}: {} {}",
            response.status,
            response.text()
        ));
    }
    serde_json::from_slice(&response.body).map_err(|e| format!("GET {path}: {e}"))
}

/// The stall report at `path` as `ferro vm diagnose` prints it, or why there is none.
fn report(client: &Client, path: &str, name: &str) -> String {
    match get_json::<VmDiagnostics>(client, path) {
        Ok(report) => api::diagnostics_text::render(name, &report),
        Err(e) => format!("(no stall report: {e})"),
    }
}

/// Follows one guest's progress while a test waits on it.
#[derive(Debug)]
pub struct StallWatch {
    limit: Duration,
    output_len: usize,
    activity: Option<u64>,
    /// When output or activity last moved.
    moved: Instant,
    next_probe: Instant,
}

impl StallWatch {
    pub fn new(limit: Duration, now: Instant) -> Self {
        StallWatch {
            limit,
            output_len: 0,
            activity: None,
            moved: now,
            next_probe: now,
        }
    }

    /// Takes what was seen at `now` (the output's length; the activity count, if it could be
    /// read) and says whether the guest has stood still for the limit. The clock starts with
    /// the first count read: without one a quiet guest may be busy (or its VMM's API not up).
    pub fn observe(&mut self, now: Instant, output_len: usize, activity: Option<u64>) -> bool {
        if output_len != self.output_len {
            self.output_len = output_len;
            self.moved = now;
        }
        if let Some(activity) = activity {
            if self.activity != Some(activity) {
                self.activity = Some(activity);
                self.moved = now;
            }
        }
        self.activity.is_some() && now.duration_since(self.moved) >= self.limit
    }

    /// Whether the counters are due to be read again at `now`.
    pub fn probe_due(&mut self, now: Instant) -> bool {
        if now < self.next_probe {
            return false;
        }
        self.next_probe = now + PROBE_EVERY;
        true
    }

    /// How long the guest has shown no progress, at `now`.
    pub fn still_for(&self, now: Instant) -> Duration {
        now.duration_since(self.moved)
    }
}

/// The API socket a `ferro run` command line names (`--api-socket PATH`), if any.
pub fn api_socket_in(args: &[String]) -> Option<PathBuf> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--api-socket" {
            args.get(i + 1).map(PathBuf::from)
        } else {
            arg.strip_prefix("--api-socket=").map(PathBuf::from)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(40);

    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    #[test]
    fn no_output_and_no_activity_for_the_limit_is_a_stall() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        assert!(!watch.observe(at(start, 0), 10, Some(500)));
        assert!(!watch.observe(at(start, 39), 10, Some(500)));
        assert!(watch.observe(at(start, 40), 10, Some(500)));
        assert_eq!(watch.still_for(at(start, 41)), Duration::from_secs(41));
    }

    #[test]
    fn activity_without_output_is_progress_and_so_is_output_without_activity() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        watch.observe(at(start, 0), 10, Some(500));
        // A silent disk workload: its counters move.
        for t in (10..200).step_by(10) {
            assert!(!watch.observe(at(start, t), 10, Some(500 + t)), "at {t} s");
        }
        // Output moves, counters stand (or cannot be read).
        for t in (200..400).step_by(10) {
            assert!(!watch.observe(at(start, t), t as usize, None), "at {t} s");
        }
        assert!(watch.observe(at(start, 440), 390, Some(690)));
    }

    #[test]
    fn without_any_count_read_a_quiet_guest_is_not_called_stalled() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        assert!(!watch.observe(at(start, 1000), 0, None));
        // The first count read starts the clock.
        assert!(!watch.observe(at(start, 1001), 0, Some(7)));
        assert!(!watch.observe(at(start, 1040), 0, Some(7)));
        assert!(watch.observe(at(start, 1041), 0, Some(7)));
    }

    #[test]
    fn exits_and_device_work_both_count_as_activity() {
        let json = r#"{"vcpus":[{"id":0,"exits":{"io_out":5,"mmio_write":2}}],
            "devices":[{"id":"net0","kind":"net","counters":{"tx_packets":10,"rx_bytes":100}}]}"#;
        let counters: VmCounters = serde_json::from_str(json).unwrap();
        assert_eq!(activity(&counters), 117);
    }

    #[test]
    fn counters_are_read_once_a_second() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        assert!(watch.probe_due(start));
        assert!(!watch.probe_due(start + Duration::from_millis(500)));
        assert!(watch.probe_due(start + Duration::from_millis(1000)));
    }

    #[test]
    fn the_api_socket_is_found_in_both_spellings() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            api_socket_in(&args(&[
                "run",
                "--api-socket",
                "/tmp/a.sock",
                "--cpus",
                "1"
            ])),
            Some(PathBuf::from("/tmp/a.sock"))
        );
        assert_eq!(
            api_socket_in(&args(&["run", "--api-socket=/tmp/b.sock"])),
            Some(PathBuf::from("/tmp/b.sock"))
        );
        assert_eq!(api_socket_in(&args(&["run", "--cpus", "1"])), None);
    }
}
