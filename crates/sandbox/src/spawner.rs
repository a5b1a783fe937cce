//! The spawner: one thread, started during setup, that starts every later thread of the VMM.
//!
//! A seccomp filter is inherited by the threads its thread creates, and a child can only add
//! filters, never widen them. A vCPU that starts a device's worker when the driver enables it
//! would otherwise need every call the worker needs (and `clone`) in its own filter. Instead
//! the vCPU asks the spawner; the spawner's filter is the union of all kinds' (plus `clone`),
//! and each child installs its own kind's filter before it runs its body. [`spawn`] returns
//! once the child is confined, so nothing runs unconfined after setup.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use crate::{confine_current_thread, ThreadKind};

type Body = Box<dyn FnOnce() + Send + 'static>;

/// A thread to start, and where to say how it went.
struct Request {
    kind: ThreadKind,
    name: String,
    body: Body,
    reply: mpsc::SyncSender<io::Result<JoinHandle<()>>>,
}

static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

/// Starts the spawner, once per process: later calls do nothing. It and so every thread it
/// starts have `blocked_signals` blocked.
pub fn start_spawner(blocked_signals: &[libc::c_int]) -> io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (requests, inbox) = mpsc::channel();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let blocked = blocked_signals.to_vec();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || serve(&blocked, ready_tx, inbox))?;
    match ready.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io::Error::other("the spawner thread ended at its start")),
    }
    // Two callers racing here both started a spawner; the loser's ends with its channel.
    let _ = SPAWNER.set(Mutex::new(requests));
    Ok(())
}

fn serve(
    blocked: &[libc::c_int],
    ready: mpsc::SyncSender<io::Result<()>>,
    inbox: Receiver<Request>,
) {
    let started = block_signals(blocked)
        .and_then(|()| confine_current_thread(ThreadKind::Spawner).map_err(io::Error::other));
    let failed = started.is_err();
    let _ = ready.send(started);
    if failed {
        return;
    }
    for request in inbox {
        let started = start_confined(request.kind, &request.name, request.body);
        let _ = request.reply.send(started);
    }
}

fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: the set is initialised by sigemptyset before use and only read by
    // pthread_sigmask, which changes this thread's mask only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
    }
    Ok(())
}

/// Starts `body` on a new thread named `name`, confined as `kind` before `body` runs: through
/// the spawner if it runs, else from the calling thread (tests, tools). Fails, and `body` never
/// runs, if the thread cannot start or be confined.
pub fn spawn<F>(kind: ThreadKind, name: &str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let Some(spawner) = SPAWNER.get() else {
        return start_confined(kind, name, Box::new(body));
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let request = Request {
        kind,
        name: name.to_string(),
        body: Box::new(body),
        reply,
    };
    let sent = spawner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(request);
    if sent.is_err() {
        return Err(io::Error::other("the spawner thread has ended"));
    }
    answer
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread has ended")))
}

fn start_confined(kind: ThreadKind, name: &str, body: Body) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let confined = confine_current_thread(kind);
            let ok = confined.is_ok();
            let _ = ready_tx.send(confined);
            if ok {
                body();
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(io::Error::other(e))
        }
        Err(_) => Err(io::Error::other(format!(
            "thread {name} ended at its start"
        ))),
    }
}
