//! The console of a VMM that has no terminal (one the daemon started): the guest's output is
//! appended to a log file and copied live to every client of a Unix socket, and what clients
//! type goes to the guest. `ferro vm console` is such a client.
//!
//! Threads: an acceptor thread, and one reader thread per client that copies its input into a
//! pipe (the console's input). Output is written by whichever thread runs the guest's console
//! device; a client that cannot keep up is dropped rather than allowed to stall the guest.

use std::io::{self, PipeWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use guest_log::{LogLimits, RotatingLog};

use crate::console::Console;
use sandbox::ThreadKind;

/// Where the console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleHubConfig {
    /// Socket that live clients connect to.
    pub socket: Option<PathBuf>,
    /// File the guest's output is appended to.
    pub log: Option<PathBuf>,
}

type Clients = Arc<Mutex<Vec<UnixStream>>>;

fn lock(clients: &Clients) -> std::sync::MutexGuard<'_, Vec<UnixStream>> {
    clients.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Guest output: to the log, then to each client without blocking.
struct HubOutput {
    log: Option<RotatingLog>,
    clients: Clients,
}

impl Write for HubOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            // A full disk must not stop the guest: the log misses that output.
            let _ = log.append(buf);
        }
        lock(&self.clients).retain(|client| send_all_now(client, buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends `buf` without waiting; false if the client is gone or too slow.
fn send_all_now(client: &UnixStream, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        // Not waiting: the socket is shared and blocking, and one slow client must not hold
        // up the guest's output for the others.
        match host_sys::socket::send_now(client, buf) {
            Ok(n) if n > 0 => buf = &buf[n..],
            _ => return false,
        }
    }
    true
}

/// Keeps the socket file for as long as the VMM runs.
#[derive(Debug)]
pub struct ConsoleHub {
    socket: Option<PathBuf>,
}

impl Drop for ConsoleHub {
    fn drop(&mut self) {
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl ConsoleHub {
    /// Opens the log and the socket and returns the console built on them.
    pub fn start(config: &ConsoleHubConfig) -> io::Result<(ConsoleHub, Console)> {
        let log = match &config.log {
            Some(path) => Some(RotatingLog::open(path, LogLimits::DEFAULT)?),
            None => None,
        };
        let clients: Clients = Arc::default();
        let (input, input_writer) = io::pipe()?;
        if let Some(path) = &config.socket {
            let listener = bind(path)?;
            let (clients, writer) = (clients.clone(), Arc::new(Mutex::new(input_writer)));
            crate::signals::spawn_thread(ThreadKind::Console, "console-hub", move || {
                accept_clients(listener, clients, writer)
            })?;
        } else {
            drop(input_writer);
        }
        let output = HubOutput { log, clients };
        // Once no client writer is left, the pipe reads as end of input: no more typing.
        let console = Console::new(Box::new(input), Box::new(output), false)?;
        Ok((
            ConsoleHub {
                socket: config.socket.clone(),
            },
            console,
        ))
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && UnixStream::connect(path).is_err() => {
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

fn accept_clients(listener: UnixListener, clients: Clients, input: Arc<Mutex<PipeWriter>>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        lock(&clients).push(stream);
        let input = input.clone();
        let _ = crate::signals::spawn_thread(ThreadKind::Console, "console-client", move || {
            copy_input(reader, &input)
        });
    }
}

fn copy_input(mut client: UnixStream, input: &Mutex<PipeWriter>) {
    let mut buf = [0u8; 1024];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut pipe = input.lock().unwrap_or_else(PoisonError::into_inner);
                if pipe.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_log_and_clients_and_input_reaches_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let config = ConsoleHubConfig {
            socket: Some(dir.path().join("console.sock")),
            log: Some(dir.path().join("console.log")),
        };
        let (_hub, mut console) = ConsoleHub::start(&config).unwrap();
        let mut client = UnixStream::connect(config.socket.as_ref().unwrap()).unwrap();
        // Wait until the hub has registered the client.
        let mut output = console.output();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            assert!(std::time::Instant::now() < deadline, "{got:?}");
            output.write_all(b"hello").unwrap();
            let mut buf = [0u8; 64];
            if let Ok(n) = client.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        let log = std::fs::read_to_string(config.log.as_ref().unwrap()).unwrap();
        assert!(log.starts_with("hello"), "{log}");
        client.write_all(b"ls\n").unwrap();
        let mut typed = Vec::new();
        while typed.len() < 3 {
            assert!(std::time::Instant::now() < deadline);
            console.collect_input();
            console.deliver(|bytes| {
                typed.extend_from_slice(bytes);
                bytes.len()
            });
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(typed, b"ls\n");
    }
}
