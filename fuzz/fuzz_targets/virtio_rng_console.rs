//! The guest controls virtio-rng's and virtio-console's rings and buffers: filling entropy
//! requests and moving console output and input must never panic, hang, touch memory outside
//! the guest's or take more than a bounded amount per chain.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 8;

/// A ready queue whose descriptor table, avail and used rings sit at `base`, +0x80, +0x100.
fn queue(base: u32, event_idx: bool) -> Option<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(base), Some(0));
    queue.set_avail_ring_address(Some(base + 0x80), Some(0));
    queue.set_used_ring_address(Some(base + 0x100), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(queue)
}

fuzz_target!(|data: &[u8]| {
    // The input: a flags byte, the count of console input bytes (x17), then guest memory
    // from 0: rng rings at 0, console receive rings at 0x200, transmit rings at 0x400.
    let [flags, input, memory @ ..] = data else {
        return;
    };
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    let n = memory.len().min(MEMORY);
    if mem.write_slice(&memory[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mem = Arc::new(mem);
    let event_idx = flags & 1 == 1;
    let Some(mut rng) = queue(0, event_idx) else {
        return;
    };
    for _ in 0..QUEUE_SIZE * 2 {
        let chain = match rng.iter(&*mem) {
            Ok(mut chains) => chains.next(),
            Err(_) => break,
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let len = virtio::rng::fill(chain, &mem);
        if rng.add_used(&*mem, head, len).is_err() {
            break;
        }
    }
    let (Some(receive), Some(transmit)) = (queue(0x200, event_idx), queue(0x400, event_idx))
    else {
        return;
    };
    let input = vec![b'k'; usize::from(*input) * 17];
    let Ok(mut console) = virtio::console::Harness::new(mem, [receive, transmit], &input) else {
        return;
    };
    console.transmit();
    console.receive();
});
