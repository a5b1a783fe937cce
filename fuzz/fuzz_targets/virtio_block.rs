//! The guest controls a virtqueue's rings and descriptors and every byte of its requests:
//! parsing chains and serving virtio-blk requests must never panic, hang or touch memory
//! outside the guest's. The first byte picks the path: requests one at a time (qcow2's
//! in-order path), or the whole available batch grouped and merged (raw images), where every
//! chain must still get exactly one completion, in order.
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
    let mem = Arc::new(mem);
    // The input: a flags byte, then the guest's memory from address 0. The rings sit low so
    // that short inputs reach them: descriptor table at 0, avail ring at 0x100, used ring at
    // 0x200; buffers anywhere (fuzz/seeds/virtio_block has requests laid out this way).
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    let n = memory.len().min(MEMORY);
    if mem.write_slice(&memory[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_event_idx(flags & 1 == 1);
    queue.set_ready(true);
    let disk: Box<dyn block::DiskImage> = Box::new(block::mem::MemoryImage::new(64 << 10));
    let executor = virtio::block::Executor::new(Arc::new(Mutex::new(disk)), false, [0; 20]);
    if flags & 2 == 2 {
        serve_as_batch(&mut queue, &mem, &executor);
        return;
    }
    for _ in 0..64 {
        let chain = match queue.iter(&*mem) {
            Ok(mut chains) => chains.next(),
            Err(_) => return,
        };
        let Some(chain) = chain else { return };
        let head = chain.head_index();
        let len = executor.serve(chain, &mem);
        if queue.add_used(&*mem, head, len).is_err() {
            return;
        }
    }
});

fn serve_as_batch(queue: &mut Queue, mem: &Arc<Memory>, executor: &virtio::block::Executor) {
    let chains: Vec<_> = match queue.iter(mem.clone()) {
        Ok(chains) => chains.take(64).collect(),
        Err(_) => return,
    };
    let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
    let done = executor.serve_batch(chains, mem);
    let done_heads: Vec<u16> = done.iter().map(|&(head, _)| head).collect();
    assert_eq!(done_heads, heads, "one completion per chain, in order");
    for (head, len) in done {
        if queue.add_used(&**mem, head, len).is_err() {
            return;
        }
    }
}
