//! One pass over a qcow2 image's metadata (a [`Scan`]), finding what `qemu-img check` finds:
//! every cluster's references are counted from the tables (header, L1 tables, L2 tables, data
//! and compressed clusters, snapshot table, refcount table and blocks) and compared with its
//! refcount. More references than the refcount says is a corruption (the cluster may be
//! handed out again while in use), fewer is a leak (wasted space). COPIED flags that disagree
//! with the refcounts, tables outside the file, unaligned offsets and structures on top of
//! each other are corruptions too. The scan's report is what `ferro img check` prints; its
//! counts are what [`super::repair`] rebuilds refcounts from.
//!
//! The scan reads the file itself rather than through [`super::Qcow2Image::open`], which
//! refuses the very images it is for. It runs on the caller's thread and keeps no state.
//!
//! Memory: two bytes per cluster of the file for the counts (as QEMU), plus the names of the
//! metadata clusters.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{self, Header};
use super::metadata::Structure;
use super::refblock::{decode, entries_per_block};
use super::snapshot_table::{parse_table, MAX_TABLE_BYTES};
use super::{read_header, COMPRESSED, COPIED, OFFSET_MASK};

/// Problems listed one by one; beyond that only counted.
const MAX_LISTED: usize = 10_000;
/// Refcount blocks kept in memory while checking COPIED flags.
const BLOCK_CACHE: usize = 256;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Data may be lost, or further writes may destroy some.
    Corruption,
    /// Space counted as used that nothing uses.
    Leak,
}

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    /// Whether `--repair` fixes it.
    pub repairable: bool,
}

/// What a check found (field names as `qemu-img check --output=json` keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    /// Problems that stopped part of the check (unreadable tables).
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Clusters of the virtual disk stored in the image (active L1 table).
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// End of the last cluster in use or counted as in use.
    pub image_end_offset: u64,
    /// The problems (the first 10 000 of them).
    pub problems: Vec<Problem>,
    /// Problems found but not listed.
    pub unlisted: u64,
    /// What `--repair` did, one line each.
    pub repairs: Vec<String>,
}

impl CheckReport {
    fn add(&mut self, kind: ProblemKind, repairable: bool, message: String) {
        match kind {
            ProblemKind::Corruption => self.corruptions += 1,
            ProblemKind::Leak => self.leaks += 1,
        }
        if self.problems.len() < MAX_LISTED {
            self.problems.push(Problem {
                kind,
                message,
                repairable,
            });
        } else {
            self.unlisted += 1;
        }
    }
}

/// Reference counts per cluster: two bytes each, larger counts on the side.
#[derive(Debug)]
pub(super) struct Counts {
    small: Vec<u16>,
    large: HashMap<u64, u64>,
}

impl Counts {
    fn new(clusters: u64) -> Self {
        Counts {
            small: vec![0; clusters as usize],
            large: HashMap::new(),
        }
    }

    fn add(&mut self, cluster: u64) {
        let Some(slot) = self.small.get_mut(cluster as usize) else {
            return;
        };
        if *slot == u16::MAX {
            *self.large.entry(cluster).or_insert(u64::from(u16::MAX)) += 1;
        } else {
            *slot += 1;
        }
    }

    pub(super) fn get(&self, cluster: u64) -> u64 {
        match self.small.get(cluster as usize) {
            Some(&u16::MAX) => self
                .large
                .get(&cluster)
                .copied()
                .unwrap_or(u64::from(u16::MAX)),
            Some(&n) => u64::from(n),
            None => 0,
        }
    }
}

/// Which L1 table an L2 table was reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum L1Id {
    Active,
    Snapshot(usize),
}

/// An L2 table to walk: reached from entry `index` of L1 table `l1`.
#[derive(Debug, Clone, Copy)]
pub(super) struct L2Ref {
    pub l1: L1Id,
    pub index: usize,
    pub entry: u64,
}

/// The refcounts as stored, read on demand.
#[derive(Debug)]
struct Stored {
    bits: u64,
    per_block: u64,
    cluster_size: u64,
    /// Block offsets (0: no block, or one too broken to read).
    table: Vec<u64>,
    cache: HashMap<u64, Vec<u8>>,
}

impl Stored {
    fn get(&mut self, file: &File, cluster: u64) -> io::Result<u64> {
        let block = match self.table.get((cluster / self.per_block) as usize) {
            Some(&block) if block != 0 => block,
            _ => return Ok(0),
        };
        if !self.cache.contains_key(&block) {
            if self.cache.len() >= BLOCK_CACHE {
                self.cache.clear();
            }
            let raw = read_padded(file, block, self.cluster_size)?;
            self.cache.insert(block, raw);
        }
        Ok(self
            .cache
            .get(&block)
            .map_or(0, |raw| decode(self.bits, raw, cluster % self.per_block)))
    }
}

