//! virtio-blk (virtio 1.x section 5.2) on a [`block::DiskImage`].
//!
//! Requests are parsed from the descriptor chain into guest-memory slices (no copies): a 16-byte
//! header, the data, and the status byte that ends the writable part. Reads and writes go
//! straight between guest memory and the image; flush makes writes durable before the guest
//! hears of it (and every write is durable at once if the driver did not take FLUSH). Malformed
//! requests get the spec's error status; a chain without a status byte is completed empty. A
//! request in more descriptors than `seg_max` allows gets IOERR after one walk of its chain,
//! nothing of it kept.
//!
//! Queues: one request queue per vCPU by default (`VIRTIO_BLK_F_MQ`), as QEMU does, so the
//! guest submits and completes on the same CPU instead of sending an IPI per request.
//!
//! Threading: the device's one worker thread takes requests off every queue. When the image allows
//! concurrent I/O (raw files), requests that arrive together are spread over an [`IoPool`] and
//! complete in any order, as the spec allows; the last of a batch runs on the worker itself
//! unless it is long, so a lone small request costs no thread switch. Otherwise (qcow2) the worker serves them in order.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use block::{ConcurrentIo, DiskImage, Slices};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address as _, Bytes as _, VolatileSlice};

use crate::counters::Counters;
use crate::device::{read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::io_pool::IoPool;
use crate::queue::{chain_buffers_limited, ChainBuffers, ChainError, DeviceQueue, QueueBroken};
use crate::worker::{Poll, Worker, WorkerHandle};
use crate::{device_type, GuestMemory};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
// The limits users are told about (`api`) are the device's own: one constant each.
// MAX_DISK_QUEUES: most request queues of one device (the default is one per vCPU).
// MAX_SERIAL_LEN: longest serial (GET_ID answer).
use api::vm_config::{MAX_DISK_QUEUES, MAX_SERIAL_LEN as ID_LEN};
use sandbox::ThreadKind;
/// Most data segments of one request (`seg_max`): the queue size less the header and status
/// descriptors, so that a request fits the queue without indirect descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most descriptors of one request: `seg_max` data segments, the header and the status byte.
/// A longer chain is answered IOERR after a walk to its last descriptor, nothing kept.
const MAX_REQUEST_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Most discard or write-zeroes segments of one request.
const MAX_SEGMENTS: u32 = 32;
/// Most requests of one disk in flight at once on I/O threads.
const IO_THREADS: usize = 8;
/// Largest last group of a batch served on the worker itself.
const INLINE_MAX_BYTES: u64 = 128 << 10;
/// 4 GiB - 512 in sectors: what one discard or write-zeroes segment may cover.
const MAX_RANGE_SECTORS: u32 = 0x7f_ffff;

/// Feature bits (virtio 1.x 5.2.3).
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod request_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// An image shared by the devices of successive boots of one VM.
pub type SharedDisk = Arc<Mutex<Box<dyn DiskImage>>>;

fn lock(disk: &SharedDisk) -> std::sync::MutexGuard<'_, Box<dyn DiskImage>> {
    disk.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A block device.
pub struct Block {
    disk: SharedDisk,
    read_only: bool,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    /// One entry per request queue.
    queue_sizes: Vec<u16>,
    worker: Option<WorkerHandle>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The device configuration layout (struct virtio_blk_config).
fn config_space(capacity_sectors: u64, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    c[34..36].copy_from_slice(&queues.to_le_bytes()); // num_queues
    c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// The device's counters (indexes into [`COUNTER_NAMES`]).
pub mod counter {
    pub const READ_REQUESTS: usize = 0;
    pub const WRITE_REQUESTS: usize = 1;
    pub const FLUSH_REQUESTS: usize = 2;
    pub const DISCARD_REQUESTS: usize = 3;
    pub const READ_BYTES: usize = 4;
    pub const WRITE_BYTES: usize = 5;
    pub const ERRORS: usize = 6;
}

/// Names of the counters, in index order.
pub const COUNTER_NAMES: &[&str] = &[
    "read_requests",
    "write_requests",
    "flush_requests",
    "discard_requests",
    "read_bytes",
    "write_bytes",
    "errors",
];

/// Fresh counters for a block device.
pub fn new_counters() -> Arc<Counters> {
    Counters::new("block", COUNTER_NAMES)
}

impl Block {
    /// A device on `disk` with one request queue; `serial` (at most 20 bytes are used)
    /// answers GET_ID.
    pub fn new(disk: SharedDisk, read_only: bool, serial: &str, counters: Arc<Counters>) -> Self {
        let mut id = [0u8; ID_LEN];
        let bytes = serial.as_bytes();
        let n = bytes.len().min(ID_LEN);
        id[..n].copy_from_slice(&bytes[..n]);
        let mut block = Block {
            disk,
            read_only,
            id,
            config: Vec::new(),
            queue_sizes: Vec::new(),
            worker: None,
            counters,
        };
        block.set_queues(1);
        block
    }

    /// The same device with `queues` request queues (1 to [`MAX_DISK_QUEUES`]; clamped).
    pub fn with_queues(mut self, queues: u16) -> Self {
        self.set_queues(queues);
        self
    }

    fn set_queues(&mut self, queues: u16) {
        let queues = queues.clamp(1, MAX_DISK_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(queues)];
        self.config = config_space(lock(&self.disk).size() / SECTOR_SIZE, queues);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = features::SEG_MAX | features::BLK_SIZE | features::FLUSH;
        if self.queue_sizes.len() > 1 {
            f |= features::MQ;
        }
        if self.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        // The driver sets up as many queues as it wants (at least the first); a driver that
        // did not take MQ uses queue 0 only.
        if activation.queues.is_empty() {
            return Err(ActivateError::MissingQueues { needed: 1, got: 0 });
        }
        let mut executor = Executor::new(self.disk.clone(), self.read_only, self.id);
        executor.write_through = activation.features & features::FLUSH == 0;
        executor.counters = self.counters.clone();
        // Each queue holds at most its size in chains (see DeviceQueue), so no more jobs than
        // that can wait; the bound makes it explicit.
        let max_waiting = activation
            .queues
            .iter()
            .map(|q| usize::from(q.queue.size()))
            .sum();
        let pool = executor
            .concurrent
            .is_some()
            .then(|| IoPool::new(ThreadKind::BlockIo, IO_THREADS, max_waiting));
        let queues = activation
            .queues
            .into_iter()
            .map(|queue| {
                let queue = DeviceQueue::from(queue);
                (queue.notify.as_raw_fd(), Arc::new(Mutex::new(queue)))
            })
            .collect();
        let worker = BlockWorker {
            memory: activation.memory,
            queues,
            interrupt: activation.interrupt,
            executor: Arc::new(executor),
            pool,
        };
        self.worker =
            Some(WorkerHandle::spawn(ThreadKind::Block, worker).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

struct BlockWorker {
    memory: Arc<GuestMemory>,
    /// Each active queue with its notification eventfd; a queue's position is its token.
    queues: Vec<(RawFd, Arc<Mutex<DeviceQueue>>)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    executor: Arc<Executor>,
    /// Present when the image takes concurrent reads and writes. Dropped with the worker,
    /// which waits for the requests in flight.
    pool: Option<IoPool>,
}

fn lock_queue(queue: &Mutex<DeviceQueue>) -> std::sync::MutexGuard<'_, DeviceQueue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BlockWorker {
    /// Serves every available request of `queue` in order on this thread.
    fn serve_in_order(&self, queue: &Mutex<DeviceQueue>) -> Result<(), QueueBroken> {
        let mem = self.memory.as_ref();
        lock_queue(queue).process(mem, self.interrupt.as_ref(), |chain| {
            self.executor.serve(chain, mem)
        })
    }

    /// Hands the available requests to the pool, adjacent reads or writes merged into one
    /// transfer, all but the last group, which runs here.
    fn serve_concurrently(
        &self,
        pool: &IoPool,
        queue: &Arc<Mutex<DeviceQueue>>,
    ) -> Result<(), QueueBroken> {
        let chains = lock_queue(queue).pop_all(self.memory.clone())?;
        let mut groups = merge::group(chains, &self.memory);
        // A small last group runs here, saving a thread switch; a long transfer goes to the
        // pool too, so this thread is free for the next notification at once.
        let last = groups.pop_if(|group| chains_len(group) < INLINE_MAX_BYTES);
        for group in groups {
            let job = self.completion_context(queue);
            pool.submit(move || job.serve(group));
        }
        if let Some(group) = last {
            self.completion_context(queue).serve(group);
        }
        Ok(())
    }

    fn completion_context(&self, queue: &Arc<Mutex<DeviceQueue>>) -> Completion {
        Completion {
            memory: self.memory.clone(),
            queue: queue.clone(),
            interrupt: self.interrupt.clone(),
            executor: self.executor.clone(),
        }
    }
}

/// Bytes the descriptors of `chains` cover (headers and status included).
fn chains_len(chains: &[DescriptorChain<Arc<GuestMemory>>]) -> u64 {
    chains
        .iter()
        .flat_map(|chain| chain.clone().map(|d| u64::from(d.len())))
        .sum()
}

/// What serving one request and returning it to the driver needs, on any thread.
struct Completion {
    memory: Arc<GuestMemory>,
    queue: Arc<Mutex<DeviceQueue>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    executor: Arc<Executor>,
}

impl Completion {
    fn serve(self, group: Vec<DescriptorChain<Arc<GuestMemory>>>) {
        let mem = self.memory.as_ref();
        let done = self.executor.serve_group(group, mem);
        let mut queue = lock_queue(&self.queue);
        let returned = done
            .into_iter()
            .try_for_each(|(head, len)| queue.add_used(mem, head, len))
            .and_then(|()| queue.signal_used(mem, self.interrupt.as_ref()));
        if let Err(e) = returned {
            guest_log::guest_warn!("virtio-blk: {e}");
            self.interrupt.needs_reset();
        }
    }
}

impl Worker for BlockWorker {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        (0u64..)
            .zip(&self.queues)
            .map(|(token, (fd, _))| (*fd, token))
            .collect()
    }

    fn handle(&mut self, token: u64, _poll: &Poll) -> io::Result<()> {
        let Some((_, queue)) = usize::try_from(token).ok().and_then(|i| self.queues.get(i)) else {
            return Ok(());
        };
        let result = match &self.pool {
            Some(pool) => self.serve_concurrently(pool, queue),
            None => self.serve_in_order(queue),
        };
        if let Err(e) = result {
            guest_log::guest_warn!("virtio-blk: {e}");
            self.interrupt.needs_reset();
        }
        Ok(())
    }
}

/// Why a chain is not a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the chain has no status byte")]
    NoStatus,
    #[error("the chain is shorter than a request header")]
    ShortHeader,
}

/// A parsed request.
#[derive(Debug)]
pub struct Request<'m> {
    pub kind: u32,
    pub sector: u64,
    /// The data the device reads (OUT, DISCARD, WRITE_ZEROES).
    pub input: Vec<VolatileSlice<'m, ()>>,
    /// The data the device writes (IN, GET_ID).
    pub output: Vec<VolatileSlice<'m, ()>>,
    pub status: VolatileSlice<'m, ()>,
}

/// A request's buffers; a chain of more than [`MAX_REQUEST_DESCRIPTORS`] is not walked
/// further.
pub fn request_buffers<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
) -> Result<ChainBuffers<'_>, ChainError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    chain_buffers_limited(chain, mem, MAX_REQUEST_DESCRIPTORS)
}

