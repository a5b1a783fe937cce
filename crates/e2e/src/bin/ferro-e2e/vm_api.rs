//! The per-VM control API (`ferro run --api-socket`) on the default guest: pause and resume
//! (no guest progress and no guest time while paused), the ACPI power button (a clean shutdown
//! through the guest's acpid), counters, reset and stop. Every response is checked against
//! docs/api/vmm.openapi.json. And the stall tooling on a fault had on purpose: a lost serial
//! interrupt is caught by the tests' stall watchdog, with a report that shows it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::vmm_api::{paths, VmCounters, VmInfo};
use api::VmState;
use e2e::stall::VmmProbe;
use e2e::{ferro_bin, Vm, READY};
use http_unix::{Client, ClientResponse};
use libtest_mimic::Failed;
use openapi_check::OpenApi;

use crate::{check, guest_args, images, TestResult, BOOT_TIMEOUT};

const OPENAPI: &str = include_str!("../../../../../docs/api/vmm.openapi.json");

/// A `ferro run` process with its control API.
struct ApiVm {
    vm: Vm,
    client: Client,
    api: OpenApi,
    socket: PathBuf,
}

impl ApiVm {
    fn spawn(name: &str, extra: &[&str], command: &str) -> Result<ApiVm, Failed> {
        let images = images()?;
        let mut args = guest_args(&images, 1, "256M", Some(command));
        let socket = e2e::stall::api_socket_in(&args)
            .ok_or_else(|| format!("{name}: the guest's arguments name no API socket"))?;
        args.extend(extra.iter().map(|s| s.to_string()));
        let vm = Vm::spawn(&ferro_bin(), &args)?;
        Ok(ApiVm {
            vm,
            client: Client::new(&socket, Some(Duration::from_secs(60))),
            api: OpenApi::parse(OPENAPI)?,
            socket,
        })
    }

    fn call(&self, method: &str, path: &str) -> Result<ClientResponse, Failed> {
        let response = self
            .client
            .request(method, path, None)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        self.api
            .check(method, path, response.status, &response.body)?;
        Ok(response)
    }

