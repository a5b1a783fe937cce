//! virtio-blk requests against a raw image in a temporary file, with chains built by
//! virtio-queue's mock queue.

use std::io::Write as _;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;
const DISK_SIZE: usize = 64 << 10;

struct Setup {
    mem: GuestMemory,
    _file: tempfile::NamedTempFile,
    executor: Executor,
}

fn setup(read_only: bool) -> Setup {
    setup_sized(read_only, DISK_SIZE)
}

/// A raw image of `size` bytes whose sector i holds the byte i (mod 256).
fn setup_sized(read_only: bool, size: usize) -> Setup {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let contents: Vec<u8> = (0..size)
        .map(|i| (i / SECTOR_SIZE as usize) as u8)
        .collect();
    file.write_all(&contents).unwrap();
    let disk = block::open(file.path(), read_only, None).unwrap();
    let executor = Executor::new(
        Arc::new(Mutex::new(disk)),
        read_only,
        *b"ferro-disk-serial-01",
    );
    Setup {
        mem,
        _file: file,
        executor,
    }
}

fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn header(s: &Setup, kind: u32, sector: u64) {
    s.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    s.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    s.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
}

/// Serves the chain made of `descs`; returns (used length, status byte).
fn serve(s: &mut Setup, descs: &[RawDescriptor]) -> (u32, u8) {
    s.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let queue = MockSplitQueue::new(&s.mem, 16);
    let chain = queue.build_desc_chain(descs).unwrap();
    let used = s.executor.serve(chain, &s.mem);
    (used, s.mem.read_obj(GuestAddress(STATUS)).unwrap())
}

fn disk_bytes(s: &Setup, offset: usize, len: usize) -> Vec<u8> {
    let bytes = std::fs::read(s._file.path()).unwrap();
    bytes[offset..offset + len].to_vec()
}

#[test]
fn read_fills_guest_memory() {
    let mut s = setup(false);
    header(&s, request_type::IN, 3);
    let (used, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 1024, true),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!((used, status), (1025, status::OK));
    let mut data = vec![0u8; 1024];
    s.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));
}

#[test]
fn read_split_across_descriptors_and_status_in_the_last() {
    let mut s = setup(false);
    header(&s, request_type::IN, 0);
    // Data and status share the last descriptor.
    let (used, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 300, true),
            desc(DATA + 0x1000, 213, true),
        ],
    );
    assert_eq!(
        (used, status),
        (513, 0xff),
        "status goes to the last byte, not STATUS"
    );
    let status_byte: u8 = s.mem.read_obj(GuestAddress(DATA + 0x1000 + 212)).unwrap();
    assert_eq!(status_byte, status::OK);
    let mut tail = vec![0u8; 212];
    s.mem
        .read_slice(&mut tail, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(tail.iter().all(|&b| b == 0));
}

#[test]
fn write_reaches_the_image() {
    let mut s = setup(false);
    header(&s, request_type::OUT, 8);
    s.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let (used, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!((used, status), (1, status::OK));
    assert_eq!(disk_bytes(&s, 8 * 512, 512), vec![0xab; 512]);
    header(&s, request_type::FLUSH, 0);
    assert_eq!(
        serve(&mut s, &[desc(HEADER, 16, false), desc(STATUS, 1, true)]),
        (1, status::OK)
    );
    let c = s.executor.counters();
    assert_eq!(c.get(super::counter::WRITE_REQUESTS), 1);
    assert_eq!(c.get(super::counter::WRITE_BYTES), 512);
    assert_eq!(c.get(super::counter::FLUSH_REQUESTS), 1);
    assert_eq!(c.get(super::counter::READ_REQUESTS), 0);
    assert_eq!(c.get(super::counter::ERRORS), 0);
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut s = setup(true);
    header(&s, request_type::OUT, 0);
    s.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let (_, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!(status, status::IOERR);
    assert_eq!(disk_bytes(&s, 0, 512), vec![0; 512]);
    header(&s, request_type::DISCARD, 0);
    let (_, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 16, false),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!(status, status::IOERR);
    let c = s.executor.counters();
    assert_eq!(c.get(super::counter::ERRORS), 2);
    assert_eq!(c.get(super::counter::WRITE_REQUESTS), 0);
}

#[test]
fn out_of_range_and_partial_sectors_are_io_errors() {
    let mut s = setup(false);
    header(&s, request_type::IN, (DISK_SIZE as u64 / 512) - 1);
    let chain = [
        desc(HEADER, 16, false),
        desc(DATA, 1024, true),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &chain).1, status::IOERR);
    header(&s, request_type::IN, u64::MAX / 2);
    assert_eq!(serve(&mut s, &chain).1, status::IOERR);
    header(&s, request_type::IN, 0);
    let odd = [
        desc(HEADER, 16, false),
        desc(DATA, 100, true),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &odd).1, status::IOERR);
}

