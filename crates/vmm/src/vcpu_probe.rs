//! Asking vCPU threads what their vCPUs are doing, for the stall report.
//!
//! KVM lets only the thread that runs a vCPU read its registers while it runs, so the control
//! loop posts a request (a generation number) in each vCPU's [`VcpuProbe`] and kicks the
//! threads with their signal; each thread answers between two `KVM_RUN`s (or while parked at
//! the pause gate) and goes on. A thread that does not answer in time, e.g. one blocked in a
//! device outside `KVM_RUN`, is reported as such instead of holding the report up.
//!
//! Threading: [`VcpuProbe::answer_if_asked`] runs on the vCPU thread and costs one atomic load
//! when nobody asks; [`ask_all`] runs on the control loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use api::diagnostics::{InjectedInterrupt, MpState, PendingException, VcpuEvents, VcpuRegisters};
use hypervisor::Vcpu;

use crate::exit_window::ExitWindow;

/// What a vCPU thread answers: its registers, or why it could not read them.
pub(crate) type Answer = Result<VcpuRegisters, String>;

/// One vCPU's side of the conversation, shared by its thread and the control loop.
#[derive(Debug)]
pub(crate) struct VcpuProbe {
    pub exits: ExitWindow,
    /// The generation of the latest request.
    asked: AtomicU64,
    /// The generation of the latest answer (equal to `asked` when there is nothing to do).
    answered: AtomicU64,
    answer: Mutex<Option<(u64, Answer)>>,
    ready: Condvar,
}

impl VcpuProbe {
    pub fn new(exit_names: &'static [&'static str]) -> Self {
        VcpuProbe {
            exits: ExitWindow::new(exit_names),
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            answer: Mutex::new(None),
            ready: Condvar::new(),
        }
    }

    /// On the vCPU thread: answers the latest request with `read()` if it is not answered yet.
    pub fn answer_if_asked(&self, read: impl FnOnce() -> Answer) {
        let asked = self.asked.load(Ordering::Acquire);
        if asked == self.answered.load(Ordering::Relaxed) {
            return;
        }
        let answer = read();
        *self.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some((asked, answer));
        self.answered.store(asked, Ordering::Release);
        self.ready.notify_all();
    }

    /// Posts a new request; returns its generation.
    fn ask(&self) -> u64 {
        self.asked.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The answer to request `generation`, waiting for it at most `wait`.
    fn take(&self, generation: u64, wait: Duration) -> Option<Answer> {
        let guard = self.answer.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut guard, _) = self
            .ready
            .wait_timeout_while(
                guard,
                wait,
                |answer| !matches!(answer, Some((g, _)) if *g == generation),
            )
            .unwrap_or_else(PoisonError::into_inner);
        match guard.take() {
            Some((g, answer)) if g == generation => Some(answer),
            other => {
                *guard = other;
                None
            }
        }
    }
}

/// Asks every vCPU thread for its registers and waits at most `timeout` for all answers.
/// `kick(i)` makes thread `i` look at its probe soon (a signal out of `KVM_RUN`, a nudge at the
/// pause gate) and returns false if the thread has ended. Kicks repeat until the answer comes,
/// since one can land just before a thread enters `KVM_RUN`.
pub(crate) fn ask_all(
    probes: &[Arc<VcpuProbe>],
    kick: &dyn Fn(usize) -> bool,
    timeout: Duration,
) -> Vec<Answer> {
    let generations: Vec<u64> = probes.iter().map(|p| p.ask()).collect();
    let mut answers: Vec<Option<Answer>> = probes.iter().map(|_| None).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let mut first_pending = None;
        for (i, probe) in probes.iter().enumerate() {
            if answers[i].is_some() {
                continue;
            }
            if let Some(answer) = probe.take(generations[i], Duration::ZERO) {
                answers[i] = Some(answer);
            } else if !kick(i) {
                answers[i] = Some(Err("the vCPU thread has ended".into()));
            } else {
                first_pending.get_or_insert(i);
            }
        }
        let Some(i) = first_pending else { break };
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(1));
        if let Some(answer) = probes[i].take(generations[i], wait) {
            answers[i] = Some(answer);
        }
    }
    let late = || {
        Err(format!(
            "no answer within {} ms: the vCPU thread is outside KVM_RUN (in a device?)",
            timeout.as_millis()
        ))
    };
    answers
        .into_iter()
        .map(|answer| answer.unwrap_or_else(late))
        .collect()
}

/// On the vCPU thread: what the stall report shows of `vcpu`.
pub(crate) fn read_registers(vcpu: &Vcpu) -> Answer {
    let describe = |e: hypervisor::Error| api::error_chain(&e);
    let regs = vcpu.get_regs().map_err(describe)?;
    let sregs = vcpu.get_sregs().map_err(describe)?;
    let mp_state = vcpu.mp_state().map_err(describe)?;
    let events = vcpu.events().map_err(describe)?;
    Ok(VcpuRegisters {
        rip: regs.rip,
        rsp: regs.rsp,
        rflags: regs.rflags,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
        cs: sregs.cs.selector,
        cpl: sregs.cs.dpl,
        mp_state: mp_state_of(mp_state),
        events: events_of(&events),
    })
}

