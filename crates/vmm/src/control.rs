//! The control loop of one boot. It owns the VM's state machine and waits, on the VMM's main
//! thread, for whatever can change it: the guest's power events, a failing vCPU, console input,
//! termination signals and control-API requests. Pause parks the vCPU threads at their gate and
//! saves the guest clock; resume restores the clock and lets them go. The stall report
//! (`diagnostics`) is gathered here too, from the vCPU threads through their probes.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use api::vmm_api::VmInfo;
use api::{VmConfig, VmState};
use devices::bus::lock;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::api_server::{answer, ApiCommand, ApiInbox, ApiReply, ApiRequest};
use crate::console::Console;
use crate::diagnostics::{self, Sources};
use crate::error::Error;
use crate::machine::{ConsoleTarget, Machine, StopReason};
use crate::signals::TerminationSignals;
use crate::stats::Stats;
use crate::vcpu::{self, VcpuGate, VcpuRunner};
use crate::vcpu_probe::VcpuProbe;

/// What lives as long as the VMM process, across boots.
pub(crate) struct Session<'a> {
    pub config: &'a VmConfig,
    pub console: &'a mut Console,
    pub signals: &'a TerminationSignals,
    pub api: Option<&'a ApiInbox>,
    pub stats: &'a Stats,
    /// Boots so far, this one included.
    pub boots: u64,
}

/// The running vCPU threads of one boot.
struct VcpuThreads {
    stop: Arc<AtomicBool>,
    gate: Arc<VcpuGate>,
    handles: Vec<JoinHandle<()>>,
    /// Per vCPU, in the order of `handles`.
    probes: Vec<Arc<VcpuProbe>>,
}

impl VcpuThreads {
    /// Makes vCPU thread `i` look at its probe soon; false if it has ended.
    fn kick(&self, i: usize) -> bool {
        let Some(handle) = self.handles.get(i).filter(|h| !h.is_finished()) else {
            return false;
        };
        let _ = handle.kill(crate::signals::vcpu_kick_signal());
        self.gate.poke();
        true
    }
}

