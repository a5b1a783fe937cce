//! Guest writes never land on a qcow2 image's metadata, whatever the image says.
//!
//! Input: one byte `n`, then `n` (at most 32) operations of 5 bytes (kind, a 24-bit sector
//! number, a length of 1..=256 sectors), then the image. The image is opened for writing, the
//! operations are run (writes filled with the kind byte, write-zeroes, discards, flushes), the
//! image is closed, and the metadata before and after are compared with this file's own
//! reader: the header, the L1 table, the refcount table, the snapshot table and the snapshots'
//! L1 tables change only where the writes legitimately update them (new L2 tables, new
//! refcount blocks, a moved refcount table, the corrupt bit), every L2 entry the writes changed
//! points at a cluster that held no metadata, no metadata still in use lost its refcount,
//! and L2 tables no longer in use by the active L1 table are left alone unless freed. An image
//! refused by the open is not modified.
#![no_main]

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::FileExt;

use block::qcow2::Qcow2Image;
use block::DiskImage;
use libfuzzer_sys::fuzz_target;
use vm_memory::VolatileSlice;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const MAX_OPS: usize = 32;

fn memfd(data: &[u8]) -> Option<std::fs::File> {
    // SAFETY: memfd_create with a static NUL-terminated name has no memory-safety
    // preconditions; the returned descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"qcow2".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// An image's bytes. Read where needed: a hostile image can make a write land petabytes
/// into the (sparse) file.
enum Image<'a> {
    Bytes(Vec<u8>),
    File(&'a std::fs::File),
}

impl Image<'_> {
    /// `len` bytes at `at`, zeroes past the end of the file (qemu-img's files may end within
    /// a cluster, and reads there return zeroes).
    fn read(&self, at: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        match self {
            Image::Bytes(b) => {
                let start = (at as usize).min(b.len());
                let end = (at.saturating_add(len) as usize).min(b.len());
                out[..end - start].copy_from_slice(&b[start..end]);
            }
            Image::File(f) => {
                let mut done = 0;
                while done < out.len() {
                    match f.read_at(&mut out[done..], at + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) => panic!("cannot read the image back: {e}"),
                    }
                }
            }
        }
        out
    }
}

fn contents(file: &std::fs::File) -> Vec<u8> {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Image::File(file).read(0, len)
}

fn be32(b: &Image<'_>, at: u64) -> Option<u64> {
    Some(u64::from(u32::from_be_bytes(b.read(at, 4).try_into().ok()?)))
}

fn be64(b: &Image<'_>, at: u64) -> Option<u64> {
    Some(u64::from_be_bytes(b.read(at, 8).try_into().ok()?))
}

fn bytes(b: &Image<'_>, at: u64, len: u64) -> Vec<u8> {
    b.read(at, len)
}

/// The metadata of an image, as this target reads it (independently of the block crate).
struct Layout {
    version: u64,
    cluster_bits: u64,
    refcount_order: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    refcount_table: u64,
    refcount_entries: Vec<u64>,
    /// Snapshot table (offset, bytes) and each snapshot's L1 table (offset, bytes).
    snapshot_table: (u64, u64),
    snapshot_l1s: Vec<(u64, u64)>,
    /// L2 tables the snapshots' L1 tables name.
    snapshot_l2s: BTreeSet<u64>,
}

impl Layout {
    fn parse(b: &Image<'_>) -> Option<Layout> {
        let version = be32(b, 4)?;
        let cluster_bits = be32(b, 20)?;
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        let l1_size = be32(b, 36)?;
        let l1_offset = be64(b, 40)?;
        let l1 = (0..l1_size)
            .map(|i| be64(b, l1_offset + i * 8))
            .collect::<Option<Vec<u64>>>()?;
        let refcount_table = be64(b, 48)?;
        let refcount_clusters = be32(b, 56)?;
        let refcount_entries = (0..(refcount_clusters << cluster_bits) / 8)
            .map(|i| be64(b, refcount_table + i * 8).map(|e| e & !0x1ff))
            .collect::<Option<Vec<u64>>>()?;
        let refcount_order = if version >= 3 { be32(b, 96)? } else { 4 };
        let mut layout = Layout {
            version,
            cluster_bits,
            refcount_order,
            l1_offset,
            l1,
            refcount_table,
            refcount_entries,
            snapshot_table: (be64(b, 64)?, 0),
            snapshot_l1s: Vec::new(),
            snapshot_l2s: BTreeSet::new(),
        };
        let mut at = layout.snapshot_table.0;
        for _ in 0..be32(b, 60)? {
            let (l1, l1_size) = (be64(b, at)?, be32(b, at + 8)?);
            let id = be32(b, at + 12)? >> 16;
            let name = be32(b, at + 12)? & 0xffff;
            let extra = be32(b, at + 36)?;
            for i in 0..l1_size {
                let l2 = be64(b, l1 + i * 8)? & OFFSET_MASK;
                if l2 != 0 {
                    layout.snapshot_l2s.insert(l2 >> cluster_bits);
                }
            }
            layout.snapshot_l1s.push((l1, l1_size * 8));
            at = (at + 40 + extra + id + name).next_multiple_of(8);
        }
        layout.snapshot_table.1 = at - layout.snapshot_table.0;
        Some(layout)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        (offset >> self.cluster_bits)..((offset + len - 1) >> self.cluster_bits) + 1
    }