#[test]
fn get_id_returns_the_serial() {
    let mut s = setup(false);
    header(&s, request_type::GET_ID, 0);
    let (used, status) = serve(
        &mut s,
        &[
            desc(HEADER, 16, false),
            desc(DATA, 20, true),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!((used, status), (21, status::OK));
    let mut id = [0u8; 20];
    s.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"ferro-disk-serial-01");
}

fn segment(s: &Setup, at: u64, sector: u64, sectors: u32, flags: u32) {
    s.mem.write_obj(sector, GuestAddress(at)).unwrap();
    s.mem.write_obj(sectors, GuestAddress(at + 8)).unwrap();
    s.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let mut s = setup(false);
    header(&s, request_type::WRITE_ZEROES, 0);
    segment(&s, DATA, 8, 8, 0);
    segment(&s, DATA + 16, 32, 8, WRITE_ZEROES_UNMAP);
    let chain = [
        desc(HEADER, 16, false),
        desc(DATA, 32, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &chain).1, status::OK);
    assert_eq!(disk_bytes(&s, 8 * 512, 4096), vec![0; 4096]);
    assert_eq!(disk_bytes(&s, 32 * 512, 4096), vec![0; 4096]);
    assert_eq!(disk_bytes(&s, 16 * 512, 1), vec![16]);

    header(&s, request_type::DISCARD, 0);
    segment(&s, DATA, 64, 8, WRITE_ZEROES_UNMAP);
    let one = [
        desc(HEADER, 16, false),
        desc(DATA, 16, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(
        serve(&mut s, &one).1,
        status::UNSUPP,
        "discard takes no flags"
    );
    segment(&s, DATA, (DISK_SIZE / 512) as u64, 8, 0);
    assert_eq!(serve(&mut s, &one).1, status::IOERR, "beyond the disk");
    let ragged = [
        desc(HEADER, 16, false),
        desc(DATA, 20, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &ragged).1, status::UNSUPP);
}

#[test]
fn unknown_types_are_unsupported() {
    let mut s = setup(false);
    header(&s, 0x1234, 0);
    let (used, status) = serve(&mut s, &[desc(HEADER, 16, false), desc(STATUS, 1, true)]);
    assert_eq!((used, status), (1, status::UNSUPP));
}

#[test]
fn malformed_chains_are_completed_without_status() {
    let mut s = setup(false);
    header(&s, request_type::IN, 0);
    // No writable descriptor at all.
    assert_eq!(
        serve(&mut s, &[desc(HEADER, 16, false), desc(DATA, 512, false)]),
        (0, 0xff)
    );
    // Readable after writable.
    let out_of_order = [
        desc(HEADER, 16, false),
        desc(STATUS, 1, true),
        desc(DATA, 16, false),
    ];
    assert_eq!(serve(&mut s, &out_of_order), (0, 0xff));
    // Header too short.
    assert_eq!(
        serve(&mut s, &[desc(HEADER, 8, false), desc(STATUS, 1, true)]),
        (0, 0xff)
    );
    // Buffer outside guest memory.
    let outside = [
        desc(HEADER, 16, false),
        desc(0x7000_0000, 512, true),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &outside), (0, 0xff));
    // A buffer that wraps around the address space.
    let wrap = [
        desc(HEADER, 16, false),
        desc(u64::MAX - 10, 512, true),
        desc(STATUS, 1, true),
    ];
    assert_eq!(serve(&mut s, &wrap), (0, 0xff));
}

#[test]
fn a_descriptor_loop_ends() {
    let s = setup(false);
    header(&s, request_type::IN, 0);
    let queue = MockSplitQueue::new(&s.mem, 16);
    // Descriptor 1 points back to itself.
    let looping = [
        RawDescriptor::from(Descriptor::new(HEADER, 16, 1, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, 1 | VRING_DESC_F_WRITE as u16, 1)),
    ];
    let chain = queue.build_multiple_desc_chains(&looping).unwrap();
    // Must return (the chain iterator stops after queue-size descriptors).
    let _ = s.executor.serve(chain, &s.mem);
}

/// Where [`serve_indirect`] puts its table (up to 65535 descriptors, 1 MiB).
const TABLE: u64 = 0x20_0000;

/// Serves a request whose descriptors, `(address, length, writable)` chained in order, sit in
/// an indirect table; returns (used length, status byte).
fn serve_indirect(s: &mut Setup, descs: &[(u64, u32, bool)]) -> (u32, u8) {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    s.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT;
        }
        let desc = Descriptor::new(addr, len, flags as u16, (i + 1) as u16);
        let at = GuestAddress(TABLE + 16 * i as u64);
        s.mem.write_obj(RawDescriptor::from(desc), at).unwrap();
    }
    let queue = MockSplitQueue::new(&s.mem, 16);
    let table_len = (descs.len() * 16) as u32;
    let head = Descriptor::new(TABLE, table_len, VRING_DESC_F_INDIRECT as u16, 0);
    let chain = queue
        .build_desc_chain(&[RawDescriptor::from(head)])
        .unwrap();
    let used = s.executor.serve(chain, &s.mem);
    (used, s.mem.read_obj(GuestAddress(STATUS)).unwrap())
}

