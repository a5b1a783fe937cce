//! The guest's serial console on the VMM's standard streams.
//!
//! Output: what the guest writes to COM1 goes to stdout unchanged. Input: a thread reads stdin
//! and hands chunks to the control loop through a bounded channel (so a guest that does not
//! read cannot make the VMM buffer without limit). When stdin is a terminal it is put in raw
//! mode, and Ctrl-A starts an escape sequence: Ctrl-A x quits, Ctrl-A h prints help,
//! Ctrl-A Ctrl-A sends a literal Ctrl-A. With pipes, bytes pass through untouched.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};

use sandbox::ThreadKind;
use vmm_sys_util::eventfd::EventFd;

/// The escape character (Ctrl-A).
const ESCAPE: u8 = 0x01;
/// Chunks the reader may queue before it waits for the guest.
const INPUT_QUEUE_CHUNKS: usize = 16;
/// Help shown for Ctrl-A h.
pub const ESCAPE_HELP: &str =
    "Ctrl-A x  quit (stops the VM)\nCtrl-A h  this help\nCtrl-A Ctrl-A  send Ctrl-A to the guest\n";

/// What an escape sequence asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EscapeCommand {
    Quit,
    Help,
}

/// Splits keyboard input into bytes for the guest and escape commands.
#[derive(Debug, Default)]
struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Appends the bytes meant for the guest to `out`; returns the first command found (input
    /// after a quit is dropped).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<EscapeCommand> {
        let mut command = None;
        for &byte in input {
            if self.after_escape {
                self.after_escape = false;
                match byte {
                    b'x' | b'X' => return Some(EscapeCommand::Quit),
                    b'h' | b'H' | b'?' => command = Some(EscapeCommand::Help),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if byte == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(byte);
            }
        }
        command
    }
}

pub use host_sys::terminal::RawMode;

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending", &self.pending.len())
            .field("raw", &self._raw.is_some())
            .finish_non_exhaustive()
    }
}