    /// L2 table cluster of each active L1 entry (0: none).
    fn l2_tables(&self) -> Vec<u64> {
        self.l1
            .iter()
            .map(|e| (e & OFFSET_MASK) >> self.cluster_bits)
            .collect()
    }

    /// Every cluster holding metadata.
    fn metadata(&self) -> BTreeSet<u64> {
        let mut set = BTreeSet::from([0]);
        set.extend(self.clusters(self.l1_offset, self.l1.len() as u64 * 8));
        let table_len = self.refcount_entries.len() as u64 * 8;
        set.extend(self.clusters(self.refcount_table, table_len));
        set.extend(
            self.refcount_entries
                .iter()
                .filter(|&&e| e != 0)
                .map(|e| e >> self.cluster_bits),
        );
        if !self.snapshot_l1s.is_empty() {
            set.extend(self.clusters(self.snapshot_table.0, self.snapshot_table.1));
        }
        for &(offset, len) in &self.snapshot_l1s {
            set.extend(self.clusters(offset, len));
        }
        set.extend(self.l2_tables().into_iter().filter(|&c| c != 0));
        set
    }

    fn refcount(&self, b: &Image<'_>, cluster: u64) -> Option<u64> {
        let bits = 1u64 << self.refcount_order;
        let per_block = (self.cluster_size() * 8) / bits;
        let block = *self.refcount_entries.get((cluster / per_block) as usize)?;
        if block == 0 {
            return Some(0);
        }
        let bit = (cluster % per_block) * bits;
        let raw = bytes(b, block + bit / 8, bits.div_ceil(8));
        let value = raw.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x));
        Some(if bits >= 8 {
            value
        } else {
            (value >> (bit % 8)) & ((1 << bits) - 1)
        })
    }

    /// The entries of the L2 table of L1 entry `l1_index` (zeroes without a table).
    fn l2_entries(&self, b: &Image<'_>, l1_index: usize) -> Vec<u64> {
        let cs = self.cluster_size();
        match self.l1.get(l1_index).map(|e| e & OFFSET_MASK) {
            Some(table) if table != 0 => bytes(b, table, cs)
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            _ => vec![0; (cs / 8) as usize],
        }
    }
}