fn mp_state_of(state: hypervisor::MpState) -> MpState {
    use hypervisor::MpState as Kvm;
    match state {
        Kvm::Runnable => MpState::Runnable,
        Kvm::Uninitialized => MpState::Uninitialized,
        Kvm::InitReceived => MpState::InitReceived,
        Kvm::Halted => MpState::Halted,
        Kvm::SipiReceived => MpState::SipiReceived,
        Kvm::Stopped => MpState::Stopped,
        Kvm::CheckStop => MpState::CheckStop,
        Kvm::Operating => MpState::Operating,
        Kvm::Load => MpState::Load,
        Kvm::ApResetHold => MpState::ApResetHold,
        Kvm::Suspended => MpState::Suspended,
        Kvm::Other(_) => MpState::Unknown,
    }
}

fn events_of(events: &hypervisor::VcpuEvents) -> VcpuEvents {
    let e = &events.exception;
    let i = &events.interrupt;
    VcpuEvents {
        exception: (e.injected != 0 || e.pending != 0).then(|| PendingException {
            vector: e.nr,
            error_code: (e.has_error_code != 0).then_some(e.error_code),
            injected: e.injected != 0,
            pending: e.pending != 0,
        }),
        interrupt: (i.injected != 0).then_some(InjectedInterrupt {
            vector: i.nr,
            soft: i.soft != 0,
        }),
        interrupt_shadow: i.shadow != 0,
        nmi_injected: events.nmi.injected != 0,
        nmi_pending: events.nmi.pending != 0,
        nmi_masked: events.nmi.masked != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["io_out"];

    fn registers(rip: u64) -> VcpuRegisters {
        VcpuRegisters {
            rip,
            rsp: 0,
            rflags: 2,
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: 8,
            cpl: 0,
            mp_state: MpState::Runnable,
            events: events_of(&hypervisor::VcpuEvents::default()),
        }
    }

    #[test]
    fn nothing_is_read_until_asked_and_each_request_is_answered_once() {
        let probe = VcpuProbe::new(NAMES);
        probe.answer_if_asked(|| panic!("read without a request"));
        let generation = probe.ask();
        probe.answer_if_asked(|| Ok(registers(0x1000)));
        probe.answer_if_asked(|| panic!("read twice"));
        assert_eq!(
            probe.take(generation, Duration::ZERO),
            Some(Ok(registers(0x1000)))
        );
        assert_eq!(probe.take(generation, Duration::ZERO), None);
    }

    #[test]
    fn a_late_answer_to_an_old_request_is_not_taken_for_a_new_one() {
        let probe = VcpuProbe::new(NAMES);
        let old = probe.ask();
        let new = probe.ask();
        probe.answer_if_asked(|| Ok(registers(1)));
        assert_eq!(probe.take(old, Duration::ZERO), None);
        assert_eq!(probe.take(new, Duration::ZERO), Some(Ok(registers(1))));
    }

    /// Thread 0 answers when kicked, thread 1 never does, thread 2 has ended: the report comes
    /// back within the timeout with each vCPU's own outcome.
    #[test]
    fn a_thread_that_never_answers_costs_only_the_timeout() {
        let probes: Vec<Arc<VcpuProbe>> = (0..3).map(|_| Arc::new(VcpuProbe::new(NAMES))).collect();
        let answering = probes[0].clone();
        let kick = move |i: usize| {
            if i == 0 {
                answering.answer_if_asked(|| Ok(registers(0x42)));
            }
            i != 2
        };
        let start = Instant::now();
        let answers = ask_all(&probes, &kick, Duration::from_millis(100));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(answers[0], Ok(registers(0x42)));
        assert!(answers[1]
            .as_ref()
            .unwrap_err()
            .contains("no answer within 100 ms"));
        assert_eq!(answers[2], Err("the vCPU thread has ended".into()));
    }

    #[test]
    fn an_answer_from_another_thread_ends_the_wait_early() {
        let probes = vec![Arc::new(VcpuProbe::new(NAMES))];
        let probe = probes[0].clone();
        let vcpu = std::thread::spawn(move || {
            while probe.answered.load(Ordering::Acquire) == 0 {
                probe.answer_if_asked(|| Ok(registers(7)));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let start = Instant::now();
        let answers = ask_all(&probes, &|_| true, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(answers, vec![Ok(registers(7))]);
        vcpu.join().unwrap();
    }

    #[test]
    fn events_show_what_kvm_holds() {
        let mut kvm = hypervisor::VcpuEvents::default();
        kvm.exception.injected = 1;
        kvm.exception.nr = 8;
        kvm.exception.has_error_code = 1;
        kvm.interrupt.shadow = 1;
        kvm.nmi.masked = 1;
        let events = events_of(&kvm);
        assert_eq!(
            events.exception,
            Some(PendingException {
                vector: 8,
                error_code: Some(0),
                injected: true,
                pending: false
            })
        );
        assert_eq!(events.interrupt, None);
        assert!(events.interrupt_shadow && events.nmi_masked && !events.nmi_pending);
    }
}