/// One pass over an image's metadata.
#[derive(Debug)]
pub(super) struct Scan {
    pub header: Header,
    pub file_len: u64,
    /// Clusters the file holds (the last may be partial).
    pub file_clusters: u64,
    /// References found per cluster.
    pub refs: Counts,
    pub report: CheckReport,
    /// A table that holds references could not be read: the counts are not complete.
    pub incomplete: bool,
    /// Some refcount differs from its references, or the refcount structure is broken.
    pub refcounts_wrong: bool,
    /// Some COPIED flag of the active tables is wrong.
    pub copied_wrong: bool,
    /// The active L1 table's entries whose L2 table was read.
    pub active_l2: Vec<L2Ref>,
    /// The clusters of the refcount table and blocks (in `refs` too), ascending: a rebuilt
    /// refcount structure replaces them.
    pub refcount_clusters: Vec<u64>,
    /// Metadata clusters and what is there.
    metadata: HashMap<u64, Structure>,
}

impl Scan {
    pub(super) fn run(file: &File) -> io::Result<Scan> {
        let header = read_header(file)?;
        let file_len = file.metadata()?.len();
        let file_clusters = file_len.div_ceil(header.cluster_size());
        let mut scan = Scan {
            refs: Counts::new(file_clusters),
            report: CheckReport {
                total_clusters: header.size.div_ceil(header.cluster_size()),
                ..Default::default()
            },
            header,
            file_len,
            file_clusters,
            incomplete: false,
            refcounts_wrong: false,
            copied_wrong: false,
            active_l2: Vec::new(),
            refcount_clusters: Vec::new(),
            metadata: HashMap::new(),
        };
        scan.mark(0, scan.header.cluster_size(), Structure::Header);
        let (offset, size) = (scan.header.l1_table_offset, scan.header.l1_size);
        let active = scan.read_l1(file, offset, size, Structure::L1Table)?;
        let snapshots = scan.read_snapshots(file)?;
        let mut stored = scan.read_refcount_structure(file)?;
        let mut walks = Vec::new();
        scan.collect_l2(&active, L1Id::Active, &mut walks);
        for (index, l1) in &snapshots {
            scan.collect_l2(l1, L1Id::Snapshot(*index), &mut walks);
        }
        for walk in walks {
            scan.walk_l2(file, &mut stored, walk)?;
        }
        scan.compare(file, &mut stored)?;
        Ok(scan)
    }

    fn cluster_bits(&self) -> u32 {
        self.header.cluster_bits
    }

    fn corruption(&mut self, repairable: bool, message: String) {
        self.report
            .add(ProblemKind::Corruption, repairable, message);
    }

    /// Counts a reference to the `len` bytes at `offset` for metadata `what`; false (and a
    /// corruption) if they are past the end of the file or on other metadata.
    fn mark(&mut self, offset: u64, len: u64, what: Structure) -> bool {
        let first = offset >> self.cluster_bits();
        let end = offset
            .saturating_add(len)
            .div_ceil(self.header.cluster_size());
        if end > self.file_clusters {
            self.corruption(
                false,
                format!("{what} at offset {offset:#x} is past the end of the file"),
            );
            return false;
        }
        let mut clear = true;
        for cluster in first..end {
            self.refs.add(cluster);
            match self.metadata.get(&cluster) {
                // Snapshots and the active L1 table share L2 tables.
                Some(Structure::L2Table) if what == Structure::L2Table => {}
                Some(&other) => {
                    let at = cluster << self.cluster_bits();
                    self.corruption(
                        false,
                        format!("{other} and {what} overlap at offset {at:#x}"),
                    );
                    clear = false;
                }
                None => {
                    self.metadata.insert(cluster, what);
                }
            }
        }
        clear
    }

    /// Reads (and marks) an L1 table; None if it cannot be used.
    fn read_l1(
        &mut self,
        file: &File,
        offset: u64,
        entries: u32,
        what: Structure,
    ) -> io::Result<Option<Vec<u64>>> {
        let len = u64::from(entries) * 8;
        if !offset.is_multiple_of(self.header.cluster_size()) || len > header::MAX_L1_BYTES {
            self.corruption(false, format!("{what} at offset {offset:#x} is invalid"));
            self.incomplete = true;
            return Ok(None);
        }
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        if offset.saturating_add(len) > self.file_len || !self.mark(offset, len, what) {
            self.incomplete |= offset.saturating_add(len) > self.file_len;
            return Ok(None);
        }
        let mut raw = vec![0u8; len as usize];
        file.read_exact_at(&mut raw, offset)?;
        Ok(Some(be64s(&raw)))
    }