/// A read of one sector at 0 in `segments` data segments (all but the last 2 bytes long).
fn read_in_segments(segments: u32) -> Vec<(u64, u32, bool)> {
    let mut descs = vec![(HEADER, 16, false)];
    for i in 0..segments - 1 {
        descs.push((DATA + 2 * u64::from(i), 2, true));
    }
    descs.push((DATA + 0x1000, 512 - 2 * (segments - 1), true));
    descs.push((STATUS, 1, true));
    descs
}

#[test]
fn a_request_with_more_segments_than_seg_max_gets_an_io_error() {
    let mut s = setup(false);
    header(&s, request_type::IN, 0);
    let seg_max = u32::from_le_bytes(config_space(1, 1)[12..16].try_into().unwrap());
    assert_eq!(
        serve_indirect(&mut s, &read_in_segments(seg_max)),
        (513, status::OK)
    );
    assert_eq!(
        serve_indirect(&mut s, &read_in_segments(seg_max + 1)),
        (1, status::IOERR)
    );
    assert_eq!(s.executor.counters().get(counter::ERRORS), 1);
}

#[test]
fn the_longest_indirect_chain_is_answered_an_io_error() {
    // 65535 descriptors: the header, 65533 data segments (512 KiB in all), the status byte.
    let mut s = setup_sized(false, 1 << 20);
    header(&s, request_type::IN, 0);
    let mut descs = vec![(HEADER, 16, false)];
    descs.extend((0..65532).map(|_| (DATA, 8, true)));
    descs.push((DATA, 32, true));
    descs.push((STATUS, 1, true));
    assert_eq!(descs.len(), 65535);
    assert_eq!(serve_indirect(&mut s, &descs), (1, status::IOERR));
    // Ending in a device-readable descriptor, it has no status byte: nothing is written.
    *descs.last_mut().unwrap() = (HEADER, 16, false);
    assert_eq!(serve_indirect(&mut s, &descs), (0, 0xff));
    assert_eq!(s.executor.counters().get(counter::ERRORS), 2);
    assert_eq!(s.executor.counters().get(counter::READ_REQUESTS), 0);
}

#[test]
fn config_space_layout() {
    let c = config_space(128, 3);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 128);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
    assert_eq!(c[56], 1);
}

#[test]
fn queues_are_offered_with_mq_only_when_there_are_several() {
    let s = setup(false);
    let num_queues = |device: &Block| {
        let mut bytes = [0u8; 2];
        device.read_config(34, &mut bytes);
        u16::from_le_bytes(bytes)
    };
    let one = Block::new(s.executor.disk.clone(), false, "", new_counters());
    assert_eq!(one.queue_max_sizes(), [QUEUE_SIZE]);
    assert_eq!(one.features() & features::MQ, 0);
    assert_eq!(num_queues(&one), 1);
    let four = one.with_queues(4);
    assert_eq!(four.queue_max_sizes(), [QUEUE_SIZE; 4]);
    assert_ne!(four.features() & features::MQ, 0);
    assert_eq!(num_queues(&four), 4);
    let clamped = four.with_queues(0);
    assert_eq!(clamped.queue_max_sizes().len(), 1);
    let clamped = clamped.with_queues(u16::MAX);
    assert_eq!(
        clamped.queue_max_sizes().len(),
        usize::from(MAX_DISK_QUEUES)
    );
}

