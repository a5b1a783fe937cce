//! `ferro vm console NAME`: attaches this terminal to a VM's live console socket (served by
//! its VMM). Raw mode when stdin is a terminal; Ctrl-] detaches, leaving the VM running.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Detaches from the console (as in virsh console).
const DETACH: u8 = 0x1d; // Ctrl-]

pub fn attach(name: &str, socket: &Path) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to the console of {name}: {e}"))?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let _raw = if interactive {
        eprintln!("Connected to the console of {name}; Ctrl-] detaches.\r");
        Some(vmm::RawMode::enable(stdin.as_raw_fd()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let mut from_vm = stream.try_clone().map_err(|e| e.to_string())?;
    let output = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut to_vm = stream;
    let mut input = stdin.lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let typed = &buf[..n];
        let detach_at = interactive
            .then(|| typed.iter().position(|&b| b == DETACH))
            .flatten();
        let send = &typed[..detach_at.unwrap_or(n)];
        if to_vm.write_all(send).is_err() || detach_at.is_some() {
            break;
        }
    }
    if !interactive {
        // Piped input is done: keep showing output until the VM closes the console.
        let _ = to_vm.shutdown(std::net::Shutdown::Write);
        let _ = output.join();
    } else {
        let _ = to_vm.shutdown(std::net::Shutdown::Both);
        eprintln!("\r\nDetached from the console of {name}.\r");
    }
    Ok(())
}
