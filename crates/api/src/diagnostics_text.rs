//! The stall report ([`crate::diagnostics::VmDiagnostics`]) as text a person can read: a
//! block per vCPU, a line per virtqueue, then COM1, the PICs and the IOAPIC. Shared by
//! `ferro vm diagnose` and the end-to-end tests' stall watchdog, so both print it alike.
//!
//! Threading: pure formatting.

use std::fmt::Write as _;

use crate::diagnostics::{
    IrqchipDiagnostics, SerialDiagnostics, VcpuDiagnostics, VirtioQueueDiagnostics, VmDiagnostics,
};

/// The report as text: a block per vCPU, a line per virtqueue, then COM1, the PICs and the
/// IOAPIC.
pub fn render(name: &str, report: &VmDiagnostics) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VM {name}: {} (exits counted over the last {} s; vCPUs given {} ms to answer)",
        report.state, report.exit_window_seconds, report.vcpu_answer_timeout_ms
    );
    for vcpu in &report.vcpus {
        render_vcpu(&mut out, vcpu);
    }
    for queue in &report.virtio_queues {
        render_queue(&mut out, queue);
    }
    if let Some(serial) = &report.serial {
        render_serial(&mut out, serial);
    }
    if let Some(irqchip) = &report.irqchip {
        render_irqchip(&mut out, irqchip);
    }
    for note in &report.notes {
        let _ = writeln!(out, "Note: {note}");
    }
    out
}

fn render_vcpu(out: &mut String, vcpu: &VcpuDiagnostics) {
    match &vcpu.registers {
        Some(r) => {
            let _ = writeln!(
                out,
                "vCPU {}: {}  rip={:016x} rsp={:016x} rflags={:08x} (IF={}) cs={:04x} cpl={}",
                vcpu.id,
                r.mp_state.as_str(),
                r.rip,
                r.rsp,
                r.rflags,
                u8::from(r.interrupts_enabled()),
                r.cs,
                r.cpl
            );
            let _ = writeln!(
                out,
                "  cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} efer={:x}",
                r.cr0, r.cr2, r.cr3, r.cr4, r.efer
            );
            let _ = writeln!(out, "  events: {}", events_text(&r.events));
        }
        None => {
            let why = vcpu.unavailable.as_deref().unwrap_or("not reported");
            let _ = writeln!(out, "vCPU {}: registers unavailable: {why}", vcpu.id);
        }
    }
    let last = match vcpu.ms_since_last_exit {
        Some(ms) => format!("{ms} ms ago"),
        None => "never (this boot)".into(),
    };
    let recent: Vec<String> = vcpu
        .recent_exits
        .iter()
        .filter(|(_, &count)| count > 0)
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    let recent = if recent.is_empty() {
        "none".to_string()
    } else {
        recent.join(", ")
    };
    let _ = writeln!(out, "  last exit {last}; recent exits: {recent}");
}