impl Machine {
    /// Runs the guest until it powers off, resets, fails, or the user, a signal or an API
    /// client stops it.
    pub fn run(mut self, session: &mut Session<'_>) -> Result<StopReason, Error> {
        self.transition(VmState::Running);
        let mut threads = VcpuThreads {
            stop: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(VcpuGate::default()),
            handles: Vec::new(),
            probes: Vec::new(),
        };
        let (failures_tx, failures) = mpsc::channel();
        let failure_event = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Devices)?;
        let mut result = Ok(StopReason::PowerOff);
        for vcpu in std::mem::take(&mut self.vcpus) {
            let id = vcpu.id();
            let probe = vcpu::new_probe();
            let runner = VcpuRunner {
                vcpu,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                power: self.power.try_clone().map_err(Error::Devices)?,
                stop: threads.stop.clone(),
                gate: threads.gate.clone(),
                exits: session.stats.vcpu(id),
                probe: probe.clone(),
                failures: failures_tx.clone(),
                failure_event: failure_event.try_clone().map_err(Error::Devices)?,
                forbidden_syscall: self.faults.forbidden_syscall,
            };
            match runner.spawn() {
                Ok(handle) => {
                    threads.handles.push(handle);
                    threads.probes.push(probe);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.control_loop(session, &threads, &failures, &failure_event);
        }
        guest_log::guest_debug!("boot ends: {result:?}");
        self.transition(VmState::Stopping);
        vcpu::stop_all(&threads.stop, &threads.gate, threads.handles);
        self.transition(VmState::Stopped);
        guest_log::guest_debug!("all vCPUs stopped");
        // A vCPU that failed while others were being stopped still explains the end.
        match (result, failures.try_recv()) {
            (Ok(StopReason::Reset | StopReason::PowerOff), Ok(failure)) => Err(failure),
            (result, _) => result,
        }
    }

    fn transition(&mut self, to: VmState) {
        if let Err(e) = self.state.transition(to) {
            tracing::error!("{e}");
        }
    }

    fn feed_console(&self, console: &mut Console) {
        match &self.console_input {
            ConsoleTarget::Serial(serial) => {
                console.deliver(|bytes| lock(serial).enqueue_input(bytes))
            }
            ConsoleTarget::Hvc(input) => console.deliver(|bytes| input.enqueue(bytes)),
        }
    }

    fn control_loop(
        &mut self,
        session: &mut Session<'_>,
        threads: &VcpuThreads,
        failures: &Receiver<Error>,
        failure_event: &EventFd,
    ) -> Result<StopReason, Error> {
        const SHUTDOWN: u64 = 0;
        const RESET: u64 = 1;
        const VCPU_FAILED: u64 = 2;
        const INPUT: u64 = 3;
        const INPUT_DRAINED: u64 = 4;
        const QUIT: u64 = 5;
        const SIGNAL: u64 = 6;
        const API: u64 = 7;
        let epoll = Epoll::new().map_err(Error::ControlLoop)?;
        let mut sources: Vec<(RawFd, u64)> = vec![
            (self.power.shutdown.as_raw_fd(), SHUTDOWN),
            (self.power.reset.as_raw_fd(), RESET),
            (failure_event.as_raw_fd(), VCPU_FAILED),
            (session.console.input_ready_fd(), INPUT),
            (self.input_drained.as_raw_fd(), INPUT_DRAINED),
            (session.console.quit_fd(), QUIT),
            (session.signals.as_raw_fd(), SIGNAL),
        ];
        if let Some(api) = session.api {
            sources.push((api.event.as_raw_fd(), API));
        }
        for &(fd, token) in &sources {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::ControlLoop)?;
        }
        // Input typed, and API requests sent, during a previous boot are still waiting.
        self.feed_console(session.console);
        if let Some(stop) = self.serve_api(session, threads) {
            return Ok(stop);
        }
        let mut events = vec![EpollEvent::default(); sources.len()];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::ControlLoop(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    SHUTDOWN => return Ok(StopReason::PowerOff),
                    RESET => return Ok(StopReason::Reset),
                    VCPU_FAILED => {
                        let _ = failure_event.read();
                        if let Ok(failure) = failures.try_recv() {
                            return Err(failure);
                        }
                    }
                    INPUT => {
                        session.console.collect_input();
                        self.feed_console(session.console);
                    }
                    INPUT_DRAINED => {
                        let _ = self.input_drained.read();
                        self.feed_console(session.console);
                    }
                    QUIT if session.console.quit_requested() => return Ok(StopReason::Quit),
                    SIGNAL => {
                        let signal = session.signals.read().map_err(Error::ControlLoop)?;
                        if let Some(signal) = signal {
                            return Ok(StopReason::Signal(signal));
                        }
                    }
                    API => {
                        if let Some(stop) = self.serve_api(session, threads) {
                            return Ok(stop);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Answers every waiting API request; returns why to stop if one asked for it.
    fn serve_api(&mut self, session: &Session<'_>, threads: &VcpuThreads) -> Option<StopReason> {
        let api = session.api?;
        while let Some(request) = api.next() {
            if let Some(stop) = self.handle_api(request, session, threads) {
                return Some(stop);
            }
        }
        None
    }

    fn handle_api(
        &mut self,
        request: ApiRequest,
        session: &Session<'_>,
        threads: &VcpuThreads,
    ) -> Option<StopReason> {
        tracing::debug!("API: {:?} while {}", request.command, self.state);
        let (reply, stop) = match request.command {
            ApiCommand::Info => (ApiReply::Info(Box::new(self.info(session))), None),
            ApiCommand::Counters => (ApiReply::Counters(session.stats.snapshot()), None),
            ApiCommand::Diagnostics => {
                let ram: Vec<(u64, u64)> = arch::layout::MemoryLayout::new(session.config.memory.0)
                    .map(|layout| {
                        layout
                            .ram_ranges()
                            .into_iter()
                            .map(|(start, size)| (start.0, size))
                            .collect()
                    })
                    .unwrap_or_default();
                let report = diagnostics::report(&Sources {
                    state: self.state,
                    vm: &self.vm,
                    serial: &self.serial,
                    virtio_queues: &self.virtio_queues,
                    probes: &threads.probes,
                    kick: &|i| threads.kick(i),
                    ram: &ram,
                });
                (ApiReply::Diagnostics(Box::new(report)), None)
            }
            ApiCommand::Pause => (self.pause(threads), None),
            ApiCommand::Resume => (self.resume(threads), None),
            ApiCommand::PowerButton => (self.press_power_button(), None),
            ApiCommand::Reset => (ApiReply::Done, Some(StopReason::Reset)),
            ApiCommand::Stop => (ApiReply::Done, Some(StopReason::Stopped)),
        };
        answer(request, reply);
        stop
    }

    fn info(&self, session: &Session<'_>) -> VmInfo {
        VmInfo {
            state: self.state,
            config: session.config.clone(),
            vcpus: session.config.cpus,
            memory_bytes: session.config.memory.0,
            pid: std::process::id(),
            boots: session.boots,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Refuses a command that needs `needed` when the VM is elsewhere.
    fn require(&self, needed: VmState, action: &str) -> Result<(), ApiReply> {
        if self.state == needed {
            return Ok(());
        }
        Err(ApiReply::Conflict(format!(
            "cannot {action}: the VM is {}, not {needed}",
            self.state
        )))
    }

    fn pause(&mut self, threads: &VcpuThreads) -> ApiReply {
        if let Err(refused) = self.require(VmState::Running, "pause") {
            return refused;
        }
        if !threads.gate.pause(&threads.handles) {
            return ApiReply::Failed("the vCPUs did not stop in time; the VM keeps running".into());
        }
        // Guest time stands still while paused, as on QEMU.
        self.paused_clock = match self.vm.clock() {
            Ok(clock) => Some(clock),
            Err(e) => {
                tracing::warn!("cannot save the guest clock: {e}");
                None
            }
        };
        self.transition(VmState::Paused);
        ApiReply::Done
    }

    fn resume(&mut self, threads: &VcpuThreads) -> ApiReply {
        if let Err(refused) = self.require(VmState::Paused, "resume") {
            return refused;
        }
        if let Some(clock) = self.paused_clock.take() {
            if let Err(e) = self.vm.set_clock(clock) {
                tracing::warn!("cannot restore the guest clock: {e}");
            }
        }
        threads.gate.resume();
        self.transition(VmState::Running);
        ApiReply::Done
    }

    fn press_power_button(&self) -> ApiReply {
        if let Err(refused) = self.require(VmState::Running, "press the power button") {
            return refused;
        }
        match self.ged.raise(arch::acpi::ged_events::POWER_BUTTON) {
            Ok(()) => ApiReply::Done,
            Err(e) => ApiReply::Failed(format!("cannot signal the guest: {e}")),
        }
    }
}