/// A writer shared by every boot of the VM (each boot's UART gets a handle to it).
#[derive(Clone)]
struct SharedOutput(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// The guest's console: input for the control loop, output for the UART.
pub struct Console {
    output: SharedOutput,
    chunks: Receiver<Vec<u8>>,
    /// Readable when the reader queued a chunk.
    input_ready: EventFd,
    /// Readable when the user typed the quit escape.
    quit: EventFd,
    pending: VecDeque<u8>,
    _raw: Option<RawMode>,
}

impl Console {
    /// The console on this process's stdin/stdout.
    pub fn stdio() -> io::Result<Self> {
        let stdin = io::stdin();
        let interactive = stdin.is_terminal();
        let raw = if interactive {
            Some(RawMode::stdin().map_err(io::Error::other)?)
        } else {
            None
        };
        let console = Self::new(Box::new(stdin), Box::new(io::stdout()), interactive)?;
        if interactive {
            eprintln!("ferro: console on this terminal; Ctrl-A x quits, Ctrl-A h shows help");
        }
        Ok(Console {
            _raw: raw,
            ..console
        })
    }

    /// A console reading from `input` and writing to `output`, with escape handling when
    /// `interactive`.
    pub fn new(
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
        interactive: bool,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(INPUT_QUEUE_CHUNKS);
        let input_ready = EventFd::new(libc::EFD_NONBLOCK)?;
        let quit = EventFd::new(libc::EFD_NONBLOCK)?;
        let reader = InputReader {
            input,
            chunks: tx,
            input_ready: input_ready.try_clone()?,
            quit: quit.try_clone()?,
            escape: interactive.then(EscapeFilter::default),
        };
        crate::signals::spawn_thread(ThreadKind::Console, "console-in", move || reader.run())?;
        Ok(Console {
            output: SharedOutput(Arc::new(Mutex::new(output))),
            chunks: rx,
            input_ready,
            quit,
            pending: VecDeque::new(),
            _raw: None,
        })
    }

    /// Where the guest's console output goes.
    pub fn output(&self) -> Box<dyn Write + Send> {
        Box::new(self.output.clone())
    }

    pub(crate) fn input_ready_fd(&self) -> RawFd {
        self.input_ready.as_raw_fd()
    }

    pub(crate) fn quit_fd(&self) -> RawFd {
        self.quit.as_raw_fd()
    }

    /// Clears the input-ready event and queues the chunks waiting in the channel.
    pub(crate) fn collect_input(&mut self) {
        let _ = self.input_ready.read();
        self.pull_chunks();
    }

    fn pull_chunks(&mut self) {
        // Keep the backlog small; the rest waits in the channel (and then in the reader).
        while self.pending.len() < 4096 {
            match self.chunks.try_recv() {
                Ok(chunk) => self.pending.extend(chunk),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }

    /// Moves pending input into the guest through `deliver`, which returns how many bytes
    /// it accepted.
    pub(crate) fn deliver(&mut self, mut deliver: impl FnMut(&[u8]) -> usize) {
        loop {
            if self.pending.is_empty() {
                self.pull_chunks();
            }
            let (front, _) = self.pending.as_slices();
            if front.is_empty() {
                return;
            }
            let taken = deliver(front);
            self.pending.drain(..taken);
            if taken == 0 {
                return;
            }
        }
    }

    /// True once the user asked to quit.
    pub(crate) fn quit_requested(&self) -> bool {
        self.quit.read().is_ok()
    }
}

struct InputReader {
    input: Box<dyn Read + Send>,
    chunks: SyncSender<Vec<u8>>,
    input_ready: EventFd,
    quit: EventFd,
    escape: Option<EscapeFilter>,
}

impl InputReader {
    fn run(mut self) {
        let mut buf = [0u8; 1024];
        loop {
            let n = match self.input.read(&mut buf) {
                Ok(0) => return, // EOF: the guest just stops getting input
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("console input: {e}");
                    return;
                }
            };
            let chunk = match &mut self.escape {
                None => buf[..n].to_vec(),
                Some(filter) => {
                    let mut out = Vec::with_capacity(n);
                    match filter.feed(&buf[..n], &mut out) {
                        Some(EscapeCommand::Quit) => {
                            let _ = self.quit.write(1);
                            return;
                        }
                        Some(EscapeCommand::Help) => {
                            let _ = io::stderr().write_all(ESCAPE_HELP.as_bytes());
                        }
                        None => {}
                    }
                    out
                }
            };
            if chunk.is_empty() {
                continue;
            }
            if self.chunks.send(chunk).is_err() {
                return; // the VMM is gone
            }
            let _ = self.input_ready.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(input: &[u8]) -> (Vec<u8>, Option<EscapeCommand>) {
        let mut out = Vec::new();
        let cmd = EscapeFilter::default().feed(input, &mut out);
        (out, cmd)
    }

    #[test]
    fn plain_bytes_pass_through() {
        assert_eq!(filter(b"ls -l\r"), (b"ls -l\r".to_vec(), None));
    }

    #[test]
    fn escape_x_quits_and_drops_the_rest() {
        assert_eq!(
            filter(b"ab\x01xcd"),
            (b"ab".to_vec(), Some(EscapeCommand::Quit))
        );
    }

    #[test]
    fn escape_escape_sends_one_ctrl_a() {
        assert_eq!(filter(b"\x01\x01a"), (b"\x01a".to_vec(), None));
    }

    #[test]
    fn unknown_escapes_are_forwarded_and_help_is_reported() {
        assert_eq!(filter(b"\x01q"), (b"\x01q".to_vec(), None));
        assert_eq!(filter(b"\x01h"), (Vec::new(), Some(EscapeCommand::Help)));
    }

    #[test]
    fn escape_split_across_reads() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert_eq!(f.feed(b"a\x01", &mut out), None);
        assert_eq!(f.feed(b"x", &mut out), Some(EscapeCommand::Quit));
        assert_eq!(out, b"a");
    }

    #[test]
    fn piped_input_reaches_the_guest_in_order_with_backpressure() {
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let mut console = Console::new(
            Box::new(io::Cursor::new(data.clone())),
            Box::new(io::sink()),
            false,
        )
        .unwrap();
        let mut received = Vec::new();
        while received.len() < data.len() {
            console.collect_input();
            // A guest that takes at most 16 bytes at a time.
            console.deliver(|bytes| {
                let n = bytes.len().min(16);
                received.extend_from_slice(&bytes[..n]);
                n
            });
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(received, data);
        assert!(!console.quit_requested());
    }

    #[test]
    fn interactive_quit_is_signalled() {
        let console = Console::new(
            Box::new(io::Cursor::new(b"abc\x01x".to_vec())),
            Box::new(io::sink()),
            true,
        )
        .unwrap();
        for _ in 0..1000 {
            if console.quit_requested() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("quit was not signalled");
    }
}
