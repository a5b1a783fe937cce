//! virtio-rng: buffers filled, the budget kept (with a clock the test moves), and a hostile
//! driver that never stops asking, against the real worker thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{ActiveQueue, Silent};
use sandbox::ThreadKind;

const W: u16 = VRING_DESC_F_WRITE as u16;

#[test]
fn fills_every_writable_byte() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(0x10_0000, 100, W, 0)),
            RawDescriptor::from(Descriptor::new(0x11_0000, 28, W, 0)),
        ])
        .unwrap();
    assert_eq!(fill(chain, &mem), 128);
    let mut bytes = [0u8; 100];
    mem.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
    assert!(bytes.iter().any(|&b| b != 0));
    // A chain with nothing writable gets nothing.
    let readable = queue
        .build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x10_0000, 64, 0, 0))])
        .unwrap();
    assert_eq!(fill(readable, &mem), 0);
}

const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;

/// Guest memory with a queue of `size` whose `chains` single-buffer chains of `len` bytes are
/// published, and a worker serving it within `limit`. (virtio-queue's mock places the used
/// ring over the end of a large available ring, so the rings are laid out here.)
fn worker_with_chains(size: u16, chains: u16, len: u32, limit: EntropyLimit) -> RngWorker {
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    for i in 0..chains {
        let buffer = 0x10_0000 + u64::from(i) * 0x1_0000;
        let desc = RawDescriptor::from(Descriptor::new(buffer, len, W, 0));
        let at = DESC_TABLE + u64::from(i) * 16;
        mem.write_obj(desc, GuestAddress(at)).unwrap();
        let slot = AVAIL_RING + 4 + u64::from(i) * 2;
        mem.write_obj(i, GuestAddress(slot)).unwrap();
    }
    mem.write_obj(chains, GuestAddress(AVAIL_RING + 2)).unwrap();
    let mut queue = Queue::new(size).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(&*mem));
    let active = ActiveQueue {
        index: 0,
        queue,
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        watch: crate::queue_watch::QueueWatch::detached(),
    };
    RngWorker::new(mem, active.into(), Arc::new(Silent), new_counters(), limit).unwrap()
}

/// The lengths the device wrote into the used ring so far.
fn used_lengths(worker: &RngWorker, size: u16) -> Vec<u32> {
    let mem = &worker.memory;
    let idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let entry = USED_RING + 4 + (i % u64::from(size)) * 8;
            mem.read_obj(GuestAddress(entry + 4)).unwrap()
        })
        .collect()
}

#[test]
fn a_spent_budget_waits_for_its_period_and_then_serves_again() {
    let period = Duration::from_millis(100);
    let limit = EntropyLimit { bytes: 300, period };
    let mut worker = worker_with_chains(16, 8, 100, limit);
    let t0 = worker.budget_start();
    assert_eq!(worker.serve(t0).unwrap(), Served::OutOfBudget(period));
    assert_eq!(used_lengths(&worker, 16), [100; 3]);
    // Half a period later: nothing more, and how long is left.
    let half = t0 + period / 2;
    assert_eq!(worker.serve(half).unwrap(), Served::OutOfBudget(period / 2));
    assert_eq!(used_lengths(&worker, 16).len(), 3);
    assert_eq!(
        worker.serve(t0 + period).unwrap(),
        Served::OutOfBudget(period)
    );
    assert_eq!(used_lengths(&worker, 16).len(), 6);
    // The last two fit in the next period's budget; the ring is empty.
    assert_eq!(worker.serve(t0 + 2 * period).unwrap(), Served::Drained);
    assert_eq!(used_lengths(&worker, 16), [100; 8]);
    assert_eq!(worker.counters.get(counter::BYTES), 800);
}

#[test]
fn the_last_bytes_of_a_budget_are_a_short_answer_and_tiny_requests_cost_the_minimum() {
    let limit = EntropyLimit {
        bytes: 1000,
        period: Duration::from_secs(1),
    };
    let mut worker = worker_with_chains(32, 2, 900, limit);
    let t0 = worker.budget_start();
    assert_eq!(worker.serve(t0).unwrap(), Served::Drained);
    assert_eq!(used_lengths(&worker, 32), [900, 100]);
    // Empty and one-byte requests: each costs 64 bytes of budget.
    let mut worker = worker_with_chains(32, 32, 1, limit);
    let t0 = worker.budget_start();
    assert!(matches!(worker.serve(t0).unwrap(), Served::OutOfBudget(_)));
    let requests = 1000usize.div_ceil(MIN_REQUEST_COST as usize);
    assert_eq!(used_lengths(&worker, 32), vec![1; requests]);
}

