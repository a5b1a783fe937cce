//! `ferro run`: checks the configuration against the host, then boots the machine again and
//! again for as long as the guest reboots.

use std::path::Path;

use api::{ByteSize, RunnableConfig, VmConfig};
use hypervisor::Hypervisor;

use crate::api_server::ApiServer;
use crate::console::Console;
use crate::control::Session;
use crate::error::Error;
use crate::faults::Faults;
use crate::machine::{Backends, Machine, StopReason};
use crate::signals::{self, TerminationSignals};
use crate::stats::Stats;
use crate::vcpu::HostCpu;
use sandbox::ThreadKind;

/// How a VM run ended when nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PoweredOff,
    /// The guest rebooted and `no_reboot` was set.
    Rebooted,
    /// The user quit from the console.
    Quit,
    /// A termination signal (SIGINT, SIGTERM, SIGHUP) stopped the VM.
    Signal(i32),
    /// A control-API client stopped the VM.
    Stopped,
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PoweredOff | Outcome::Rebooted | Outcome::Quit | Outcome::Stopped => 0,
            Outcome::Signal(signal) => 128 + signal,
        }
    }
}

fn check_host_limits(config: &VmConfig, hv: &Hypervisor) -> Result<(), Error> {
    let max = hv.max_vcpus();
    if config.cpus as usize > max {
        return Err(Error::TooManyCpusForHost {
            requested: config.cpus,
            max,
        });
    }
    if let Some(host) = hypervisor::host_memory_bytes() {
        if config.memory.0 > host {
            return Err(Error::MemoryTooLarge {
                requested: config.memory,
                host: ByteSize(host),
            });
        }
    }
    Ok(())
}

/// Runs the VM described by `runnable` (checked once, by [`api::VmConfig::into_runnable`])
/// with its serial console on `console`, serving the control API on `api_socket` if given,
/// with the deliberate `faults` (none, but in tests of the stall tooling). The process's
/// resource limits are set once the images are open ([`sandbox::ProcessLimits`]); core dumps
/// only if `core_dumps`.
pub fn run(
    runnable: &RunnableConfig,
    console: &mut Console,
    api_socket: Option<&Path>,
    faults: Faults,
    core_dumps: bool,
) -> Result<Outcome, Error> {
    let config: &VmConfig = runnable;
    if !hypervisor::host_has_hardware_virtualization() {
        tracing::warn!(
            "this host has no hardware virtualization (no vmx/svm in /proc/cpuinfo): guests may be very slow or fail"
        );
    }
    let hv = Hypervisor::open().map_err(Error::Kvm)?;
    check_host_limits(config, &hv)?;
    let mut backends = Backends::open(runnable)?;
    backends
        .limits(config, core_dumps)
        .apply()
        .map_err(Error::Limits)?;
    let host = HostCpu::probe(&hv)?;
    let stats = Stats::new(config);
    signals::install_vcpu_kick_handler().map_err(Error::ControlLoop)?;
    let signals = TerminationSignals::block().map_err(Error::ControlLoop)?;
    signals::start_spawner().map_err(Error::ControlLoop)?;
    // Last step that can fail before the guest runs: a client that sees the socket can use it.
    let api = api_socket.map(ApiServer::start).transpose()?;
    // From here on the main thread only builds machines and runs their control loop.
    sandbox::confine_current_thread(ThreadKind::Vmm).map_err(Error::Confine)?;
    let mut session = Session {
        config,
        console,
        signals: &signals,
        api: api.as_ref().map(|(_, inbox)| inbox),
        stats: &stats,
        boots: 0,
    };
    loop {
        let machine = Machine::build(
            &hv,
            &host,
            config,
            &mut backends,
            &stats,
            session.console.output(),
            faults,
        )?;
        session.boots += 1;
        guest_log::guest_debug!("VM built; starting the guest (boot {})", session.boots);
        match machine.run(&mut session)? {
            StopReason::PowerOff => return Ok(Outcome::PoweredOff),
            StopReason::Reset if config.no_reboot => return Ok(Outcome::Rebooted),
            StopReason::Reset => guest_log::guest_info!("guest reset; booting again"),
            StopReason::Quit => return Ok(Outcome::Quit),
            StopReason::Signal(signal) => return Ok(Outcome::Signal(signal)),
            StopReason::Stopped => return Ok(Outcome::Stopped),
        }
    }
}