    fn put(&self, path: &str, expected: u16) -> TestResult {
        let response = self.call("PUT", path)?;
        check(response.status == expected, || {
            format!(
                "PUT {path}: {} {}, expected {expected}",
                response.status,
                response.text()
            )
        })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Failed> {
        let response = self.call("GET", path)?;
        check(response.status == 200, || {
            format!("GET {path}: {}", response.text())
        })?;
        serde_json::from_slice(&response.body).map_err(|e| format!("GET {path}: {e}").into())
    }

    fn info(&self) -> Result<VmInfo, Failed> {
        self.get(paths::VM)
    }

    /// Waits for `ferro` to exit 0 and its socket to be gone.
    fn exits_cleanly(self) -> TestResult {
        let socket = self.socket.clone();
        let done = self.vm.wait(BOOT_TIMEOUT)?;
        check(done.code == 0, || {
            format!("exit code {}\n{}\n{}", done.code, done.stdout, done.stderr)
        })?;
        check(!socket.exists(), || "the API socket was left behind".into())
    }
}

/// The guest's uptime in the last complete `tick` line. The serial console's output arrives
/// in pieces, so the last line may still be "tick " without its number: only lines that
/// already have their newline count.
fn last_uptime(stdout: &str) -> Result<f64, Failed> {
    let complete = stdout.rfind('\n').map_or("", |end| &stdout[..end]);
    let line = complete
        .lines()
        .rev()
        .find(|l| l.starts_with("tick "))
        .ok_or("no tick line")?;
    line[5..]
        .trim()
        .parse()
        .map_err(|e| format!("bad tick line {line:?}: {e}").into())
}

pub fn pause_resume_and_power_button() -> TestResult {
    let ticker = "head -c 64 /dev/hwrng >/dev/null; \
        while true; do echo tick $(cut -d' ' -f1 /proc/uptime); sleep 0.2; done";
    let mut g = ApiVm::spawn("pause", &["--rng"], ticker)?;
    g.vm.wait_for(READY, 1, BOOT_TIMEOUT)?;
    g.vm.wait_for("tick ", 3, Duration::from_secs(60))?;
    let info = g.info()?;
    check(
        info.state == VmState::Running
            && info.pid == g.vm.pid()
            && info.boots == 1
            && info.memory_bytes == 256 << 20,
        || format!("{info:?}"),
    )?;
    g.put(paths::RESUME, 409)?;

    let before = Instant::now();
    let uptime_before = last_uptime(&g.vm.stdout())?;
    g.put(paths::PAUSE, 204)?;
    check(g.info()?.state == VmState::Paused, || "not paused".into())?;
    std::thread::sleep(Duration::from_millis(500)); // output already on its way
    let frozen = g.vm.stdout();
    std::thread::sleep(Duration::from_secs(3));
    check(g.vm.stdout() == frozen, || {
        "the guest ran while paused".into()
    })?;
    g.put(paths::POWER_BUTTON, 409)?;

    g.put(paths::RESUME, 204)?;
    let ticks = frozen.matches("tick ").count();
    g.vm.wait_for("tick ", ticks + 5, Duration::from_secs(60))?;
    let wall = before.elapsed().as_secs_f64();
    let guest = last_uptime(&g.vm.stdout())? - uptime_before;
    check(guest < wall - 1.5, || {
        format!("guest time ran on while paused: {guest:.1} s in the guest, {wall:.1} s outside")
    })?;

    let counters: VmCounters = g.get(paths::COUNTERS)?;
    let exits: u64 = counters.vcpus[0].exits.values().sum();
    let rng = counters.devices.iter().find(|d| d.id == "rng0");
    check(
        exits > 0 && rng.is_some_and(|r| r.counters["bytes"] >= 64),
        || format!("{counters:?}"),
    )?;

    g.put(paths::POWER_BUTTON, 204)?;
    g.vm.wait_for("ferro-guest: power button", 1, Duration::from_secs(60))?;
    g.exits_cleanly()
}

pub fn reset_and_stop() -> TestResult {
    let mut g = ApiVm::spawn("reset", &[], "sleep 600")?;
    g.vm.wait_for(READY, 1, BOOT_TIMEOUT)?;
    g.put(paths::RESET, 204)?;
    g.vm.wait_for(READY, 2, BOOT_TIMEOUT)?;
    let info = g.info()?;
    check(info.boots == 2 && info.state == VmState::Running, || {
        format!("{info:?}")
    })?;
    g.put(paths::STOP, 204)?;
    g.exits_cleanly()
}

/// A guest whose serial interrupt is lost on purpose (`--fault mute-serial-irq`) stalls with
/// nothing printed: the stall watchdog stops the wait once the guest has shown no progress for
/// its limit, and the stall report shows the UART waiting for an interrupt that never came
/// (THR-empty interrupt enabled and pending).
pub fn a_lost_serial_interrupt_is_caught_by_the_watchdog() -> TestResult {
    const LIMIT: Duration = Duration::from_secs(20);
    let ApiVm { vm, socket, .. } =
        ApiVm::spawn("mute", &["--fault", "mute-serial-irq"], "echo after-ready")?;
    let mut vm = vm.watch_with(Box::new(VmmProbe::new(&socket)), LIMIT);
    let started = Instant::now();
    let Err(error) = vm.wait_for(READY, 1, BOOT_TIMEOUT) else {
        return Err("the guest printed through a muted serial interrupt".into());
    };
    let took = started.elapsed();
    check(error.contains("the guest stalled"), || {
        format!("not caught as a stall after {took:?}:\n{error}")
    })?;
    // The guest boots (tens of seconds in the nested testbed), then stands still.
    check(took < BOOT_TIMEOUT, || {
        format!("caught only after {took:?}")
    })?;
    let serial = error
        .lines()
        .find(|line| line.starts_with("Serial COM1:"))
        .ok_or_else(|| format!("no COM1 line in the report:\n{error}"))?;
    let ier = serial
        .split_whitespace()
        .find_map(|word| word.strip_prefix("IER="))
        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        .ok_or_else(|| format!("no IER in {serial:?}"))?;
    check(
        ier & 0x02 != 0 && serial.contains("; THR-empty interrupt pending"),
        || format!("the report does not show the waiting UART: {serial}"),
    )?;
    println!("caught after {:.1} s: {serial}", took.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::last_uptime;

    #[test]
    fn a_tick_line_still_arriving_is_not_read() {
        assert_eq!(last_uptime("tick 1.50\ntick 1.70\ntick ").unwrap(), 1.70);
        assert_eq!(last_uptime("tick 1.50\ntick 1.7").unwrap(), 1.50);
        assert_eq!(last_uptime("tick 2.25\r\n").unwrap(), 2.25);
        assert!(last_uptime("tick 3.0").is_err());
        assert!(last_uptime("tick x\n").is_err());
    }
}
