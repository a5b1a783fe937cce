//! Device worker threads: one per active device, sleeping in epoll until a queue is notified,
//! a backend is ready or the device is reset.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use sandbox::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The token reserved for the stop event.
const STOP_TOKEN: u64 = u64::MAX;

/// A device's worker loop.
pub trait Worker: Send + 'static {
    /// File descriptors to wait on, each with the token handed to [`Worker::handle`].
    fn sources(&self) -> Vec<(RawFd, u64)>;

    /// Something happened on the source with `token`. Returning an error stops the worker.
    fn handle(&mut self, token: u64, poll: &Poll) -> io::Result<()>;
}

/// The worker's view of its epoll set: it may stop and resume watching a source (e.g. a
/// backend it cannot drain until the driver gives buffers).
#[derive(Debug)]
pub struct Poll {
    epoll: Epoll,
}

impl Poll {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Poll {
            epoll: Epoll::new()?,
        })
    }

    /// Starts watching `fd` for input, reported with `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Watches (`on`) or ignores `fd`, registered with `token`.
    pub fn watch(&self, fd: RawFd, token: u64, on: bool) -> io::Result<()> {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts `worker` on a thread of `kind` (named after it), confined before it runs.
    pub fn spawn<W: Worker>(kind: ThreadKind, mut worker: W) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let poll = Poll::new()?;
        poll.add(stop.as_raw_fd(), STOP_TOKEN)?;
        for (fd, token) in worker.sources() {
            poll.add(fd, token)?;
        }
        #[cfg(test)]
        confine_in_tests();
        let thread = sandbox::spawn(kind, kind.name(), move || run(poll, &mut worker))?;
        Ok(WorkerHandle {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the worker and waits for it.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

/// The unit tests run every worker (and I/O pool thread) under its real filter, started by
/// the spawner as in the VMM: a call missing from a list kills the test with the report that
/// names it.
#[cfg(test)]
pub(crate) fn confine_in_tests() {
    let _ = sandbox::set_mode(sandbox::SeccompMode::Kill);
    let _ = sandbox::start_spawner(&[]);
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<W: Worker>(poll: Poll, worker: &mut W) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match poll.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                guest_log::guest_error!("device worker: epoll failed: {e}");
                return;
            }
        };
        for event in &events[..n] {
            if event.data() == STOP_TOKEN {
                return;
            }
            if let Err(e) = worker.handle(event.data(), &poll) {
                guest_log::guest_error!("device worker stopped: {e}");
                return;
            }
        }
    }
}
