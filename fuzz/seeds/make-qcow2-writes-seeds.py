#!/usr/bin/env python3
"""Writes seed inputs for the qcow2_writes fuzz target (layout in fuzz_targets/qcow2_writes.rs):
an operation count, 5-byte operations (kind, 24-bit sector, length - 1 in sectors), then a small
qcow2 image (512-byte clusters) made by qemu-img and qemu-io, some of them damaged the ways a
hostile image would be. Run from fuzz/ (needs qemu-utils): python3 seeds/make-qcow2-writes-seeds.py"""
import os
import struct
import subprocess
import tempfile

WRITE, ZEROES, DISCARD, READ, FLUSH = 1, 6, 7, 8, 9
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def ops(*operations):
    """operations: (kind, sector, sectors) each."""
    out = bytes([len(operations)])
    for kind, sector, sectors in operations:
        out += bytes([kind]) + sector.to_bytes(3, "big") + bytes([sectors - 1])
    return out


def make(path, size="64K", compat="1.1", io=(), snapshot=False, refcount_bits=16):
    options = f"cluster_size=512,compat={compat}"
    if refcount_bits != 16:
        options += f",refcount_bits={refcount_bits}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, size],
                   check=True)
    for commands in io:
        args = ["qemu-io", "-f", "qcow2"]
        for command in commands:
            args += ["-c", command]
        subprocess.run(args + [path], check=True, stdout=subprocess.DEVNULL)
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-c", "s", path], check=True)


class Image:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.b = bytearray(f.read())
        self.l1 = self.u64(40)
        self.reftable = self.u64(48)

    def u64(self, at):
        return struct.unpack_from(">Q", self.b, at)[0]

    def set_u64(self, at, value):
        struct.pack_into(">Q", self.b, at, value)

    def set_refcount(self, offset, value):
        block = self.u64(self.reftable)
        struct.pack_into(">H", self.b, block + (offset >> 9) * 2, value)

    def l2(self, index=0):
        return self.u64(self.l1 + 8 * index) & OFFSET_MASK


WRITES = ops((WRITE, 0, 8), (WRITE, 3, 1), (FLUSH, 0, 1), (ZEROES, 16, 4), (WRITE, 100, 20),
             (DISCARD, 0, 2), (READ, 0, 8), (WRITE, 127, 1))


def seeds(tmp):
    path = os.path.join(tmp, "image.qcow2")

    def fresh(**kwargs):
        if os.path.exists(path):
            os.remove(path)
        make(path, **kwargs)
        return Image(path)

    yield "plain-writes", WRITES, fresh()
    yield "v2-writes", WRITES, fresh(compat="0.10", io=[["write -P 1 0 4k"]])
    yield "snapshot-copy-on-write", ops((WRITE, 0, 1), (WRITE, 9, 2), (ZEROES, 2, 1)), \
        fresh(io=[["write -P 1 0 8k"]], snapshot=True)
    yield "compressed", ops((WRITE, 1, 1), (WRITE, 0, 1)), fresh(io=[["write -c -P 2 0 512"]])
    # A write of more clusters than a (64-bit) refcount block counts: it used to hang.
    yield "refcount64-long-write", ops((WRITE, 0, 256), (WRITE, 300, 200)), \
        fresh(size="1M", refcount_bits=64)
    # Hostile images: before the fix each got metadata overwritten by the first write.
    image = fresh()
    image.set_refcount(0, 0)
    yield "header-counted-free", WRITES, image
    image = fresh(io=[["write -P 1 0 2k"]])
    image.set_refcount(image.l2(), 0)
    yield "l2-counted-free", ops((WRITE, 64, 1), (WRITE, 200, 2)), image
    image = fresh(io=[["write -P 1 0 2k"]])
    image.set_u64(image.l2() + 8, (1 << 63) | image.l1)
    image.set_refcount(image.l1, 2)
    yield "data-on-l1", ops((WRITE, 1, 1), (WRITE, 0, 1)), image
    # Overwriting a cluster a table wrongly shares with the refcount block drops a reference
    # to the block: it must not be freed.
    image = fresh(io=[["write -P 1 0 2k"]])
    image.set_u64(image.l2() + 8, image.u64(image.reftable))
    yield "data-names-refcount-block", ops((WRITE, 1, 1), (FLUSH, 0, 1), (WRITE, 9, 1)), image


for name, prefix, image in seeds(tempfile.mkdtemp()):
    with open(f"seeds/qcow2_writes/{name}", "wb") as out:
        out.write(prefix + bytes(image.b))