/// Counts the device's interrupts, and which queues they were for.
#[derive(Default)]
struct CountingInterrupt {
    queue: std::sync::atomic::AtomicUsize,
    queues: Mutex<std::collections::BTreeSet<u16>>,
    needs_reset: std::sync::atomic::AtomicBool,
}

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, index: u16) {
        self.queue.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.queues.lock().unwrap().insert(index);
    }
    fn notify_config(&self) {}
    fn needs_reset(&self) {
        self.needs_reset
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Puts one 512-byte request per `plan` entry (kind, sector) on a queue at the start of guest
/// memory (request i: header at HEADER + 0x100 i, data at DATA + 0x1000 i, holding 0xc0 + i for
/// writes, status at STATUS + i), runs an active device until every request is used, and
/// resets the device. Returns the queue, to read the used ring.
fn run_on_device<'a>(
    s: &'a Setup,
    plan: &[(u32, u64)],
    counters: Arc<Counters>,
    interrupt: Arc<CountingInterrupt>,
) -> MockSplitQueue<'a, GuestMemory> {
    let mut queues = run_on_queues(s, &[plan], counters, interrupt);
    queues.remove(0)
}

/// Writes the descriptors of requests `first..` (`plan`, numbered on from `first` for their
/// memory) into `mock`'s table, three per request.
fn add_requests(s: &Setup, mock: &MockSplitQueue<GuestMemory>, first: u64, plan: &[(u32, u64)]) {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    let mem = &s.mem;
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let mut descs = Vec::new();
    for (local, &(kind, sector)) in plan.iter().enumerate() {
        let i = first + local as u64;
        let (header_at, data_at, status_at) = (HEADER + i * 0x100, DATA + i * 0x1000, STATUS + i);
        mem.write_obj(kind, GuestAddress(header_at)).unwrap();
        mem.write_obj(sector, GuestAddress(header_at + 8)).unwrap();
        mem.write_slice(&[0xc0 + i as u8; 512], GuestAddress(data_at))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
        let head = (local * 3) as u16;
        let data_flags = if kind == request_type::IN { write } else { 0 };
        descs.push(RawDescriptor::from(Descriptor::new(
            header_at,
            16,
            next,
            head + 1,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(
            data_at,
            512,
            next | data_flags,
            head + 2,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(status_at, 1, write, 0)));
    }
    mock.add_desc_chains(&descs, 0).unwrap();
}

/// [`run_on_device`] with one plan per queue (queue q's rings at 0x8000 q); requests are
/// numbered across queues for their memory. Returns the queues.
fn run_on_queues<'a>(
    s: &'a Setup,
    plans: &[&[(u32, u64)]],
    counters: Arc<Counters>,
    interrupt: Arc<CountingInterrupt>,
) -> Vec<MockSplitQueue<'a, GuestMemory>> {
    use crate::device::ActiveQueue;
    let mut mocks = Vec::new();
    let mut first = 0;
    for (q, plan) in plans.iter().enumerate() {
        let mock = MockSplitQueue::create(&s.mem, GuestAddress(0x8000 * q as u64), 64);
        add_requests(s, &mock, first, plan);
        first += plan.len() as u64;
        mocks.push(mock);
    }
    let notifies: Vec<_> = (0..plans.len())
        .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let queues = (0u16..)
        .zip(mocks.iter().zip(&notifies))
        .map(|(index, (mock, notify))| ActiveQueue {
            index,
            queue: mock.create_queue().unwrap(),
            notify: notify.try_clone().unwrap(),
            watch: crate::queue_watch::QueueWatch::detached(),
        })
        .collect();
    let mut device =
        Block::new(s.executor.disk.clone(), false, "", counters).with_queues(plans.len() as u16);
    device
        .activate(Activation {
            memory: Arc::new(s.mem.clone()),
            features: features::FLUSH | features::MQ,
            queues,
            interrupt,
        })
        .unwrap();
    for notify in &notifies {
        notify.write(1).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for (mock, plan) in mocks.iter().zip(plans) {
        while usize::from(mock.used().idx().load()) < plan.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "requests not completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    device.reset();
    mocks
}

#[test]
fn each_queue_serves_its_own_requests_and_interrupts_for_itself() {
    let s = setup(false);
    let first: [(u32, u64); 2] = [(request_type::IN, 3), (request_type::IN, 4)];
    let second: [(u32, u64); 3] = [
        (request_type::OUT, 10),
        (request_type::IN, 11),
        (request_type::IN, 12),
    ];
    let interrupt = Arc::new(CountingInterrupt::default());
    let mocks = run_on_queues(&s, &[&first, &second], new_counters(), interrupt.clone());
    // Requests are numbered across the queues: 0 and 1 on queue 0, 2 to 4 on queue 1.
    for (i, &(kind, sector)) in first.iter().chain(&second).enumerate() {
        let i = i as u64;
        let status: u8 = s.mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(status, status::OK, "request {i}");
        check_data(&s, i, kind, sector);
    }
    // Each used ring holds exactly its own queue's heads.
    for (mock, count) in mocks.iter().zip([first.len(), second.len()]) {
        assert_eq!(usize::from(mock.used().idx().load()), count);
        let mut heads: Vec<u32> = (0..count)
            .map(|i| mock.used().ring().ref_at(i).unwrap().load().id())
            .collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..count as u32).map(|i| i * 3).collect::<Vec<_>>());
    }
    assert_eq!(*interrupt.queues.lock().unwrap(), [0, 1].into());
}

