//! The stall watchdog of the end-to-end tests. A test guest that prints nothing and whose vCPUs
//! make no exit to the VMM for [`STALL_LIMIT`] is stalled: the waiting test stops there and
//! fails with the VMM's stall report (`GET /api/v1/vm/diagnostics`) instead of sitting out its
//! own timeout, and a test that times out carries the report too.
//!
//! Output alone is not progress enough to call a stall: a guest may work in silence (a disk
//! benchmark), but then it exits to the VMM for its I/O. Exits alone are not either: an idle
//! guest waiting for input makes none. Both standing still while a test waits for output is
//! what a lost interrupt or wakeup looks like.
//!
//! Threading: called from the test's thread between its polls of the output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::vmm_api::{paths, VmCounters};

/// The VMM's stall report.
const DIAGNOSTICS: &str = "/api/v1/vm/diagnostics";
use http_unix::Client;

/// How long a guest may show no progress (no output, no exit) before it counts as stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(40);
/// How often the exit counters are read.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Timeout of one request for counters or a report.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a VM's progress and stall report are read.
pub trait Probe: Send {
    /// The VM's exits to the VMM so far, all vCPUs and reasons together.
    fn exits(&self) -> Result<u64, String>;
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
    fn exits(&self) -> Result<u64, String> {
        let counters: VmCounters = get_json(&self.client, paths::COUNTERS)?;
        Ok(total_exits(&counters))
    }

    fn report(&self) -> String {
        get_text(&self.client, DIAGNOSTICS)
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
    fn exits(&self) -> Result<u64, String> {
        let stats: api::daemon_api::VmStats =
            get_json(&self.client, &format!("/api/v1/vms/{}/stats", self.name))?;
        Ok(total_exits(&stats.counters))
    }

    fn report(&self) -> String {
        get_text(
            &self.client,
            &format!("/api/v1/vms/{}/diagnostics", self.name),
        )
    }
}

fn total_exits(counters: &VmCounters) -> u64 {
    counters
        .vcpus
        .iter()
        .flat_map(|vcpu| vcpu.exits.values())
        .sum()
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

/// The JSON answer of `path` pretty-printed, or why there is none.
fn get_text(client: &Client, path: &str) -> String {
    match client.request("GET", path, None) {
        Ok(response) if response.status == 200 => {
            serde_json::from_slice::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|value| serde_json::to_string_pretty(&value).ok())
                .unwrap_or_else(|| response.text())
        }
        Ok(response) => format!(
            "(no stall report: GET {path} answered {} {})",
            response.status,
            response.text()
        ),
        Err(e) => format!("(no stall report: GET {path}: {e})"),
    }
}

/// Follows one guest's progress while a test waits on it.
#[derive(Debug)]
pub struct StallWatch {
    limit: Duration,
    output_len: usize,
    exits: Option<u64>,
    /// When output or exits last moved.
    moved: Instant,
    next_probe: Instant,
}

impl StallWatch {
    pub fn new(limit: Duration, now: Instant) -> Self {
        StallWatch {
            limit,
            output_len: 0,
            exits: None,
            moved: now,
            next_probe: now,
        }
    }

    /// Takes what was seen at `now` (the output's length; the exit count, if it could be read)
    /// and says whether the guest has stood still for the limit. The clock starts with the
    /// first exit count read: without one a quiet guest may be busy (or its VMM's API not up).
    pub fn observe(&mut self, now: Instant, output_len: usize, exits: Option<u64>) -> bool {
        if output_len != self.output_len {
            self.output_len = output_len;
            self.moved = now;
        }
        if let Some(exits) = exits {
            if self.exits != Some(exits) {
                self.exits = Some(exits);
                self.moved = now;
            }
        }
        self.exits.is_some() && now.duration_since(self.moved) >= self.limit
    }

    /// Whether the exit counters are due to be read again at `now`.
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
    fn no_output_and_no_exits_for_the_limit_is_a_stall() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        assert!(!watch.observe(at(start, 0), 10, Some(500)));
        assert!(!watch.observe(at(start, 39), 10, Some(500)));
        assert!(watch.observe(at(start, 40), 10, Some(500)));
        assert_eq!(watch.still_for(at(start, 41)), Duration::from_secs(41));
    }

    #[test]
    fn exits_without_output_are_progress_and_so_is_output_without_exits() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        watch.observe(at(start, 0), 10, Some(500));
        // A silent disk workload: exits move.
        for t in (10..200).step_by(10) {
            assert!(!watch.observe(at(start, t), 10, Some(500 + t)), "at {t} s");
        }
        // Output moves, exits stand (or cannot be read).
        for t in (200..400).step_by(10) {
            assert!(!watch.observe(at(start, t), t as usize, None), "at {t} s");
        }
        assert!(watch.observe(at(start, 440), 390, Some(690)));
    }

    #[test]
    fn without_any_exit_count_a_quiet_guest_is_not_called_stalled() {
        let start = Instant::now();
        let mut watch = StallWatch::new(LIMIT, start);
        assert!(!watch.observe(at(start, 1000), 0, None));
        // The first count read starts the clock.
        assert!(!watch.observe(at(start, 1001), 0, Some(7)));
        assert!(!watch.observe(at(start, 1040), 0, Some(7)));
        assert!(watch.observe(at(start, 1041), 0, Some(7)));
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
