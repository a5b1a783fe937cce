#!/usr/bin/env python3
"""Writes seed inputs for the virtio_block fuzz target (layout in fuzz_targets/virtio_block.rs):
a flags byte, then guest memory with the descriptor table at 0, the avail ring at 0x100 and
request headers at 0x400. Run from fuzz/: python3 seeds/make-virtio-block-seeds.py"""
import struct

WRITE = 2
NEXT = 1
HEADERS = 0x400
DATA = 0x2000


def request_memory(requests):
    """requests: (type, sector, data_len) each; three descriptors per chain."""
    memory = bytearray(HEADERS + 16 * len(requests))
    heads = []
    for i, (kind, sector, length) in enumerate(requests):
        head = 3 * i
        heads.append(head)
        header = HEADERS + 16 * i
        data_write = WRITE if kind == 0 else 0  # a read fills the guest's buffer
        descriptors = [
            (header, 16, NEXT, head + 1),
            (DATA + 0x1000 * i, length, NEXT | data_write, head + 2),
            (DATA + 0x1000 * len(requests) + i, 1, WRITE, 0),
        ]
        for j, (addr, size, flags, nxt) in enumerate(descriptors):
            struct.pack_into("<QIHH", memory, 16 * (head + j), addr, size, flags, nxt)
        struct.pack_into("<IIQ", memory, header, kind, 0, sector)
    struct.pack_into("<HH", memory, 0x100, 0, len(heads))
    for slot, head in enumerate(heads):
        struct.pack_into("<H", memory, 0x104 + 2 * slot, head)
    return memory


SEEDS = {
    # Adjacent reads (one merged transfer), then a write that stays alone.
    "batch-merged-reads": (2, [(0, 0, 4096), (0, 8, 4096), (0, 16, 4096), (1, 64, 512)]),
    "serial-read-write-flush": (0, [(0, 0, 512), (1, 8, 1024), (4, 0, 0)]),
    "batch-writes-event-idx": (3, [(1, 0, 512), (1, 1, 512), (0, 2, 512)]),
}

for name, (flags, requests) in SEEDS.items():
    with open(f"seeds/virtio_block/{name}", "wb") as out:
        out.write(bytes([flags]) + request_memory(requests))
