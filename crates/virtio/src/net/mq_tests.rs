//! Multi-queue: what the device offers, and the control queue's answers on a real
//! multi-queue TAP device (in a network namespace of the test's own; skipped without root).

use super::*;
use crate::device::ActiveQueue;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::device::Silent as NoInterrupt;

/// `n` datagram sockets standing in for TAP queues.
fn stand_in_taps(n: usize) -> Vec<Arc<Tap>> {
    (0..n)
        .map(|_| {
            let (_, end) = std::os::unix::net::UnixDatagram::pair().unwrap();
            Arc::new(Tap::from_file(std::fs::File::from(
                std::os::fd::OwnedFd::from(end),
            )))
        })
        .collect()
}

#[test]
fn several_tap_queues_offer_multi_queue_with_a_control_queue() {
    let single = Net::new(stand_in_taps(1), [2, 0, 0, 0, 0, 1], new_counters()).unwrap();
    assert_eq!(single.features() & (features::MQ | features::CTRL_VQ), 0);
    assert_eq!(single.queue_max_sizes().len(), 2);

    let multi = Net::new(stand_in_taps(3), [2, 0, 0, 0, 0, 1], new_counters()).unwrap();
    let offered = multi.features() & (features::MQ | features::CTRL_VQ);
    assert_eq!(offered, features::MQ | features::CTRL_VQ);
    assert_eq!(
        multi.queue_max_sizes().len(),
        7,
        "3 pairs and the control queue"
    );
    let mut pairs = [0u8; 2];
    multi.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 3, "max_virtqueue_pairs");
}

const COMMANDS: u64 = 0x10_0000;

/// Puts commands on a control queue mock: each a readable descriptor with its bytes, then a
/// one-byte writable one for the answer (at COMMANDS + 0x100 * i + 0x80).
fn add_commands(mem: &GuestMemory, ctrl: &MockSplitQueue<GuestMemory>, commands: &[&[u8]]) {
    let mut descs = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        let at = COMMANDS + 0x100 * i as u64;
        mem.write_slice(command, GuestAddress(at)).unwrap();
        mem.write_slice(&[0xff], GuestAddress(at + 0x80)).unwrap();
        descs.push(RawDescriptor::from(Descriptor::new(
            at,
            command.len() as u32,
            VRING_DESC_F_NEXT as u16,
            (2 * i + 1) as u16,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(
            at + 0x80,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
    }
    ctrl.build_multiple_desc_chains(&descs).unwrap();
}

fn answer(mem: &GuestMemory, i: u64) -> u8 {
    mem.read_obj(GuestAddress(COMMANDS + 0x100 * i + 0x80))
        .unwrap()
}

#[test]
fn the_control_queue_sets_queue_pairs_within_what_the_driver_enabled() {
    tap::in_new_netns(|| {
        let taps = real_taps("fmqdev0", 2);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mocks: Vec<_> = (0..5)
            .map(|q| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * q), 16))
            .collect();
        add_commands(
            &mem,
            &mocks[4],
            &[
                &[ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, 2, 0],
                &[ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, 3, 0],
                &[0, 0, 1], // promiscuous mode: a class not offered
                &[ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, 1, 0],
            ],
        );
        let notifies: Vec<_> = (0..5)
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
        let mut net = Net::new(taps, [2, 0, 0, 0, 0, 1], new_counters()).unwrap();
        net.activate(Activation {
            memory: Arc::new(mem.clone()),
            features: features::MQ | features::CTRL_VQ | features::MRG_RXBUF,
            queues,
            interrupt: Arc::new(NoInterrupt),
        })
        .unwrap();
        assert_eq!(net.workers.len(), 2, "a worker per pair");
        assert!(net.ctrl_worker.is_some(), "and one for control");
        notifies[4].write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while mocks[4].used().idx().load() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "commands not answered"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let answers: Vec<u8> = (0..4).map(|i| answer(&mem, i)).collect();
        assert_eq!(
            answers,
            [ctrl::ACK_OK, ctrl::ACK_ERR, ctrl::ACK_ERR, ctrl::ACK_OK]
        );
        let lens: Vec<u32> = (0..4)
            .map(|i| mocks[4].used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [1, 1, 1, 1], "each answer is one byte");
        net.reset();
        assert!(net.workers.is_empty() && net.ctrl_worker.is_none());
    });
}

/// `n` queues of a new multi-queue TAP device (call inside [`tap::in_new_netns`]).
fn real_taps(name: &str, n: usize) -> Vec<Arc<Tap>> {
    Tap::open_queues(name, n, false)
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect()
}

#[test]
fn without_multi_queue_negotiated_only_pair_zero_runs() {
    tap::in_new_netns(|| {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mocks: Vec<_> = (0..2)
            .map(|q| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * q), 16))
            .collect();
        let queues = (0u16..)
            .zip(&mocks)
            .map(|(index, mock)| ActiveQueue {
                index,
                queue: mock.create_queue().unwrap(),
                notify: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                watch: crate::queue_watch::QueueWatch::detached(),
            })
            .collect();
        // Two TAP queues offered, but an old driver takes neither MQ nor the control queue.
        let mut net =
            Net::new(real_taps("fmqdev1", 2), [2, 0, 0, 0, 0, 1], new_counters()).unwrap();
        net.activate(Activation {
            memory: Arc::new(mem.clone()),
            features: features::MRG_RXBUF,
            queues,
            interrupt: Arc::new(NoInterrupt),
        })
        .unwrap();
        assert_eq!(net.workers.len(), 1);
        net.reset();
    });
}

#[test]
fn a_missing_pair_zero_is_refused() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let queues = vec![ActiveQueue {
        index: 1,
        queue: mock.create_queue().unwrap(),
        notify: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        watch: crate::queue_watch::QueueWatch::detached(),
    }];
    let mut net = Net::new(stand_in_taps(2), [2, 0, 0, 0, 0, 1], new_counters()).unwrap();
    let result = net.activate(Activation {
        memory: Arc::new(mem),
        features: features::MQ | features::CTRL_VQ,
        queues,
        interrupt: Arc::new(NoInterrupt),
    });
    assert!(matches!(result, Err(ActivateError::MissingQueues { .. })));
}
