//! QEMU as the control in issue 23's loops, watched the way Ferro is: its progress is the port
//! and MMIO exits KVM counts for its VM (debugfs), the closest match of the VMM exits Ferro's
//! API counts; its stall report is what its human monitor says about the vCPUs and the
//! interrupt controllers; why it stopped is its QMP SHUTDOWN event.
//!
//! Threading: the caller's, one short monitor connection per report; [`QmpEvents`] reads
//! QEMU's events on a thread of its own until QEMU closes the connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kvm_stats;
use crate::stall::Probe;
use crate::Vm;

/// What the report asks: run state, every vCPU's registers, the LAPICs of the first two
/// vCPUs, the PIC and IOAPIC, and the registers again (a livelock moves, a deadlock does not).
const COMMANDS: [&str; 6] = [
    "info status",
    "info registers -a",
    "info lapic 0",
    "info lapic 1",
    "info pic",
    "info registers -a",
];
const PROMPT: &str = "(qemu) ";
/// More than any answer above; a monitor that keeps talking is cut off here.
const MAX_ANSWER: usize = 1 << 20;

/// A QEMU process started with [`QemuMonitorProbe::args`].
#[derive(Debug)]
pub struct QemuMonitorProbe {
    socket: PathBuf,
    pid: u32,
}

impl QemuMonitorProbe {
    /// The probe of QEMU process `pid`, whose monitor listens on `socket`. Its progress is
    /// read from KVM's debugfs counters (see [`kvm_stats::vmm_exits`]; mount debugfs first),
    /// or, without them, from its output alone.
    pub fn new(socket: &Path, pid: u32) -> Self {
        QemuMonitorProbe {
            socket: socket.to_path_buf(),
            pid,
        }
    }

    /// QEMU's arguments for a monitor on `socket` that nobody has to be waiting on.
    pub fn args(socket: &Path) -> [String; 2] {
        [
            "-monitor".into(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ]
    }
}

impl Probe for QemuMonitorProbe {
    fn activity(&self) -> Result<u64, String> {
        Ok(kvm_stats::vmm_exits(self.pid).unwrap_or(0))
    }

    fn report(&self) -> String {
        match ask(&self.socket, &COMMANDS) {
            Ok(text) => format!("QEMU monitor:\n{text}"),
            Err(e) => format!(
                "(no QEMU monitor report from {}: {e})",
                self.socket.display()
            ),
        }
    }
}

/// Each command's answer, after its command line.
fn ask(socket: &Path, commands: &[&str]) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    read_to_prompt(&mut stream)?; // the banner
    let mut text = String::new();
    for command in commands {
        stream.write_all(format!("{command}\n").as_bytes())?;
        let answer = read_to_prompt(&mut stream)?;
        // The monitor echoes the command line first.
        let body = answer.split_once('\n').map_or("", |(_, rest)| rest);
        text.push_str(&format!("> {command}\n"));
        for line in body.lines().filter(|line| !is_register_file(line)) {
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(text)
}

/// The FPU and vector registers of `info registers`: long, and no help with a stall.
fn is_register_file(line: &str) -> bool {
    ["FPR", "XMM", "YMM", "ZMM", "FCW"]
        .iter()
        .any(|prefix| line.starts_with(prefix))
}

/// Reads up to the next prompt; returns what came before it, without terminal escapes.
fn read_to_prompt(stream: &mut impl Read) -> std::io::Result<String> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the monitor closed the connection",
            ));
        }
        raw.extend_from_slice(&chunk[..n]);
        let text = plain(&raw);
        if let Some(before) = text.strip_suffix(PROMPT) {
            return Ok(before.to_string());
        }
        if raw.len() > MAX_ANSWER {
            return Err(std::io::Error::other("the monitor's answer has no end"));
        }
    }
}

