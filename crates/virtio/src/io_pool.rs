//! A small pool of threads for blocking device I/O (e.g. disk reads and writes), so that
//! requests the driver queued together run at the same time instead of one after another.
//!
//! Threads start on demand, up to a maximum, and end after a while without work, so an idle
//! device costs no threads. At most a fixed number of jobs wait for a thread; past that the
//! submitter runs the job itself, which holds it back from taking more work, so the queue
//! never grows beyond its bound whatever the guest does. Dropping the pool discards jobs not
//! yet started and waits for the running ones: after a device reset nothing touches the queue
//! again.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use sandbox::ThreadKind;

/// How long a thread waits for work before it ends.
const IDLE_LIFETIME: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    idle: usize,
    live: usize,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The pool; see the module documentation.
pub struct IoPool {
    kind: ThreadKind,
    max_threads: usize,
    max_waiting: usize,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("kind", &self.kind)
            .field("max_threads", &self.max_threads)
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

impl IoPool {
    /// A pool whose threads are of `kind` (confined so, and named after it), at most
    /// `max_threads` (at least one) of them, with at most `max_waiting` jobs waiting for a
    /// thread.
    pub fn new(kind: ThreadKind, max_threads: usize, max_waiting: usize) -> Self {
        IoPool {
            kind,
            max_threads: max_threads.max(1),
            max_waiting,
            shared: Arc::default(),
            threads: Mutex::default(),
        }
    }

    /// Runs `job` on a pool thread. When `max_waiting` jobs already wait, or no thread can be
    /// started (the host is out of threads) and none is running, the job runs on the caller's
    /// thread instead: slower, never lost.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        if state.jobs.len() >= self.max_waiting {
            drop(state);
            job();
            return;
        }
        state.jobs.push_back(Box::new(job));
        if state.idle > 0 || state.live >= self.max_threads {
            drop(state);
            self.shared.work.notify_one();
            return;
        }
        state.live += 1;
        drop(state);
        let shared = self.shared.clone();
        #[cfg(test)]
        crate::worker::confine_in_tests();
        let spawned = sandbox::spawn(self.kind, self.kind.name(), move || serve(&shared));
        match spawned {
            Ok(thread) => {
                let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
                threads.retain(|t| !t.is_finished());
                threads.push(thread);
            }
            Err(e) => {
                guest_log::guest_warn!("{}: cannot start an I/O thread: {e}", self.kind.name());
                let mut state = self.shared.lock();
                state.live -= 1;
                if state.live == 0 {
                    let jobs: Vec<Job> = state.jobs.drain(..).collect();
                    drop(state);
                    jobs.into_iter().for_each(|job| job());
                }
            }
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            state.jobs.clear();
        }
        self.shared.work.notify_all();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn serve(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = shared.lock();
            continue;
        }
        if state.stopping {
            break;
        }
        state.idle += 1;
        let (next, timeout) = shared
            .work
            .wait_timeout(state, IDLE_LIFETIME)
            .unwrap_or_else(PoisonError::into_inner);
        state = next;
        state.idle -= 1;
        if timeout.timed_out() && state.jobs.is_empty() {
            break;
        }
    }
    state.live -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_at_the_same_time_up_to_the_limit() {
        let pool = IoPool::new(ThreadKind::BlockIo, 3, 8);
        // Three jobs that each wait for the other two: they finish only if all run at once.
        let barrier = Arc::new(Barrier::new(3));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (barrier, done) = (barrier.clone(), done.clone());
            pool.submit(move || {
                barrier.wait();
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        while done.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        assert!(pool.shared.lock().live <= 3);
    }

    #[test]
    fn every_job_runs_even_past_the_thread_limit() {
        let pool = IoPool::new(ThreadKind::BlockIo, 2, 1000);
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let done = done.clone();
            pool.submit(move || {
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        while done.load(Ordering::SeqCst) < 100 {
            std::thread::yield_now();
        }
        assert!(pool.threads.lock().unwrap().len() <= 2);
    }

    /// Sets its flag when dropped, even by a failed assertion.
    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn past_its_bound_the_submitter_runs_the_job() {
        const MAX_WAITING: usize = 4;
        let pool = IoPool::new(ThreadKind::BlockIo, 2, MAX_WAITING);
        // Two jobs hold both threads until `open` (set on the way out, so the pool's drop
        // never waits for them).
        let open = Arc::new(AtomicBool::new(false));
        let _open = SetOnDrop(open.clone());
        let started = Arc::new(Barrier::new(3));
        for _ in 0..2 {
            let (open, started) = (open.clone(), started.clone());
            pool.submit(move || {
                started.wait();
                while !open.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        started.wait();
        let submitter = std::thread::current().id();
        let on_submitter = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let (on_submitter, done) = (on_submitter.clone(), done.clone());
            pool.submit(move || {
                if std::thread::current().id() == submitter {
                    on_submitter.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
            assert!(pool.shared.lock().jobs.len() <= MAX_WAITING);
        }
        assert_eq!(on_submitter.load(Ordering::SeqCst), 100 - MAX_WAITING);
        open.store(true, Ordering::SeqCst);
        while done.load(Ordering::SeqCst) < 100 {
            std::thread::yield_now();
        }
    }

    #[test]
    fn dropping_waits_for_running_jobs_and_discards_queued_ones() {
        let pool = IoPool::new(ThreadKind::BlockIo, 1, 8);
        let started = Arc::new(Barrier::new(2));
        let finished = Arc::new(AtomicUsize::new(0));
        {
            let (started, finished) = (started.clone(), finished.clone());
            pool.submit(move || {
                started.wait();
                std::thread::sleep(Duration::from_millis(50));
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        started.wait();
        let queued = finished.clone();
        pool.submit(move || {
            queued.fetch_add(100, Ordering::SeqCst);
        });
        drop(pool);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }
}
