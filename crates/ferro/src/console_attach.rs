//! `ferro vm console NAME`: attaches this terminal to a VM's live console socket (served by
//! its VMM). Raw mode when stdin is a terminal; Ctrl-] detaches, leaving the VM running. With
//! piped input, the end of input stops typing but output keeps coming until the VM ends.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

/// Detaches from the console (as in virsh console).
const DETACH: u8 = 0x1d; // Ctrl-]

enum End {
    /// The VM closed the console (it stopped).
    Closed,
    /// The user detached.
    Detached,
}

pub fn attach(name: &str, socket: &Path) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to the console of {name}: {e}"))?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let _raw = if interactive {
        eprintln!("Connected to the console of {name}; Ctrl-] detaches.\r");
        Some(vmm::RawMode::stdin().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let (end_tx, end) = mpsc::channel();
    let mut from_vm = stream.try_clone().map_err(|e| e.to_string())?;
    let closed = end_tx.clone();
    std::thread::spawn(move || {
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
        let _ = closed.send(End::Closed);
    });
    let mut to_vm = stream;
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
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
            if to_vm.write_all(&typed[..detach_at.unwrap_or(n)]).is_err() {
                return;
            }
            if detach_at.is_some() {
                let _ = end_tx.send(End::Detached);
                return;
            }
        }
        if interactive {
            let _ = end_tx.send(End::Detached);
        } else {
            let _ = to_vm.shutdown(std::net::Shutdown::Write);
        }
    });
    match end.recv() {
        Ok(End::Detached) => eprintln!("\r\nDetached from the console of {name}.\r"),
        Ok(End::Closed) | Err(_) => {
            if interactive {
                eprintln!("\r\nThe console of {name} closed (the VM stopped).\r");
            }
        }
    }
    Ok(())
}