/// `raw` without CSI escape sequences (ESC [ parameters, final letter) and carriage returns.
fn plain(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The sockets of one QEMU run: its monitor (the stall report) and QMP (why it stopped).
#[derive(Debug)]
pub struct QemuSockets {
    monitor: PathBuf,
    qmp: PathBuf,
}

impl QemuSockets {
    /// Sockets named after `tag` in the temporary directory (stale ones removed).
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir();
        let sockets = QemuSockets {
            monitor: dir.join(format!("qemu-{tag}.monitor")),
            qmp: dir.join(format!("qemu-{tag}.qmp")),
        };
        let _ = std::fs::remove_file(&sockets.monitor);
        let _ = std::fs::remove_file(&sockets.qmp);
        sockets
    }

    /// QEMU's arguments for both sockets.
    pub fn args(&self) -> Vec<String> {
        let mut args = QemuMonitorProbe::args(&self.monitor).to_vec();
        args.extend(QmpEvents::args(&self.qmp));
        args
    }

    pub fn monitor(&self) -> &Path {
        &self.monitor
    }

    /// Arms `vm`'s stall watchdog with a probe of this QEMU and connects to its QMP events,
    /// which lets QEMU run the guest.
    pub fn watch(&self, vm: Vm, limit: Duration) -> Result<(Vm, QmpEvents), String> {
        let probe = QemuMonitorProbe::new(&self.monitor, vm.pid());
        let vm = vm.watch_with(Box::new(probe), limit);
        let events = QmpEvents::connect(&self.qmp, Duration::from_secs(30))
            .map_err(|e| format!("QEMU's QMP socket {}: {e}", self.qmp.display()))?;
        Ok((vm, events))
    }
}

/// QEMU's QMP events of one run, collected from the start: with [`QmpEvents::args`] QEMU
/// waits for this client before it runs the guest, so no event is missed. Its SHUTDOWN event
/// says why QEMU stopped (`guest-shutdown`, `guest-reset` for a triple fault or a reset under
/// `-no-reboot`, `guest-panic`), which its exit code does not.
#[derive(Debug)]
pub struct QmpEvents {
    lines: Arc<Mutex<Vec<String>>>,
}

impl QmpEvents {
    /// QEMU's arguments for a QMP socket that holds the guest until a client connects.
    pub fn args(socket: &Path) -> [String; 2] {
        [
            "-qmp".into(),
            format!("unix:{},server=on,wait=on", socket.display()),
        ]
    }

    /// Connects to a starting QEMU (waiting up to `timeout` for its socket), enables
    /// commands, and reads its events on a thread until QEMU closes the connection.
    pub fn connect(socket: &Path, timeout: Duration) -> std::io::Result<QmpEvents> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut lines) = sink.lock() {
                        lines.push(line);
                    }
                }
            })?;
        Ok(QmpEvents { lines })
    }

    /// One line on why QEMU stopped, for a failure's text. The event may still be on its way
    /// when QEMU's exit is seen first: it is given a second.
    pub fn explain(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.shutdown_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.shutdown_reason() {
            Some(reason) => format!("QEMU's SHUTDOWN event: reason {reason}"),
            None => "QEMU sent no SHUTDOWN event".into(),
        }
    }

    /// The reason of QEMU's SHUTDOWN event, once it came.
    pub fn shutdown_reason(&self) -> Option<String> {
        let lines = self.lines.lock().ok()?;
        lines.iter().find_map(|line| shutdown_reason(line))
    }
}

/// The `reason` of a QMP SHUTDOWN event line.
fn shutdown_reason(line: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    if event.get("event")?.as_str()? != "SHUTDOWN" {
        return None;
    }
    Some(event.get("data")?.get("reason")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_carriage_returns_are_dropped() {
        assert_eq!(
            plain(b"\x1b[K\x1b[Dinfo pic\r\nIRR=0\r\n(qemu) "),
            "info pic\nIRR=0\n(qemu) "
        );
    }

    #[test]
    fn an_answer_ends_at_the_prompt() {
        let mut input: &[u8] = b"info status\r\nVM status: running\r\n(qemu) ";
        assert_eq!(
            read_to_prompt(&mut input).unwrap(),
            "info status\nVM status: running\n"
        );
        let mut cut: &[u8] = b"VM status: run";
        assert!(read_to_prompt(&mut cut).is_err());
    }

    #[test]
    fn the_shutdown_reason_comes_from_the_shutdown_event() {
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#;
        assert_eq!(shutdown_reason(event).as_deref(), Some("guest-reset"));
        assert_eq!(shutdown_reason(r#"{"event": "RESUME"}"#), None);
        assert_eq!(shutdown_reason(r#"{"return": {}}"#), None);
        assert_eq!(shutdown_reason("not json"), None);
    }
}
