//! qcow2 images (versions 2 and 3), as QEMU's docs/interop/qcow2.txt specifies them.
//!
//! Guest offsets map through a two-level table (L1 in memory, L2 tables cached) to host
//! clusters; unallocated clusters read from the backing image (or as zeroes), zero clusters
//! read as zeroes, compressed clusters (zlib) are inflated. The first write to a cluster that
//! is not exclusively owned (unallocated, zero, compressed or shared with a snapshot) copies it
//! to a new cluster.
//!
//! Crash safety: new data and refcounts reach the disk before any table points at them (a
//! flush separates the two), and references are dropped from tables before refcounts are
//! decreased (again with a flush between). A crash can leak clusters but never leave a table
//! pointing at a cluster whose refcount says it is free. Refcounts are kept exact, so the dirty
//! bit is never needed; an image that has it (or the corrupt bit) is opened read-only only.
//!
//! Images are untrusted: every open checks that the metadata is inside the file, does not
//! overlap and is counted as in use (`verify`), and no write, of guest data or of new
//! metadata, ever lands on a cluster that holds known metadata (`metadata`), whatever the
//! refcounts say. A write that would is refused with an I/O error and the image is marked
//! corrupt. `check` finds inconsistencies offline and rebuilds refcounts.

mod check;
mod create;
pub mod header;
mod l2cache;
mod meta;
mod metadata;
mod refblock;
mod refcount;
mod repair;
mod resize;
mod scan;
mod snapshot;
mod snapshot_table;
mod verify;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use crate::iov::{read_file_at, slices_len, write_file_at, zero_fill, Slices};
use crate::{Buffers, DiskImage};
pub use check::check;
pub use create::{create, CreateOptions};
pub use header::Header;
use l2cache::L2Cache;
pub use metadata::{MetadataError, Structure};
use refcount::Refcounts;
pub use scan::{CheckReport, Problem, ProblemKind};
pub use snapshot_table::Snapshot;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Most bytes of new clusters allocated and written at once by one guest write.
const MAX_WRITE_RUN: u64 = 16 << 20;

/// A metadata inconsistency, reported as invalid data.
pub(crate) fn corrupt(message: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt qcow2 image: {message}"),
    )
}

/// The error for every write to an image after it refused one that would have overwritten its
/// metadata.
fn broken() -> io::Error {
    corrupt("a write was about to overwrite its metadata; it is marked corrupt and takes no more writes (`ferro img check` lists what is wrong)".into())
}

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not in this image: the backing image, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a cluster still allocated to it (preallocated zeroes).
    Zero { host: Option<u64> },
    /// At `host`; `owned` when no snapshot shares it (the COPIED flag).
    Data { host: u64, owned: bool },
    /// Compressed, `len` bytes at `host`.
    Compressed { host: u64, len: u64 },
}

/// A table entry to rewrite once the data it will point at is durable.
#[derive(Debug)]
struct PendingEntry {
    guest: u64,
    entry: u64,
    old: Mapping,
}

