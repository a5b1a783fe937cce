//! The guest controls a virtqueue's rings and descriptors and every byte of its requests:
//! parsing chains and serving virtio-blk requests must never panic, hang or touch memory
//! outside the guest's.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Memory = vm_memory::GuestMemoryMmap<()>;

const MEMORY: usize = 256 << 10;
const QUEUE_SIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]) else {
        return;
    };
    // The input is the guest's memory: descriptor table at 0, avail ring at 0x1000, used ring
    // at 0x2000, buffers anywhere.
    let n = data.len().min(MEMORY);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_event_idx(data.first().is_some_and(|b| b & 1 == 1));
    queue.set_ready(true);
    let disk: Box<dyn block::DiskImage> = Box::new(block::mem::MemoryImage::new(64 << 10));
    let executor = virtio::block::Executor::new(Arc::new(Mutex::new(disk)), false, [0; 20]);
    for _ in 0..64 {
        let chain = match queue.iter(&mem) {
            Ok(mut chains) => chains.next(),
            Err(_) => return,
        };
        let Some(chain) = chain else { return };
        let head = chain.head_index();
        let len = executor.serve(chain, &mem);
        if queue.add_used(&mem, head, len).is_err() {
            return;
        }
    }
});
