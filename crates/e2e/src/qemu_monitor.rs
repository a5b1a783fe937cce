//! QEMU's human monitor on a Unix socket, read when a QEMU guest stalls in issue 23's loops:
//! the control for Ferro's stall report. QEMU has no counters to read, so only its output
//! counts as progress; the report is what the monitor says about the vCPUs and the interrupt
//! controllers at that moment.
//!
//! Threading: the caller's; one short connection per report.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::stall::Probe;

/// What the report asks: run state, every vCPU's registers, the LAPICs of the first two
/// vCPUs, and the PIC and IOAPIC.
const COMMANDS: [&str; 5] = [
    "info status",
    "info registers -a",
    "info lapic 0",
    "info lapic 1",
    "info pic",
];
const PROMPT: &str = "(qemu) ";
/// More than any answer above; a monitor that keeps talking is cut off here.
const MAX_ANSWER: usize = 1 << 20;

/// A QEMU process started with [`QemuMonitorProbe::args`].
#[derive(Debug)]
pub struct QemuMonitorProbe {
    socket: PathBuf,
}

impl QemuMonitorProbe {
    pub fn new(socket: &Path) -> Self {
        QemuMonitorProbe {
            socket: socket.to_path_buf(),
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
        Ok(0)
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
}