/// Checks what request `i` of a [`run_on_device`] plan moved: a read's buffer holds its
/// sector, a write's sector holds the request's 0xc0 + i.
fn check_data(s: &Setup, i: u64, kind: u32, sector: u64) {
    if kind == request_type::IN {
        let mut data = [0u8; 512];
        s.mem
            .read_slice(&mut data, GuestAddress(DATA + i * 0x1000))
            .unwrap();
        assert_eq!(data, [sector as u8; 512], "read of sector {sector}");
    } else {
        assert_eq!(
            disk_bytes(s, sector as usize * 512, 512),
            vec![0xc0 + i as u8; 512],
            "write of sector {sector}"
        );
    }
}

#[test]
fn an_active_device_serves_a_batch_of_requests_on_a_raw_image() {
    const REQUESTS: u16 = 12;
    let s = setup(false);
    // Even requests read sector 2i; odd ones write 0xc0+i over sector 2i.
    let plan: Vec<(u32, u64)> = (0..u64::from(REQUESTS))
        .map(|i| {
            let kind = if i % 2 == 0 {
                request_type::IN
            } else {
                request_type::OUT
            };
            (kind, 2 * i)
        })
        .collect();
    let interrupt = Arc::new(CountingInterrupt::default());
    let mock = run_on_device(&s, &plan, new_counters(), interrupt.clone());
    let mem = &s.mem;
    for i in 0..u64::from(REQUESTS) {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(status, status::OK, "request {i}");
        let sector = 2 * i as usize;
        if i % 2 == 0 {
            let mut data = [0u8; 512];
            mem.read_slice(&mut data, GuestAddress(DATA + i * 0x1000))
                .unwrap();
            assert_eq!(data, [sector as u8; 512], "read of sector {sector}");
        } else {
            assert_eq!(
                disk_bytes(&s, sector * 512, 512),
                vec![0xc0 + i as u8; 512],
                "write of sector {sector}"
            );
        }
    }
    // Every head came back exactly once.
    let mut heads: Vec<u32> = (0..REQUESTS)
        .map(|i| mock.used().ring().ref_at(i as usize).unwrap().load().id())
        .collect();
    heads.sort_unstable();
    let expected: Vec<u32> = (0..u32::from(REQUESTS)).map(|i| i * 3).collect();
    assert_eq!(heads, expected);
    assert!(interrupt.queue.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(!interrupt
        .needs_reset
        .load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn adjacent_requests_are_served_merged_and_each_gets_its_status() {
    // Reads of sectors 0..4 (adjacent), writes of sectors 8 and 9 (adjacent), a read past the
    // end of the disk (its own error), then a read of sector 20.
    let plan: [(u32, u64); 8] = [
        (request_type::IN, 0),
        (request_type::IN, 1),
        (request_type::IN, 2),
        (request_type::IN, 3),
        (request_type::OUT, 8),
        (request_type::OUT, 9),
        (request_type::IN, (DISK_SIZE as u64) / SECTOR_SIZE),
        (request_type::IN, 20),
    ];
    let s = setup(false);
    let counters = new_counters();
    let mock = run_on_device(
        &s,
        &plan,
        counters.clone(),
        Arc::new(CountingInterrupt::default()),
    );
    let mem = &s.mem;
    for (i, &(kind, sector)) in plan.iter().enumerate() {
        let i = i as u64;
        let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        if sector * SECTOR_SIZE >= DISK_SIZE as u64 {
            assert_eq!(status, status::IOERR, "request {i} is past the end");
            continue;
        }
        assert_eq!(status, status::OK, "request {i}");
        check_data(&s, i, kind, sector);
    }
    // Every used length: data read plus the status byte; writes: the status byte.
    for i in 0..plan.len() {
        let used = mock.used().ring().ref_at(i).unwrap().load();
        let (kind, sector) = plan[(used.id() / 3) as usize];
        let expected = match kind {
            _ if sector * SECTOR_SIZE >= DISK_SIZE as u64 => 1,
            request_type::IN => 513,
            _ => 1,
        };
        assert_eq!(used.len(), expected, "chain {}", used.id());
    }
    assert_eq!(counters.get(counter::READ_REQUESTS), 5);
    assert_eq!(counters.get(counter::WRITE_REQUESTS), 2);
    assert_eq!(counters.get(counter::ERRORS), 1);
}

#[test]
fn a_long_read_is_served_on_an_io_thread_and_lands_whole() {
    use crate::device::ActiveQueue;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    const LONG: u32 = 256 << 10;
    const LONG_DATA: u64 = 0x18_0000;
    let s = setup_sized(false, 1 << 20);
    let mem = &s.mem;
    let mock = MockSplitQueue::new(mem, 16);
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    // A read of sectors 1024.. (the disk's second half, bytes 1024 % 256 = 0 onward).
    mem.write_obj(request_type::IN, GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(1024u64, GuestAddress(HEADER + 8)).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(HEADER, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(LONG_DATA, LONG, next | write, 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, write, 0)),
    ];
    mock.add_desc_chains(&descs, 0).unwrap();
    let notify = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut device = Block::new(s.executor.disk.clone(), false, "", new_counters());
    let watch = crate::queue_watch::QueueWatch::detached();
    watch.activate(
        16,
        Arc::new(mem.clone()),
        mock.avail_addr(),
        mock.used_addr(),
    );
    device
        .activate(Activation {
            memory: Arc::new(mem.clone()),
            features: features::FLUSH,
            queues: vec![ActiveQueue {
                index: 0,
                queue: mock.create_queue().unwrap(),
                notify: notify.try_clone().unwrap(),
                watch: watch.clone(),
            }],
            interrupt: Arc::new(CountingInterrupt::default()),
        })
        .unwrap();
    notify.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mock.used().idx().load() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read did not complete"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // An I/O thread served it, and reset waits for it. Reading /proc/self/task can skip an
    // entry while other tests' threads exit (its positions shift), so look a few times.
    let io_thread_count = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .unwrap_or_default()
                    .trim()
                    == "virtio-blk-io"
            })
            .count()
    };
    let io_threads = (0..100)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            io_thread_count()
        })
        .find(|&n| n >= 1)
        .unwrap_or(0);
    assert!(io_threads >= 1, "no virtio-blk-io thread");
    device.reset();
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, status::OK);
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), LONG + 1);
    // The stall report saw the worker take the notification and the I/O thread return the
    // chain and interrupt.
    let seen = watch.snapshot("block0", 0);
    assert_eq!((seen.next_avail, seen.next_used, seen.in_flight), (1, 1, 0));
    assert_eq!((seen.driver_avail_idx, seen.used_idx), (Some(1), Some(1)));
    assert_eq!((seen.notifications, seen.interrupts), (1, 1));
    let mut data = vec![0u8; LONG as usize];
    mem.read_slice(&mut data, GuestAddress(LONG_DATA)).unwrap();
    assert_eq!(data, disk_bytes(&s, 1024 * 512, LONG as usize));
}