/// An open qcow2 image.
pub struct Qcow2Image {
    file: File,
    header: Header,
    writable: bool,
    l1: Vec<u64>,
    l2: L2Cache,
    refcounts: Refcounts,
    backing: Option<Box<dyn DiskImage>>,
    backing_size: u64,
    /// The last cluster inflated: (host offset, data).
    inflated: Option<(u64, Vec<u8>)>,
    /// L1 entries changed in memory only (written by `flush_metadata`).
    l1_dirty: std::collections::BTreeSet<usize>,
    /// Clusters that lose a reference once the tables that dropped it are durable.
    pending_release: Vec<Mapping>,
    /// Whether metadata writes wait for what they depend on to be on storage (see
    /// [`crate::DiskImage::skip_barriers`]).
    ordered: bool,
    /// Set once a write was found about to land on metadata: nothing is written any more.
    broken: bool,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("header", &self.header)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

/// Reads the first cluster (or what exists of it) and parses the header.
pub fn read_header(file: &File) -> io::Result<Header> {
    let len = file.metadata()?.len();
    let mut first = vec![0u8; len.min(1 << header::MAX_CLUSTER_BITS) as usize];
    file.read_exact_at(&mut first, 0)?;
    let header = Header::parse(&first)?;
    Ok(header)
}

impl Qcow2Image {
    /// Opens an image whose file is already open (and locked); `backing` is its backing image,
    /// opened by the caller from [`Header::backing_file`].
    pub fn open(
        file: File,
        writable: bool,
        backing: Option<Box<dyn DiskImage>>,
    ) -> io::Result<Self> {
        let header = read_header(&file)?;
        if writable && header.incompatible_features & header::incompatible::CORRUPT != 0 {
            return Err(corrupt(
                "it is marked corrupt; it can only be opened read-only (`ferro img check` lists what is wrong, `--repair` fixes what it can)".into(),
            ));
        }
        if writable && header.incompatible_features & header::incompatible::DIRTY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the qcow2 image is dirty (its refcounts may be stale): repair it with `ferro img check --repair` (or `qemu-img check -r all`) first",
            ));
        }
        let file_len = file.metadata()?.len();
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(corrupt("the L1 table is past the end of the file".into()));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| corrupt(format!("cannot read the L1 table: {e}")))?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let refcounts = Refcounts::load(
            &file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )?;
        let backing_size = backing.as_ref().map_or(0, |b| b.size());
        let mut image = Qcow2Image {
            l2: L2Cache::new(header.cluster_size()),
            file,
            header,
            writable,
            l1,
            refcounts,
            backing,
            backing_size,
            inflated: None,
            l1_dirty: Default::default(),
            pending_release: Vec::new(),
            ordered: true,
            broken: false,
        };
        image.verify_metadata()?;
        if writable && image.header.version >= 3 && image.header.autoclear_features != 0 {
            // Writes would make what these bits vouch for (bitmaps, raw external data) stale.
            image
                .file
                .write_all_at(&0u64.to_be_bytes(), header::AUTOCLEAR_FIELD)?;
            image.file.sync_data()?;
            image.header.autoclear_features = 0;
        }
        Ok(image)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn cluster_index(&self, host: u64) -> u64 {
        host >> self.header.cluster_bits
    }

    /// Marks the image corrupt after `e`, if `e` refused a write over metadata (or freeing
    /// it): the corrupt bit goes into the header (version 3) and nothing else is written from
    /// now on (QEMU's reaction too).
    fn on_error(&mut self, e: io::Error) -> io::Error {
        if !metadata::is_refused_update(&e) || self.broken {
            return e;
        }
        self.broken = true;
        tracing::error!("qcow2: {e}");
        if self.header.version >= 3 {
            let features = self.header.incompatible_features | header::incompatible::CORRUPT;
            let marked = self
                .file
                .write_all_at(&features.to_be_bytes(), header::INCOMPATIBLE_FIELD)
                .and_then(|()| self.file.sync_data());
            match marked {
                Ok(()) => self.header.incompatible_features = features,
                Err(mark) => tracing::error!("qcow2: cannot mark the image corrupt: {mark}"),
            }
        }
        e
    }

    /// Refuses a guest write of `len` bytes at host offset `host` that would land on metadata.
    fn check_data_write(&mut self, host: u64, len: u64) -> io::Result<()> {
        let map = self.refcounts.metadata();
        map.check_write(map.clusters(host, len), "guest data")
            .map_err(|e| self.on_error(e.into()))
    }

    /// (L1 index, L2 index) of a guest offset.
    fn indices(&self, guest: u64) -> (usize, usize) {
        let cluster = guest >> self.header.cluster_bits;
        let l2_bits = self.header.cluster_bits - 3;
        (
            (cluster >> l2_bits) as usize,
            (cluster & ((1 << l2_bits) - 1)) as usize,
        )
    }

    fn l2_table_offset(&self, l1_index: usize) -> io::Result<u64> {
        let entry = self.l1.get(l1_index).copied().unwrap_or(0);
        let offset = entry & OFFSET_MASK;
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(corrupt(format!("L2 table at unaligned offset {offset:#x}")));
        }
        Ok(offset)
    }

    fn decode(&self, entry: u64) -> io::Result<Mapping> {
        if entry & COMPRESSED != 0 {
            let offset_bits = 62 - (self.header.cluster_bits - 8);
            let host = entry & ((1 << offset_bits) - 1);
            let sectors = (entry & ((1 << 62) - 1)) >> offset_bits;
            let len = (sectors + 1) * 512 - (host & 511);
            return Ok(Mapping::Compressed { host, len });
        }
        let host = entry & OFFSET_MASK;
        if self.header.version >= 3 && entry & ZERO != 0 {
            if !host.is_multiple_of(self.cluster_size()) {
                return Err(corrupt(format!(
                    "zero cluster at unaligned offset {host:#x}"
                )));
            }
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(corrupt(format!(
                "data cluster at unaligned offset {host:#x}"
            )));
        }
        Ok(Mapping::Data {
            host,
            owned: entry & COPIED != 0,
        })
    }

    fn mapping(&mut self, guest: u64) -> io::Result<Mapping> {
        let (l1_index, l2_index) = self.indices(guest);
        let table = self.l2_table_offset(l1_index)?;
        if table == 0 {
            return Ok(Mapping::Unallocated);
        }
        let entry = self.l2.entry(&self.file, table, l2_index)?;
        self.decode(entry)
    }

    /// Fills `buffers` (within one guest cluster, at `guest`) from `mapping`.
    fn read_mapped(
        &mut self,
        guest: u64,
        mapping: Mapping,
        buffers: &[VolatileSlice<'_, ()>],
    ) -> io::Result<()> {
        let in_cluster = guest % self.cluster_size();
        match mapping {
            Mapping::Zero { .. } => zero_fill(buffers),
            Mapping::Unallocated => self.read_backing(guest, buffers)?,
            Mapping::Data { host, .. } => read_file_at(&self.file, host + in_cluster, buffers)?,
            Mapping::Compressed { host, len } => {
                let data = self.inflate(host, len)?;
                let mut at = in_cluster as usize;
                for slice in buffers {
                    let end = at + slice.len();
                    let src = data
                        .get(at..end)
                        .ok_or_else(|| corrupt("compressed cluster too short".into()))?;
                    slice.copy_from(src);
                    at = end;
                }
            }
        }
        Ok(())
    }

    fn read_backing(&mut self, guest: u64, buffers: &[VolatileSlice<'_, ()>]) -> io::Result<()> {
        let len = slices_len(buffers);
        let Some(backing) = self.backing.as_mut() else {
            zero_fill(buffers);
            return Ok(());
        };
        let mut slices = Slices::new(buffers);
        let available = self.backing_size.saturating_sub(guest).min(len);
        if available > 0 {
            let part = slices.take(available)?;
            backing.read_at(guest, &part)?;
        }
        zero_fill(&slices.take(slices.len())?);
        Ok(())
    }

    fn inflate(&mut self, host: u64, len: u64) -> io::Result<Vec<u8>> {
        if let Some((cached, data)) = &self.inflated {
            if *cached == host {
                return Ok(data.clone());
            }
        }
        let cluster_size = self.cluster_size() as usize;
        if len > 2 * cluster_size as u64 {
            return Err(corrupt(format!("compressed cluster of {len} bytes")));
        }
        let mut compressed = vec![0u8; len as usize];
        let file_len = self.file.metadata()?.len();
        let readable = file_len.saturating_sub(host).min(len) as usize;
        self.file.read_exact_at(&mut compressed[..readable], host)?;
        let mut out = vec![0u8; cluster_size];
        let mut inflater = flate2::Decompress::new(false);
        inflater
            .decompress(&compressed, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|e| corrupt(format!("cannot inflate the cluster at {host:#x}: {e}")))?;
        if (inflater.total_out() as usize) < cluster_size {
            return Err(corrupt(format!(
                "the compressed cluster at {host:#x} is short"
            )));
        }
        self.inflated = Some((host, out.clone()));
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "access at {offset:#x}+{len:#x} beyond the end of the disk ({:#x})",
                    self.header.size
                ),
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the image is open read-only",
            ))
        }
    }

    /// Allocates `count` consecutive clusters for `purpose` (named in errors).
    fn allocate(&mut self, count: u64, purpose: &'static str) -> io::Result<u64> {
        let (offset, moves) = self
            .refcounts
            .allocate(&self.file, count, purpose)
            .map_err(|e| self.on_error(e))?;
        for moved in moves {
            self.header.refcount_table_offset = moved.offset;
            self.header.refcount_table_clusters = moved.clusters;
        }
        Ok(offset)
    }

    /// Drops one reference to the clusters behind `mapping`.
    fn release(&mut self, mapping: Mapping) -> io::Result<()> {
        self.adjust_mapping(mapping, -1)
    }

    /// Adds `delta` to the refcounts of the clusters behind `mapping`.
    fn adjust_mapping(&mut self, mapping: Mapping, delta: i64) -> io::Result<()> {
        let clusters = match mapping {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                self.cluster_index(host)..self.cluster_index(host) + 1
            }
            Mapping::Compressed { host, len } => {
                self.cluster_index(host)..self.cluster_index(host + len - 1) + 1
            }
            Mapping::Unallocated | Mapping::Zero { host: None } => return Ok(()),
        };
        for cluster in clusters {
            let adjusted = self.refcounts.adjust(&self.file, cluster, delta);
            if let Some(moved) = adjusted.map_err(|e| self.on_error(e))? {
                self.header.refcount_table_offset = moved.offset;
                self.header.refcount_table_clusters = moved.clusters;
            }
        }
        Ok(())
    }

    /// `entry` with its COPIED flag set exactly when its data cluster's refcount is 1.
    fn with_copied_flag(&mut self, entry: u64) -> io::Result<u64> {
        match self.decode(entry)? {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                let cluster = self.cluster_index(host);
                let owned = self.refcounts.get(&self.file, cluster)? == 1;
                Ok(if owned {
                    entry | COPIED
                } else {
                    entry & !COPIED
                })
            }
            _ => Ok(entry),
        }
    }

    /// Writes `buffers` into a fresh cluster for `guest`'s cluster, filling the rest of it from
    /// `old`. Returns the new cluster.
    fn write_copy(
        &mut self,
        guest: u64,
        old: Mapping,
        buffers: &[VolatileSlice<'_, ()>],
    ) -> io::Result<u64> {
        let cluster_size = self.cluster_size();
        let start = guest - guest % cluster_size;
        let new = self.allocate(1, "guest data")?;
        let len = slices_len(buffers);
        if len == cluster_size {
            write_file_at(&self.file, new, buffers)?;
            return Ok(new);
        }
        let zero_source = match old {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none() || start >= self.backing_size,
            _ => false,
        };
        let file_len = self.file.metadata()?.len();
        if zero_source && new >= file_len {
            // A cluster past the end of the file reads as zeroes already: write just the new
            // bytes, and extend the file over the whole cluster.
            self.file.set_len(new + cluster_size)?;
            write_file_at(&self.file, guest - start + new, buffers)?;
            return Ok(new);
        }
        let mut data = vec![0u8; cluster_size as usize];
        {
            let whole = [VolatileSlice::from(&mut data[..])];
            self.read_mapped(start, old, &whole)?;
        }
        let mut at = (guest - start) as usize;
        for slice in buffers {
            slice.copy_to(&mut data[at..at + slice.len()]);
            at += slice.len();
        }
        self.file.write_all_at(&data, new)?;
        Ok(new)
    }

    /// Writes whole clusters from `guest` on, the first of which (mapped as `first`) needs a
    /// new cluster, together with the following whole clusters that need one too: one
    /// allocation of consecutive clusters and one write for all of them. Returns the bytes
    /// written.
    fn write_new_run(
        &mut self,
        guest: u64,
        first: Mapping,
        slices: &mut Slices<'_>,
        pending: &mut Vec<PendingEntry>,
    ) -> io::Result<u64> {
        let cluster_size = self.cluster_size();
        let max_run = (MAX_WRITE_RUN / cluster_size).max(1);
        let mut olds = vec![first];
        let mut run = 1;
        while run < max_run && slices.len() >= (run + 1) * cluster_size {
            match self.mapping(guest + run * cluster_size)? {
                Mapping::Data { owned: true, .. } => break,
                old => olds.push(old),
            }
            run += 1;
        }
        let len = run * cluster_size;
        let part = slices.take(len)?;
        let new = self.allocate(run, "guest data")?;
        write_file_at(&self.file, new, &part)?;
        for (i, old) in (0u64..).zip(olds) {
            pending.push(PendingEntry {
                guest: guest + i * cluster_size,
                entry: (new + i * cluster_size) | COPIED,
                old,
            });
        }
        Ok(len)
    }

    /// Rewrites every full cluster of `[offset, offset + len)` to `entry` (0: unallocated,
    /// ZERO: reads as zeroes); partial clusters are left to the caller.
    fn unmap(&mut self, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let first = offset.next_multiple_of(cluster_size);
        let end = (offset + len) / cluster_size * cluster_size;
        // Unallocated reads as zeroes without a backing file; with one, the zero flag hides it.
        let entry = if zero && self.backing.is_some() {
            ZERO
        } else {
            0
        };
        let mut pending = Vec::new();
        let mut guest = first;
        while guest < end {
            let old = self.mapping(guest)?;
            let unchanged = matches!(
                (old, entry),
                (Mapping::Unallocated, 0) | (Mapping::Zero { host: None }, ZERO)
            );
            if !unchanged {
                pending.push(PendingEntry { guest, entry, old });
            }
            guest += cluster_size;
        }
        self.commit(pending)
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&mut self, mut offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.check_range(offset, slices_len(buffers))?;
        let cluster_size = self.cluster_size();
        let mut slices = Slices::new(buffers);
        while !slices.is_empty() {
            let mapping = self.mapping(offset)?;
            // Extend over following clusters that continue the same host run.
            let mut len = (cluster_size - offset % cluster_size).min(slices.len());
            if let Mapping::Data { host, .. } = mapping {
                while len < slices.len() {
                    match self.mapping(offset + len)? {
                        Mapping::Data { host: next, .. }
                            if next == host + (offset % cluster_size) + len =>
                        {
                            len = (len + cluster_size).min(slices.len());
                        }
                        _ => break,
                    }
                }
            }
            let part = slices.take(len)?;
            self.read_mapped(offset, mapping, &part)?;
            offset += len;
        }
        Ok(())
    }

    fn write_at(&mut self, mut offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, slices_len(buffers))?;
        let cluster_size = self.cluster_size();
        let mut slices = Slices::new(buffers);
        let mut pending = Vec::new();
        while !slices.is_empty() {
            let mapping = self.mapping(offset)?;
            let mut len = (cluster_size - offset % cluster_size).min(slices.len());
            match mapping {
                Mapping::Data { host, owned: true } => {
                    while len < slices.len() {
                        match self.mapping(offset + len)? {
                            Mapping::Data {
                                host: next,
                                owned: true,
                            } if next == host + (offset % cluster_size) + len => {
                                len = (len + cluster_size).min(slices.len());
                            }
                            _ => break,
                        }
                    }
                    let part = slices.take(len)?;
                    let at = host + offset % cluster_size;
                    self.check_data_write(at, len)?;
                    write_file_at(&self.file, at, &part)?;
                }
                old if offset.is_multiple_of(cluster_size) && slices.len() >= cluster_size => {
                    len = self.write_new_run(offset, old, &mut slices, &mut pending)?;
                }
                old => {
                    let part = slices.take(len)?;
                    let new = self.write_copy(offset, old, &part)?;
                    let guest = offset - offset % cluster_size;
                    pending.push(PendingEntry {
                        guest,
                        entry: new | COPIED,
                        old,
                    });
                }
            }
            offset += len;
        }
        self.commit(pending)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        if !self.flush_metadata()? {
            self.barrier()?;
        }
        Ok(())
    }

    fn skip_barriers(&mut self) {
        self.ordered = false;
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.header.version < 3 && self.backing.is_some() {
            // Without zero clusters, unmapping would expose the backing data: discard is
            // advisory, so do nothing.
            return Ok(());
        }
        self.unmap(offset, len, self.backing.is_some())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cluster_size = self.cluster_size();
        let first = offset.next_multiple_of(cluster_size);
        let end = (offset + len) / cluster_size * cluster_size;
        let full_clusters = first < end;
        if !full_clusters || self.header.version < 3 && self.backing.is_some() {
            return write_zero_bytes(self, offset, len);
        }
        if offset < first {
            write_zero_bytes(self, offset, first - offset)?;
        }
        if self.header.version < 3 {
            write_zero_bytes(self, first, end - first)?;
        } else {
            self.unmap(first, end - first, true)?;
        }
        if end < offset + len {
            write_zero_bytes(self, end, offset + len - end)?;
        }
        Ok(())
    }
}

/// Writes zeroes through the normal write path (for partial clusters).
fn write_zero_bytes(image: &mut dyn DiskImage, mut offset: u64, len: u64) -> io::Result<()> {
    let mut zeroes = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeroes.len() as u64) as usize;
        image.write_at(offset, &[VolatileSlice::from(&mut zeroes[..n])])?;
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
