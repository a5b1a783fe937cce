#!/usr/bin/env python3
"""Writes seed inputs for the virtio_net fuzz target (layout in fuzz_targets/virtio_net.rs):
a flags byte, two host packet lengths (x257 bytes), then guest memory with the receive rings
at 0, the transmit rings at 0x200 and the control rings at 0x400 (each: descriptor table,
avail ring at +0x80, used ring at +0x100). Run from fuzz/: python3 seeds/make-virtio-net-seeds.py"""
import os
import struct

NEXT = 1
WRITE = 2
RX, TX, CTRL = 0x0, 0x200, 0x400


def chains(memory, base, descriptors, heads):
    for i, (addr, size, flags, nxt) in enumerate(descriptors):
        struct.pack_into("<QIHH", memory, base + 16 * i, addr, size, flags, nxt)
    struct.pack_into("<HH", memory, base + 0x80, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", memory, base + 0x84 + 2 * i, head)


def seed(flags, first, second, rx_buffers, rx_len, pairs):
    memory = bytearray(0xb00)
    # Receive: one writable buffer per chain, outside the input (zeroed guest memory).
    chains(memory, RX, [(0x10000 + 0x2000 * i, rx_len, WRITE, 0) for i in range(rx_buffers)],
           list(range(rx_buffers)))
    # Transmit: a virtio-net header, then a 60-byte Ethernet frame.
    chains(memory, TX, [(0x800, 12, NEXT, 1), (0x900, 60, 0, 0)], [0])
    memory[0x900:0x93c] = bytes([0xff] * 6 + [0x52, 0x54, 0, 0, 0, 1, 0x08, 0x06]) + bytes(46)
    # Control: set `pairs` queue pairs; the answer byte at 0xa80.
    chains(memory, CTRL, [(0xa00, 4, NEXT, 1), (0xa80, 1, WRITE, 0)], [0])
    memory[0xa00:0xa04] = bytes([4, 0, pairs, 0])
    return bytes([flags, first, second]) + bytes(memory)


os.makedirs("seeds/virtio_net", exist_ok=True)
for name, data in {
    "mergeable-small-buffers": seed(2, 1, 40, 8, 4096, 1),
    "one-big-buffer": seed(0, 4, 0, 1, 0x8000, 2),
    "event-idx-short-packet": seed(3, 0, 1, 2, 4096, 0),
}.items():
    with open(f"seeds/virtio_net/{name}", "wb") as f:
        f.write(data)