/// Parses a request out of its buffers.
pub fn parse_request(buffers: ChainBuffers<'_>) -> Result<Request<'_>, RequestError> {
    let mut readable = Slices::new(&buffers.readable);
    let mut writable = Slices::new(&buffers.writable);
    let writable_len = writable.len();
    if writable_len == 0 {
        return Err(RequestError::NoStatus);
    }
    let output = writable
        .take(writable_len - 1)
        .map_err(|_| RequestError::NoStatus)?;
    let status = writable
        .take(1)
        .ok()
        .and_then(|s| s.into_iter().next())
        .ok_or(RequestError::NoStatus)?;
    if readable.len() < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    let header_slices = readable
        .take(HEADER_LEN)
        .map_err(|_| RequestError::ShortHeader)?;
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0;
    for slice in header_slices {
        let n = slice.len();
        slice.copy_to(&mut header[at..at + n]);
        at += n;
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let input = readable
        .take(readable.len())
        .map_err(|_| RequestError::ShortHeader)?;
    Ok(Request {
        kind,
        sector,
        input,
        output,
        status,
    })
}

/// Executes requests on the disk; callable from many threads at once.
pub struct Executor {
    disk: SharedDisk,
    /// The image's concurrent read/write handle, when it has one; else reads and writes take
    /// the disk's lock.
    concurrent: Option<Arc<dyn ConcurrentIo>>,
    /// Virtual size in bytes (an attached disk does not change size).
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    write_through: bool,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Serves requests on `disk` (used directly by tests and fuzzing; the device builds its own).
    pub fn new(disk: SharedDisk, read_only: bool, id: [u8; ID_LEN]) -> Self {
        let (concurrent, capacity) = {
            let image = lock(&disk);
            (image.concurrent_io(), image.size())
        };
        Executor {
            disk,
            concurrent,
            capacity,
            read_only,
            id,
            write_through: false,
            counters: new_counters(),
        }
    }

    /// Serves one chain; returns the bytes written into it.
    pub fn serve<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemory) -> u32
    where
        M: Clone + std::ops::Deref<Target = GuestMemory>,
    {
        let request = match request_buffers(chain.clone(), mem)
            .map_err(RequestError::from)
            .and_then(parse_request)
        {
            Ok(request) => request,
            Err(RequestError::Chain(ChainError::TooLong(_))) => {
                return self.refuse_too_long(chain, mem);
            }
            Err(e) => {
                guest_log::guest_debug!("virtio-blk: malformed request: {e}");
                self.counters.add(counter::ERRORS, 1);
                return 0;
            }
        };
        let (status, written) = self.execute(&request);
        request.status.copy_from(&[status]);
        written.saturating_add(1)
    }

    /// Answers a request of more than `seg_max` segments IOERR: the status byte is the last
    /// byte of the chain, found by walking it without keeping its descriptors.
    fn refuse_too_long<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemory) -> u32
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        self.counters.add(counter::ERRORS, 1);
        let Some(last) = chain.last() else {
            return 0;
        };
        let status_at = u64::from(last.len())
            .checked_sub(1)
            .and_then(|offset| last.addr().checked_add(offset));
        match status_at {
            Some(at) if last.is_write_only() && mem.write_obj(status::IOERR, at).is_ok() => 1,
            _ => 0,
        }
    }

    /// Returns the status and the bytes written into the output buffers.
    fn execute(&self, request: &Request<'_>) -> (u8, u32) {
        let result = match request.kind {
            request_type::IN => self.read(request),
            request_type::OUT => self.write(request).map(|()| 0),
            request_type::FLUSH => self.flush().map(|()| 0),
            request_type::GET_ID => Ok(self.get_id(request)),
            request_type::DISCARD => self.ranges(request, false).map(|()| 0),
            request_type::WRITE_ZEROES => self.ranges(request, true).map(|()| 0),
            _ => Err(Status(status::UNSUPP)),
        };
        self.count(request, &result);
        match result {
            Ok(written) => (status::OK, written),
            Err(Status(code)) => (code, 0),
        }
    }

    fn count(&self, request: &Request<'_>, result: &Result<u32, Status>) {
        let c = &self.counters;
        if result.is_err() {
            c.add(counter::ERRORS, 1);
            return;
        }
        match request.kind {
            request_type::IN => {
                c.add(counter::READ_REQUESTS, 1);
                c.add(counter::READ_BYTES, block::slices_len(&request.output));
            }
            request_type::OUT => {
                c.add(counter::WRITE_REQUESTS, 1);
                c.add(counter::WRITE_BYTES, block::slices_len(&request.input));
            }
            request_type::FLUSH => c.add(counter::FLUSH_REQUESTS, 1),
            request_type::DISCARD | request_type::WRITE_ZEROES => {
                c.add(counter::DISCARD_REQUESTS, 1)
            }
            _ => {}
        }
    }

    /// The executor's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The byte range of `len` bytes at `sector`, if it is whole sectors inside the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, Status> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(Status(status::IOERR))?;
        let end = offset.checked_add(len).ok_or(Status(status::IOERR))?;
        if !len.is_multiple_of(SECTOR_SIZE) || end > self.capacity {
            return Err(Status(status::IOERR));
        }
        Ok(offset)
    }

    fn read(&self, request: &Request<'_>) -> Result<u32, Status> {
        let len = block::slices_len(&request.output);
        self.read_data(request.sector, &request.output)?;
        u32::try_from(len).map_err(|_| Status(status::IOERR))
    }

    /// Fills `buffers` from the disk at `sector`.
    fn read_data(&self, sector: u64, buffers: &[VolatileSlice<'_, ()>]) -> Result<(), Status> {
        let offset = self.byte_range(sector, block::slices_len(buffers))?;
        match &self.concurrent {
            Some(io) => io.read_at(offset, buffers)?,
            None => lock(&self.disk).read_at(offset, buffers)?,
        }
        Ok(())
    }

    fn write(&self, request: &Request<'_>) -> Result<(), Status> {
        self.write_data(request.sector, &request.input)
    }

    /// Writes `buffers` to the disk at `sector` (durably, without a negotiated FLUSH).
    fn write_data(&self, sector: u64, buffers: &[VolatileSlice<'_, ()>]) -> Result<(), Status> {
        if self.read_only {
            return Err(Status(status::IOERR));
        }
        let offset = self.byte_range(sector, block::slices_len(buffers))?;
        match &self.concurrent {
            Some(io) => io.write_at(offset, buffers)?,
            None => lock(&self.disk).write_at(offset, buffers)?,
        }
        if self.write_through {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Status> {
        match &self.concurrent {
            Some(io) => io.flush()?,
            None => lock(&self.disk).flush()?,
        }
        Ok(())
    }

    fn get_id(&self, request: &Request<'_>) -> u32 {
        let mut output = Slices::new(&request.output);
        let Ok(slices) = output.take(ID_LEN as u64) else {
            return 0;
        };
        let mut written = 0;
        for slice in slices {
            let n = slice.len();
            slice.copy_from(&self.id[written..written + n]);
            written += n;
        }
        written as u32
    }

    /// DISCARD and WRITE_ZEROES: a list of {sector, num_sectors, flags} segments.
    fn ranges(&self, request: &Request<'_>, zeroes: bool) -> Result<(), Status> {
        if self.read_only {
            return Err(Status(status::IOERR));
        }
        let len = block::slices_len(&request.input);
        let count = len / SEGMENT_LEN;
        if !len.is_multiple_of(SEGMENT_LEN) || count == 0 {
            return Err(Status(status::UNSUPP));
        }
        if count > u64::from(MAX_SEGMENTS) {
            return Err(Status(status::IOERR));
        }
        let mut bytes = vec![0u8; len as usize];
        let mut at = 0;
        for slice in &request.input {
            let n = slice.len();
            slice.copy_to(&mut bytes[at..at + n]);
            at += n;
        }
        for segment in bytes.chunks_exact(SEGMENT_LEN as usize) {
            let sector = u64::from_le_bytes(segment[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(segment[12..16].try_into().unwrap_or([0; 4]));
            let allowed_flags = if zeroes { WRITE_ZEROES_UNMAP } else { 0 };
            if flags & !allowed_flags != 0 {
                return Err(Status(status::UNSUPP));
            }
            if sectors > MAX_RANGE_SECTORS {
                return Err(Status(status::IOERR));
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.byte_range(sector, len)?;
            let mut disk = lock(&self.disk);
            if zeroes {
                disk.write_zeroes(offset, len, flags & WRITE_ZEROES_UNMAP != 0)?;
            } else {
                disk.discard(offset, len)?;
            }
        }
        Ok(())
    }
}

/// A request's failure status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status(u8);

impl From<io::Error> for Status {
    fn from(e: io::Error) -> Self {
        guest_log::guest_warn!("virtio-blk: I/O error: {e}");
        Status(status::IOERR)
    }
}

mod merge;
#[cfg(test)]
mod tests;