fn events_text(e: &crate::diagnostics::VcpuEvents) -> String {
    let mut parts = Vec::new();
    if let Some(x) = &e.exception {
        let code = x
            .error_code
            .map(|c| format!(" error code {c:#x}"))
            .unwrap_or_default();
        let how = match (x.injected, x.pending) {
            (true, true) => "injected, pending",
            (true, false) => "injected",
            _ => "pending",
        };
        parts.push(format!("exception {}{code} {how}", x.vector));
    }
    if let Some(i) = &e.interrupt {
        let soft = if i.soft { " (software)" } else { "" };
        parts.push(format!("interrupt {:#04x}{soft} injected", i.vector));
    }
    for (set, text) in [
        (e.interrupt_shadow, "interrupt shadow"),
        (e.nmi_injected, "NMI injected"),
        (e.nmi_pending, "NMI pending"),
        (e.nmi_masked, "NMIs masked"),
    ] {
        if set {
            parts.push(text.into());
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

fn render_queue(out: &mut String, q: &VirtioQueueDiagnostics) {
    let name = format!("{} queue {}", q.device, q.queue);
    if !q.active {
        let _ = writeln!(out, "{name}: not started by the driver");
        return;
    }
    let idx = |v: Option<u16>| v.map_or("?".into(), |v| v.to_string());
    let ago = |v: Option<u64>| v.map_or("never".into(), |ms| format!("{ms} ms ago"));
    let _ = writeln!(
        out,
        "{name}: size {} avail {} (device at {}) used {} (device at {}) in flight {}; \
         notified {} time(s), last {}; interrupted {} time(s), last {}",
        q.size,
        idx(q.driver_avail_idx),
        q.next_avail,
        idx(q.used_idx),
        q.next_used,
        q.in_flight,
        q.notifications,
        ago(q.ms_since_notification),
        q.interrupts,
        ago(q.ms_since_interrupt)
    );
}

fn render_serial(out: &mut String, s: &SerialDiagnostics) {
    let thre = if s.thre_interrupt_pending {
        "THR-empty interrupt pending"
    } else {
        "no THR-empty interrupt pending"
    };
    let _ = writeln!(
        out,
        "Serial COM1: IER={:02x} IIR={:02x} LSR={:02x} LCR={:02x} MCR={:02x}; {thre}; {} byte(s) of input waiting",
        s.ier, s.iir, s.lsr, s.lcr, s.mcr, s.input_bytes
    );
}

fn render_irqchip(out: &mut String, chip: &IrqchipDiagnostics) {
    for pic in &chip.pics {
        let _ = writeln!(
            out,
            "PIC {:<9}: IRR={:02x} IMR={:02x} ISR={:02x} ELCR={:02x} base={:#04x}",
            pic.name, pic.irr, pic.imr, pic.isr, pic.elcr, pic.irq_base
        );
    }
    let io = &chip.ioapic;
    let _ = writeln!(out, "IOAPIC {}: IRR={:08x}", io.id, io.irr);
    let mut masked = Vec::new();
    for pin in &io.pins {
        let asserted = io.irr & (1 << pin.pin) != 0;
        if pin.masked && !asserted && !pin.remote_irr {
            masked.push(pin.pin.to_string());
            continue;
        }
        let mut flags = vec![if pin.level_triggered { "level" } else { "edge" }];
        flags.push(if pin.active_low { "low" } else { "high" });
        for (set, text) in [
            (pin.masked, "masked"),
            (pin.remote_irr, "remote-IRR"),
            (pin.delivery_pending, "delivery-pending"),
            (asserted, "asserted"),
            (pin.logical_destination, "logical"),
        ] {
            if set {
                flags.push(text);
            }
        }
        let _ = writeln!(
            out,
            "  pin {:>2}: vector {:#04x} mode {} dest {} {}",
            pin.pin,
            pin.vector,
            pin.delivery_mode,
            pin.destination,
            flags.join(" ")
        );
    }
    if !masked.is_empty() {
        let _ = writeln!(out, "  masked, idle pins: {}", masked.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::{
        IoapicDiagnostics, IoapicPin, MpState, PendingException, PicDiagnostics, VcpuEvents,
        VcpuRegisters,
    };
    use crate::VmState;

    fn report() -> VmDiagnostics {
        let quiet = VcpuEvents {
            exception: None,
            interrupt: None,
            interrupt_shadow: false,
            nmi_injected: false,
            nmi_pending: false,
            nmi_masked: false,
        };
        let halted = VcpuRegisters {
            rip: 0x10_0208,
            rsp: 0x8ff0,
            rflags: 0x202,
            cr0: 0x8000_0011,
            cr2: 0,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            cs: 8,
            cpl: 0,
            mp_state: MpState::Halted,
            events: VcpuEvents {
                exception: Some(PendingException {
                    vector: 8,
                    error_code: Some(0),
                    injected: true,
                    pending: false,
                }),
                nmi_masked: true,
                ..quiet
            },
        };
        let mut pins: Vec<IoapicPin> = (0..24).map(|pin| IoapicPin::decode(pin, 1 << 16)).collect();
        pins[4] = IoapicPin::decode(4, 0x24);
        VmDiagnostics {
            state: VmState::Running,
            vcpu_answer_timeout_ms: 500,
            exit_window_seconds: 5,
            vcpus: vec![
                VcpuDiagnostics {
                    id: 0,
                    ms_since_last_exit: Some(12),
                    recent_exits: [("io_out".to_string(), 3), ("io_in".to_string(), 0)].into(),
                    registers: Some(halted),
                    unavailable: None,
                },
                VcpuDiagnostics {
                    id: 1,
                    ms_since_last_exit: None,
                    recent_exits: [("io_out".to_string(), 0)].into(),
                    registers: None,
                    unavailable: Some("no answer within 500 ms".into()),
                },
            ],
            virtio_queues: vec![
                VirtioQueueDiagnostics {
                    device: "block0".into(),
                    queue: 0,
                    active: true,
                    size: 256,
                    next_avail: 40,
                    next_used: 38,
                    in_flight: 2,
                    driver_avail_idx: Some(41),
                    used_idx: Some(38),
                    notifications: 17,
                    interrupts: 16,
                    ms_since_notification: Some(5),
                    ms_since_interrupt: None,
                },
                VirtioQueueDiagnostics {
                    device: "rng0".into(),
                    queue: 0,
                    active: false,
                    size: 0,
                    next_avail: 0,
                    next_used: 0,
                    in_flight: 0,
                    driver_avail_idx: None,
                    used_idx: None,
                    notifications: 0,
                    interrupts: 0,
                    ms_since_notification: None,
                    ms_since_interrupt: None,
                },
            ],
            serial: Some(SerialDiagnostics {
                ier: 0x02,
                iir: 0xc2,
                lsr: 0x60,
                lcr: 0x03,
                mcr: 0x08,
                thre_interrupt_pending: true,
                input_bytes: 0,
            }),
            irqchip: Some(IrqchipDiagnostics {
                pics: vec![PicDiagnostics {
                    name: "primary".into(),
                    irr: 0,
                    imr: 0xff,
                    isr: 0,
                    elcr: 0,
                    irq_base: 8,
                }],
                ioapic: IoapicDiagnostics {
                    id: 0,
                    irr: 1 << 4,
                    pins,
                },
            }),
            notes: vec!["irqchip: something".into()],
        }
    }

    #[test]
    fn the_text_report_shows_each_part() {
        let text = render("web", &report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "VM web: running (exits counted over the last 5 s; vCPUs given 500 ms to answer)"
        );
        assert_eq!(
            lines[1],
            "vCPU 0: halted  rip=0000000000100208 rsp=0000000000008ff0 rflags=00000202 (IF=1) cs=0008 cpl=0"
        );
        assert_eq!(
            lines[2],
            "  cr0=80000011 cr2=0000000000000000 cr3=0000000000009000 cr4=00000020 efer=500"
        );
        assert_eq!(
            lines[3],
            "  events: exception 8 error code 0x0 injected; NMIs masked"
        );
        assert_eq!(lines[4], "  last exit 12 ms ago; recent exits: io_out 3");
        assert_eq!(
            lines[5],
            "vCPU 1: registers unavailable: no answer within 500 ms"
        );
        assert_eq!(
            lines[6],
            "  last exit never (this boot); recent exits: none"
        );
        assert_eq!(
            lines[7],
            "block0 queue 0: size 256 avail 41 (device at 40) used 38 (device at 38) in flight 2; \
             notified 17 time(s), last 5 ms ago; interrupted 16 time(s), last never"
        );
        assert_eq!(lines[8], "rng0 queue 0: not started by the driver");
        let lines = &lines[2..];
        assert_eq!(
            lines[7],
            "Serial COM1: IER=02 IIR=c2 LSR=60 LCR=03 MCR=08; THR-empty interrupt pending; 0 byte(s) of input waiting"
        );
        assert_eq!(
            lines[8],
            "PIC primary  : IRR=00 IMR=ff ISR=00 ELCR=00 base=0x08"
        );
        assert_eq!(lines[9], "IOAPIC 0: IRR=00000010");
        assert_eq!(
            lines[10],
            "  pin  4: vector 0x24 mode 0 dest 0 edge high asserted"
        );
        assert!(lines[11].starts_with("  masked, idle pins: 0 1 2 3 5 6"));
        assert_eq!(lines[12], "Note: irqchip: something");
        assert_eq!(lines.len(), 13);
    }
}