impl RngWorker {
    fn budget_start(&mut self) -> Instant {
        // The budget's first period started when the worker was made; serving "now" would
        // race it. Start the budget again at a known instant.
        let now = Instant::now();
        self.budget = Budget::new(self.budget.limit(), now);
        now
    }
}

/// A driver that never stops asking: it gives every used buffer straight back and notifies,
/// from its own thread, while the device's worker thread serves. Returns the bytes served and
/// the worker thread's CPU time.
fn flood(limit: EntropyLimit, buffer: u32, duration: Duration) -> (u64, Duration) {
    const SIZE: u16 = 256;
    let worker = worker_with_chains(SIZE, SIZE, buffer, limit);
    let mem = worker.memory.clone();
    let counters = worker.counters.clone();
    let notify = worker.queue.notify.try_clone().unwrap();
    let (avail, used) = (AVAIL_RING, USED_RING);
    // The worker's thread is named after its kind; each test runs in a process of its own.
    let name = ThreadKind::Rng.name();
    let mut handle = WorkerHandle::spawn(ThreadKind::Rng, worker).unwrap();
    notify.write(1).unwrap();
    let stop = AtomicBool::new(false);
    let cpu = std::thread::scope(|s| {
        s.spawn(|| {
            let (mut seen, mut next_avail) = (0u16, SIZE);
            while !stop.load(Ordering::Relaxed) {
                let used_idx: u16 = mem.load(GuestAddress(used + 2), Ordering::Acquire).unwrap();
                if used_idx == seen {
                    std::thread::yield_now();
                    continue;
                }
                while seen != used_idx {
                    let entry = used + 4 + u64::from(seen % SIZE) * 8;
                    let head: u32 = mem.read_obj(GuestAddress(entry)).unwrap();
                    let slot = avail + 4 + u64::from(next_avail % SIZE) * 2;
                    mem.write_obj(head as u16, GuestAddress(slot)).unwrap();
                    (seen, next_avail) = (seen.wrapping_add(1), next_avail.wrapping_add(1));
                }
                mem.store(next_avail, GuestAddress(avail + 2), Ordering::Release)
                    .unwrap();
                notify.write(1).unwrap();
            }
        });
        let before = thread_cpu(name);
        std::thread::sleep(duration);
        let cpu = thread_cpu(name) - before;
        stop.store(true, Ordering::Relaxed);
        cpu
    });
    handle.stop();
    (counters.get(counter::BYTES), cpu)
}

/// CPU time of this process's thread named `name` (from /proc, in clock ticks of 10 ms).
fn thread_cpu(name: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of proc(5), 11 and 12 after the name.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        total += Duration::from_millis(ticks * 10);
    }
    total
}

/// The VMM's default limit.
const BYTES_PER_SEC: u64 = api::rng::DEFAULT_RNG_BYTES_PER_SEC;
const PERIOD_MS: u64 = api::rng::DEFAULT_RNG_PERIOD_MS as u64;

#[test]
fn a_driver_asking_without_pause_gets_the_rate_and_no_host_core() {
    let limit = EntropyLimit::per_second(BYTES_PER_SEC, Duration::from_millis(PERIOD_MS));
    let duration = Duration::from_secs(1);
    for buffer in [1, 64, 4096] {
        let (bytes, cpu) = flood(limit, buffer, duration);
        eprintln!("{buffer}-byte requests for {duration:?}: {bytes} bytes, worker CPU {cpu:?}");
        // The budget of the periods in the run (and the one it ends in).
        let periods = duration.as_millis() as u64 / PERIOD_MS + 2;
        assert!(
            bytes > 0 && bytes <= periods.saturating_mul(limit.bytes),
            "{bytes} bytes"
        );
        // Without a limit the worker takes all the CPU it gets (measured: 85% of the run with
        // 1-byte requests, on two cores shared with the driver's thread).
        assert!(
            cpu <= duration / 10,
            "the worker used {cpu:?} of CPU in {duration:?}"
        );
    }
}
