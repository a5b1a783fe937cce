//! virtio-console (virtio 1.x section 5.3), one port, no multiport: the guest's `hvc0`.
//!
//! Output: what the driver puts on the transmit queue goes to the console writer. Input: the
//! VMM pushes keyboard bytes into a small bounded buffer ([`ConsoleInput`]); the worker moves
//! them into the driver's receive buffers and signals `drained` once the buffer is empty, so
//! the VMM knows when to push more (the same backpressure as the serial port's FIFO).

use std::collections::VecDeque;
use std::io::{self, Read as _, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use crate::counters::Counters;
use crate::device::{read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::queue::DeviceQueue;
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};
use sandbox::ThreadKind;

const QUEUE_SIZE: u16 = 256;
const RECEIVE_QUEUE: usize = 0;
const TRANSMIT_QUEUE: usize = 1;
/// Input bytes buffered between the VMM and the guest.
const INPUT_CAPACITY: usize = 4096;
/// Output bytes taken from one transmit chain. Linux sends at most a page per buffer; a chain
/// of descriptors that overlap all of guest memory could otherwise claim hundreds of GiB.
const MAX_CHAIN_OUTPUT: usize = 64 << 10;
const TOKEN_RECEIVE: u64 = 0;
const TOKEN_TRANSMIT: u64 = 1;
const TOKEN_INPUT: u64 = 2;

/// Keyboard input on its way to the guest.
#[derive(Debug)]
pub struct ConsoleInput {
    buffer: Mutex<VecDeque<u8>>,
    /// Wakes the worker when input arrives.
    ready: EventFd,
    /// Tells the VMM the buffer is empty again.
    drained: EventFd,
}

impl ConsoleInput {
    /// A buffer that reports "empty again" on `drained`.
    pub fn new(drained: EventFd) -> io::Result<Self> {
        Ok(ConsoleInput {
            buffer: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
            drained,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues bytes for the guest; returns how many fit.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut buffer = self.lock();
        let n = bytes.len().min(INPUT_CAPACITY - buffer.len());
        buffer.extend(&bytes[..n]);
        drop(buffer);
        if n > 0 {
            let _ = self.ready.write(1);
        }
        n
    }
}

/// The device's counters (indexes into [`COUNTER_NAMES`]): bytes the guest wrote (`tx`) and
/// bytes it was given (`rx`).
pub mod counter {
    pub const RX_BYTES: usize = 0;
    pub const TX_BYTES: usize = 1;
}

/// Names of the counters, in index order.
pub const COUNTER_NAMES: &[&str] = &["rx_bytes", "tx_bytes"];

/// Fresh counters for a console device.
pub fn new_counters() -> Arc<Counters> {
    Counters::new("console", COUNTER_NAMES)
}

/// The console device.
pub struct Console {
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Arc<ConsoleInput>,
    worker: Option<WorkerHandle>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(
        output: Box<dyn Write + Send>,
        input: Arc<ConsoleInput>,
        counters: Arc<Counters>,
    ) -> Self {
        Console {
            output: Arc::new(Mutex::new(output)),
            input,
            worker: None,
            counters,
        }
    }
}

struct ConsoleWorker {
    memory: Arc<GuestMemory>,
    receive: DeviceQueue,
    transmit: DeviceQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Arc<ConsoleInput>,
    counters: Arc<Counters>,
}

impl ConsoleWorker {
    fn transmit(&mut self) -> Result<(), crate::queue::QueueBroken> {
        let mem = self.memory.clone();
        let output = self.output.clone();
        let counters = self.counters.clone();
        self.transmit
            .process(&mem, self.interrupt.as_ref(), |chain| {
                let Ok(mut reader) = chain.reader(&mem) else {
                    return 0;
                };
                let mut bytes = Vec::with_capacity(reader.available_bytes().min(MAX_CHAIN_OUTPUT));
                let mut limited = (&mut reader).take(MAX_CHAIN_OUTPUT as u64);
                if limited.read_to_end(&mut bytes).is_ok() {
                    counters.add(counter::TX_BYTES, bytes.len() as u64);
                    let mut out = output.lock().unwrap_or_else(PoisonError::into_inner);
                    // A broken terminal must not stall the guest: the bytes are dropped.
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                }
                0
            })
    }

    /// Moves buffered input into the driver's receive buffers.
    fn receive(&mut self) -> Result<(), crate::queue::QueueBroken> {
        let _ = self.input.ready.read();
        self.receive.clear_notification();
        let mem = self.memory.clone();
        let mut delivered = false;
        loop {
            let mut buffer = self.input.lock();
            if buffer.is_empty() {
                break;
            }
            let Some(chain) = self.receive.pop(&*mem)? else {
                drop(buffer);
                if self.receive.wait_for_chains(&mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(buffer.len());
                    let bytes: Vec<u8> = buffer.drain(..n).collect();
                    match writer.write_all(&bytes) {
                        Ok(()) => n as u32,
                        Err(_) => writer.bytes_written() as u32,
                    }
                }
                Err(_) => 0,
            };
            let now_empty = buffer.is_empty();
            drop(buffer);
            self.receive.add_used(&mem, head, written)?;
            self.counters.add(counter::RX_BYTES, u64::from(written));
            delivered = true;
            if now_empty {
                let _ = self.input.drained.write(1);
            }
        }
        if delivered {
            self.receive.signal_used(&mem, self.interrupt.as_ref())?;
        }
        Ok(())
    }
}

/// The console's queues served on the calling thread, for fuzzing: the device's worker runs
/// this same code when the guest notifies. Output is discarded.
pub struct Harness(ConsoleWorker);

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

impl Harness {
    /// Queue 0 receives `input`, queue 1 transmits.
    pub fn new(
        memory: Arc<GuestMemory>,
        [receive, transmit]: [virtio_queue::Queue; 2],
        input: &[u8],
    ) -> io::Result<Self> {
        let queue = |index, queue| -> io::Result<DeviceQueue> {
            Ok(DeviceQueue::from(crate::device::ActiveQueue {
                index,
                queue,
                notify: EventFd::new(libc::EFD_NONBLOCK)?,
                watch: crate::queue_watch::QueueWatch::detached(),
            }))
        };
        let console_input = Arc::new(ConsoleInput::new(EventFd::new(libc::EFD_NONBLOCK)?)?);
        console_input.enqueue(input);
        Ok(Harness(ConsoleWorker {
            memory,
            receive: queue(0, receive)?,
            transmit: queue(1, transmit)?,
            interrupt: Arc::new(crate::device::Silent),
            output: Arc::new(Mutex::new(Box::new(io::sink()))),
            input: console_input,
            counters: new_counters(),
        }))
    }

    /// Writes out what the guest queued. False once the queue broke.
    pub fn transmit(&mut self) -> bool {
        self.0.transmit().is_ok()
    }

    /// Hands buffered input to the guest. False once the queue broke.
    pub fn receive(&mut self) -> bool {
        self.0.receive().is_ok()
    }

    /// Per queue (receive, transmit): the chains the device holds (none between steps), and
    /// whether the queue broke and by whose fault.
    pub fn queue_states(&self) -> [(usize, Option<crate::queue::BrokenBy>); 2] {
        [&self.0.receive, &self.0.transmit].map(|q| (q.in_flight(), q.broken_by()))
    }
}

impl Worker for ConsoleWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![
            (self.receive.notify.as_raw_fd(), TOKEN_RECEIVE),
            (self.transmit.notify.as_raw_fd(), TOKEN_TRANSMIT),
            (self.input.ready.as_raw_fd(), TOKEN_INPUT),
        ]
    }

    fn handle(&mut self, token: u64, _poll: &Poll) -> io::Result<()> {
        let result = match token {
            TOKEN_TRANSMIT => self.transmit(),
            _ => self.receive(),
        };
        if let Err(e) = result {
            guest_log::guest_warn!("virtio-console: {e}");
            self.interrupt.needs_reset();
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: nothing offered, all zero.
        read_config_bytes(&[0u8; 12], offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let mut queues: Vec<Option<DeviceQueue>> = vec![None, None];
        for q in activation.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.into());
            }
        }
        let (Some(receive), Some(transmit)) =
            (queues[RECEIVE_QUEUE].take(), queues[TRANSMIT_QUEUE].take())
        else {
            return Err(ActivateError::MissingQueues { needed: 2, got });
        };
        let worker = ConsoleWorker {
            memory: activation.memory,
            receive,
            transmit,
            interrupt: activation.interrupt,
            output: self.output.clone(),
            input: self.input.clone(),
            counters: self.counters.clone(),
        };
        self.worker = Some(
            WorkerHandle::spawn(ThreadKind::VirtioConsole, worker)
                .map_err(ActivateError::Worker)?,
        );
        // Input typed before the driver was ready.
        let _ = self.input.ready.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_transmit_chain_claiming_all_memory_many_times_is_cut_short() {
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        const MEMORY: u64 = 4 << 20;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        // 16 descriptors, each all of guest memory: 64 MiB claimed by one chain.
        let descs: Vec<_> = (0..16u16)
            .map(|i| {
                let flags = if i < 15 { VRING_DESC_F_NEXT as u16 } else { 0 };
                RawDescriptor::from(Descriptor::new(0, MEMORY as u32, flags, i + 1))
            })
            .collect();
        tx.build_desc_chain(&descs).unwrap();
        let queue = |mock: &MockSplitQueue<GuestMemory>, index| {
            DeviceQueue::from(crate::device::ActiveQueue {
                index,
                queue: mock.create_queue().unwrap(),
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                watch: crate::queue_watch::QueueWatch::detached(),
            })
        };
        let output = Captured::default();
        let mut worker = ConsoleWorker {
            memory: Arc::new(mem.clone()),
            receive: queue(&rx, 0),
            transmit: queue(&tx, 1),
            interrupt: Arc::new(crate::device::Silent),
            output: Arc::new(Mutex::new(Box::new(output.clone()))),
            input: Arc::new(ConsoleInput::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()),
            counters: new_counters(),
        };
        worker.transmit().unwrap();
        assert_eq!(output.0.lock().unwrap().len(), MAX_CHAIN_OUTPUT);
        assert_eq!(tx.used().idx().load(), 1, "the chain is returned");
    }

    #[test]
    fn input_buffer_is_bounded() {
        let input = ConsoleInput::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        assert_eq!(input.enqueue(&vec![b'a'; 5000]), INPUT_CAPACITY);
        assert_eq!(input.enqueue(b"b"), 0);
        assert_eq!(input.ready.read().unwrap(), 1);
    }
}