/// Checks that `after` kept the metadata of `before` except for legitimate updates.
fn assert_metadata_kept(before: &Image<'_>, after: &Image<'_>) {
    let Some(old) = Layout::parse(before) else {
        return;
    };
    let new = Layout::parse(after).expect("the metadata can still be read");
    let cs = old.cluster_size();
    let moved_table = new.refcount_table != old.refcount_table;
    // Metadata that may be freed by the writes: a refcount table that moved, L2 tables the
    // active L1 table no longer uses and no snapshot uses.
    let new_l2: BTreeSet<u64> = new.l2_tables().into_iter().collect();
    let mut freed = BTreeSet::new();
    if moved_table {
        let len = old.refcount_entries.len() as u64 * 8;
        freed.extend(old.clusters(old.refcount_table, len));
    }
    for table in old.l2_tables() {
        if table != 0 && !new_l2.contains(&table) {
            if old.snapshot_l2s.contains(&table) {
                assert_eq!(
                    bytes(after, table * cs, cs),
                    bytes(before, table * cs, cs),
                    "a snapshot's L2 table at cluster {table} changed"
                );
            } else {
                freed.insert(table);
            }
        }
    }
    let live: BTreeSet<u64> = old.metadata().difference(&freed).copied().collect();
    let now = new.metadata();
    let fresh = |offset: u64| !live.contains(&(offset >> old.cluster_bits));

    // The header: only the refcount table's location and the corrupt bit may change.
    let header_before = bytes(before, 0, cs);
    let header_after = bytes(after, 0, cs);
    for (at, (a, b)) in header_before.iter().zip(&header_after).enumerate() {
        let allowed = (48..60).contains(&at) || (old.version >= 3 && at == 79 && *b == a | 2);
        assert!(a == b || allowed, "header byte {at} changed from {a:#x} to {b:#x}");
    }
    if moved_table {
        let len = new.refcount_entries.len() as u64 * 8;
        for cluster in new.clusters(new.refcount_table, len) {
            assert!(fresh(cluster * cs), "the refcount table moved onto metadata");
        }
    }
    // The snapshot table and the snapshots' L1 tables do not change.
    let (table, len) = old.snapshot_table;
    if !old.snapshot_l1s.is_empty() {
        assert_eq!(bytes(after, table, len), bytes(before, table, len), "snapshot table");
    }
    for &(offset, len) in &old.snapshot_l1s {
        assert_eq!(bytes(after, offset, len), bytes(before, offset, len), "snapshot L1");
    }
    // L1 entries change only to point at new L2 tables; the rest of its clusters is kept.
    for (i, (&a, &b)) in old.l1.iter().zip(&new.l1).enumerate() {
        let table = b & OFFSET_MASK;
        assert!(
            a == b || (table != 0 && b & COPIED != 0 && fresh(table)),
            "L1 entry {i} changed from {a:#x} to {b:#x}"
        );
    }
    let l1_end = old.l1_offset + old.l1.len() as u64 * 8;
    let tail = l1_end.next_multiple_of(cs) - l1_end;
    assert_eq!(bytes(after, l1_end, tail), bytes(before, l1_end, tail), "after the L1 table");
    // Refcount table entries only gain new blocks.
    for (i, (&a, &b)) in old.refcount_entries.iter().zip(&new.refcount_entries).enumerate() {
        assert!(a == b || (a == 0 && fresh(b)), "refcount table entry {i}: {a:#x} -> {b:#x}");
    }
    // Changed L2 entries point at clusters that held no metadata (or at nothing).
    for l1_index in 0..old.l1.len() {
        if old.l1[l1_index] & OFFSET_MASK == 0 && new.l1[l1_index] & OFFSET_MASK == 0 {
            continue;
        }
        let entries = old.l2_entries(before, l1_index);
        let now_entries = new.l2_entries(after, l1_index);
        for (index, (&a, &b)) in entries.iter().zip(&now_entries).enumerate() {
            if a & !COPIED == b & !COPIED {
                continue;
            }
            let host = b & OFFSET_MASK;
            let unmapped = host == 0 && b & COMPRESSED == 0;
            let data = b & COMPRESSED == 0 && fresh(host) && !now.contains(&(host / cs));
            assert!(
                unmapped || data,
                "L2 entry {l1_index}/{index} changed from {a:#x} to {b:#x}"
            );
        }
    }
    // Metadata still in use keeps a refcount.
    for &cluster in live.intersection(&now) {
        let count = new.refcount(after, cluster);
        assert!(count != Some(0), "metadata cluster {cluster} has refcount 0 after the writes");
    }
}

/// Runs the operations in `ops` (5 bytes each) on `image`.
fn run_ops(image: &mut Qcow2Image, ops: &[u8]) {
    let size = image.size();
    let sectors = (size / 512).max(1);
    let mut buf = vec![0u8; 256 * 512];
    for op in ops.chunks_exact(5) {
        let sector = (u64::from(op[1]) << 16 | u64::from(op[2]) << 8 | u64::from(op[3])) % sectors;
        let offset = sector * 512;
        let len = ((u64::from(op[4]) + 1) * 512).min(size - offset.min(size));
        match op[0] % 10 {
            0..=5 => {
                buf[..len as usize].fill(op[0]);
                let _ = image.write_at(offset, &[VolatileSlice::from(&mut buf[..len as usize])]);
            }
            6 => {
                let _ = image.write_zeroes(offset, len, true);
            }
            7 => {
                let _ = image.discard(offset, len);
            }
            8 => {
                let _ = image.read_at(offset, &[VolatileSlice::from(&mut buf[..len as usize])]);
            }
            _ => {
                let _ = image.flush();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(count) % (MAX_OPS + 1)) * 5;
    if rest.len() < ops_len {
        return;
    }
    let (ops, image_bytes) = rest.split_at(ops_len);
    let Some(file) = memfd(image_bytes) else {
        return;
    };
    let Ok(handle) = file.try_clone() else {
        return;
    };
    let mut image = match Qcow2Image::open(handle, true, None) {
        Ok(image) => image,
        Err(_) => {
            assert!(contents(&file) == image_bytes, "a refused open changed the image");
            return;
        }
    };
    let before = Image::Bytes(contents(&file));
    run_ops(&mut image, ops);
    drop(image);
    assert_metadata_kept(&before, &Image::File(&file));
});