    /// Reads and marks the snapshot table and each snapshot's L1 table.
    fn read_snapshots(&mut self, file: &File) -> io::Result<Vec<(usize, Option<Vec<u64>>)>> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok(Vec::new());
        }
        let offset = self.header.snapshots_offset;
        let len = self.file_len.saturating_sub(offset).min(MAX_TABLE_BYTES);
        let mut raw = vec![0u8; len as usize];
        file.read_exact_at(&mut raw, offset)?;
        let (snapshots, table_len) = match parse_table(&raw, count, self.header.cluster_size()) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.corruption(false, format!("the snapshot table cannot be read: {e}"));
                self.incomplete = true;
                self.report.check_errors += 1;
                return Ok(Vec::new());
            }
        };
        self.mark(offset, table_len, Structure::SnapshotTable);
        let mut out = Vec::with_capacity(snapshots.len());
        for (index, snapshot) in snapshots.iter().enumerate() {
            let what = Structure::SnapshotL1 { index };
            let l1 = self.read_l1(file, snapshot.l1_table_offset, snapshot.l1_size, what)?;
            out.push((index, l1));
        }
        Ok(out)
    }

    /// Marks the refcount table and its blocks; returns the readable part.
    fn read_refcount_structure(&mut self, file: &File) -> io::Result<Stored> {
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let offset = h.refcount_table_offset;
        let len = u64::from(h.refcount_table_clusters) * cluster_size;
        let mut stored = Stored {
            bits: 1 << h.refcount_order,
            per_block: entries_per_block(h.cluster_bits, h.refcount_order),
            cluster_size,
            table: Vec::new(),
            cache: HashMap::new(),
        };
        if offset.saturating_add(len) > self.file_len {
            self.refcounts_wrong = true;
            self.corruption(
                true,
                format!("the refcount table at offset {offset:#x} is past the end of the file"),
            );
            return Ok(stored);
        }
        self.mark(offset, len, Structure::RefcountTable);
        let first = offset >> self.cluster_bits();
        self.refcount_clusters
            .extend(first..first + u64::from(self.header.refcount_table_clusters));
        let mut raw = vec![0u8; len as usize];
        file.read_exact_at(&mut raw, offset)?;
        let mut table = be64s(&raw);
        for (index, entry) in table.iter_mut().enumerate() {
            *entry &= !0x1ff;
            let block = *entry;
            if block == 0 {
                continue;
            }
            let problem = if !block.is_multiple_of(cluster_size) {
                Some("is not aligned to a cluster")
            } else if block >= self.file_len {
                Some("is past the end of the file")
            } else if !self.mark(block, cluster_size, Structure::RefcountBlock) {
                Some("overlaps other metadata")
            } else {
                None
            };
            if let Some(problem) = problem {
                self.refcounts_wrong = true;
                self.corruption(
                    true,
                    format!("refcount block {index} at offset {block:#x} {problem}"),
                );
                *entry = 0;
            } else {
                self.refcount_clusters.push(block >> self.cluster_bits());
            }
        }
        self.refcount_clusters.sort_unstable();
        stored.table = table;
        Ok(stored)
    }

    /// Marks the L2 tables `l1` names; those fit to read go into `walks`.
    fn collect_l2(&mut self, l1: &Option<Vec<u64>>, id: L1Id, walks: &mut Vec<L2Ref>) {
        let Some(l1) = l1 else {
            return;
        };
        let mut seen = HashSet::new();
        for (index, &entry) in l1.iter().enumerate() {
            let offset = entry & OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            let what = Structure::L2Table;
            let bad = if !offset.is_multiple_of(self.header.cluster_size()) {
                Some(format!(
                    "{what} at offset {offset:#x} is not aligned to a cluster"
                ))
            } else if !seen.insert(offset) {
                Some(format!(
                    "{what} at offset {offset:#x} is named twice by one L1 table"
                ))
            } else {
                None
            };
            if let Some(message) = bad {
                self.corruption(false, format!("L1 entry {index}: {message}"));
                continue;
            }
            if self.mark(offset, self.header.cluster_size(), what) {
                walks.push(L2Ref {
                    l1: id,
                    index,
                    entry,
                });
            }
        }
    }

    /// Counts what one L2 table references; for the active L1 table, checks COPIED flags
    /// against the stored refcounts too (as QEMU does) and gathers the allocation figures.
    fn walk_l2(&mut self, file: &File, stored: &mut Stored, walk: L2Ref) -> io::Result<()> {
        let table = walk.entry & OFFSET_MASK;
        let active = walk.l1 == L1Id::Active;
        if active {
            self.active_l2.push(walk);
            let refcount = stored.get(file, table >> self.cluster_bits())?;
            if (refcount == 1) != (walk.entry & COPIED != 0) {
                self.copied_wrong = true;
                self.corruption(
                    true,
                    format!(
                        "L1 entry {}: the COPIED flag of the L2 table at offset {table:#x} disagrees with its refcount {refcount}",
                        walk.index
                    ),
                );
            }
        }
        let raw = read_padded(file, table, self.header.cluster_size())?;
        let mut next_contiguous = None;
        for (index, entry) in be64s(&raw).into_iter().enumerate() {
            let at = format!("L2 table at offset {table:#x}, entry {index}");
            match entry_kind(&self.header, entry) {
                EntryKind::Empty => {}
                EntryKind::Compressed { host, len } => {
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                    if entry & COPIED != 0 {
                        self.copied_wrong |= active;
                        self.corruption(
                            active,
                            format!("{at}: a compressed cluster has the COPIED flag"),
                        );
                    }
                    self.count_data(host, len, &at);
                }
                EntryKind::Data { host } => {
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous.is_some_and(|next| next != host) {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = Some(host + self.header.cluster_size());
                    }
                    if !host.is_multiple_of(self.header.cluster_size()) {
                        self.corruption(
                            false,
                            format!("{at}: data cluster at unaligned offset {host:#x}"),
                        );
                        continue;
                    }
                    if !self.count_data(host, self.header.cluster_size(), &at) || !active {
                        continue;
                    }
                    let refcount = stored.get(file, host >> self.cluster_bits())?;
                    if (refcount == 1) != (entry & COPIED != 0) {
                        self.copied_wrong = true;
                        self.corruption(
                            true,
                            format!("{at}: the COPIED flag of the data cluster at offset {host:#x} disagrees with its refcount {refcount}"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts a reference to guest data; false (and a corruption) if it is past the end of
    /// the file or on metadata.
    fn count_data(&mut self, host: u64, len: u64, at: &str) -> bool {
        let first = host >> self.cluster_bits();
        let end = host
            .saturating_add(len)
            .div_ceil(self.header.cluster_size());
        if end > self.file_clusters {
            self.corruption(
                false,
                format!("{at}: data at offset {host:#x} is past the end of the file"),
            );
            return false;
        }
        let mut clear = true;
        for cluster in first..end {
            self.refs.add(cluster);
            if let Some(&what) = self.metadata.get(&cluster) {
                let offset = cluster << self.cluster_bits();
                self.corruption(
                    false,
                    format!("{at}: guest data at offset {offset:#x} is on {what}"),
                );
                clear = false;
            }
        }
        clear
    }

    /// Compares every cluster's stored refcount with its references.
    fn compare(&mut self, file: &File, stored: &mut Stored) -> io::Result<()> {
        let max = match self.header.refcount_order {
            6 => u64::MAX,
            order => (1 << (1u64 << order)) - 1,
        };
        let mut highest = None;
        for cluster in 0..self.file_clusters {
            let refcount = stored.get(file, cluster)?;
            let references = self.refs.get(cluster);
            if refcount > 0 || references > 0 {
                highest = Some(cluster);
            }
            if references > max {
                self.corruption(false, format!("cluster {cluster} has {references} references, more than {}-bit refcounts hold", 1u64 << self.header.refcount_order));
                continue;
            }
            if refcount == references {
                continue;
            }
            self.refcounts_wrong = true;
            let message =
                format!("cluster {cluster}: refcount {refcount}, {references} references");
            if refcount < references {
                self.corruption(true, message);
            } else {
                self.report.add(ProblemKind::Leak, true, message);
            }
        }
        self.report.image_end_offset = highest.map_or(0, |c| (c + 1) << self.cluster_bits());
        Ok(())
    }
}

/// What an L2 entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntryKind {
    /// Unallocated, or zero without a cluster.
    Empty,
    /// A data cluster (or a zero cluster that keeps one).
    Data {
        host: u64,
    },
    Compressed {
        host: u64,
        len: u64,
    },
}

pub(super) fn entry_kind(header: &Header, entry: u64) -> EntryKind {
    if entry & COMPRESSED != 0 {
        let offset_bits = 62 - (header.cluster_bits - 8);
        let host = entry & ((1 << offset_bits) - 1);
        let sectors = (entry & ((1 << 62) - 1)) >> offset_bits;
        let start = host & !511;
        return EntryKind::Compressed {
            host: start,
            len: (sectors + 1) * 512,
        };
    }
    match entry & OFFSET_MASK {
        0 => EntryKind::Empty,
        host => EntryKind::Data { host },
    }
}

/// `len` bytes at `offset`, zeroes where the file ends before (its last cluster may be short).
pub(super) fn read_padded(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut raw = vec![0u8; len as usize];
    let mut done = 0;
    while done < raw.len() {
        match file.read_at(&mut raw[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(raw)
}

pub(super) fn be64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}
