//! The checks every open makes before the image is used: the metadata structures (header, L1
//! table, refcount table and blocks, snapshot table, snapshots' L1 tables, the L2 tables the
//! active L1 names) lie inside the file, do not overlap, and are counted as in use. An image
//! whose refcounts call metadata free would have it overwritten by the next allocation.
//!
//! The cost stays small for large images: L2 tables are located from the L1 table and their
//! refcounts looked up in the refcount blocks, which are read once each, in file order, after
//! asking the kernel to fetch them all; no L2 table is read. Images with the dirty bit
//! (refcounts known to be stale, opened read-only only) skip the refcount part.

use std::io;

use super::header::incompatible;
use super::metadata::{MetadataError, Structure};
use super::snapshot::l2_offsets;
use super::{Qcow2Image, COPIED, OFFSET_MASK};

impl Qcow2Image {
    /// Records where the metadata is and checks it (see the module docs).
    pub(super) fn verify_metadata(&mut self) -> io::Result<()> {
        let file_len = self.file.metadata()?.len();
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        let map = self.refcounts.metadata_mut();
        map.add_extent(self.header.l1_table_offset, l1_bytes, Structure::L1Table)?;
        if self.header.nb_snapshots > 0 {
            // Before its entries are parsed: what is there may not parse.
            let offset = self.header.snapshots_offset;
            if let Some((first, cluster)) = map.find(map.clusters(offset, 1)) {
                return Err(MetadataError::Overlap {
                    first,
                    second: Structure::SnapshotTable,
                    offset: cluster << self.header.cluster_bits,
                }
                .into());
            }
        }
        let (snapshots, table_len) = self.read_snapshot_table().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{e}; `ferro img check` lists what is wrong"),
            )
        })?;
        for (index, snapshot) in snapshots.iter().enumerate() {
            let end = u64::from(snapshot.l1_size) * 8;
            if snapshot.l1_table_offset.saturating_add(end) > file_len {
                return Err(MetadataError::PastEnd {
                    what: Structure::SnapshotL1 { index },
                    offset: snapshot.l1_table_offset,
                }
                .into());
            }
        }
        self.record_snapshots(&snapshots, table_len)?;
        self.check_l2_layout(&self.l1)?;
        self.refcounts
            .metadata_mut()
            .replace_l2_tables(l2_offsets(&self.l1))?;
        if self.refcounts_trusted() {
            self.check_referenced()?;
        }
        Ok(())
    }

    /// Whether the refcounts on disk are meant to be exact (not a dirty image's).
    fn refcounts_trusted(&self) -> bool {
        self.header.incompatible_features & incompatible::DIRTY == 0
    }

    /// The L2 table offsets `l1` names, in file order.
    fn sorted_l2_offsets(l1: &[u64]) -> Vec<u64> {
        let mut tables: Vec<u64> = l2_offsets(l1).collect();
        tables.sort_unstable();
        tables
    }

    /// Checks that the L2 tables `l1` names are aligned, inside the file, and clear of the
    /// other metadata and of each other.
    fn check_l2_layout(&self, l1: &[u64]) -> io::Result<()> {
        let file_len = self.file.metadata()?.len();
        let map = self.refcounts.metadata();
        let what = Structure::L2Table;
        let mut previous = None;
        for offset in Self::sorted_l2_offsets(l1) {
            if !offset.is_multiple_of(self.cluster_size()) {
                return Err(MetadataError::Unaligned { what, offset }.into());
            }
            if offset >= file_len {
                return Err(MetadataError::PastEnd { what, offset }.into());
            }
            if let Some((first, cluster)) = map.find_except_l2(map.clusters(offset, 1)) {
                return Err(MetadataError::Overlap {
                    first,
                    second: what,
                    offset: cluster << self.header.cluster_bits,
                }
                .into());
            }
            if previous == Some(offset) {
                return Err(MetadataError::Overlap {
                    first: what,
                    second: what,
                    offset,
                }
                .into());
            }
            previous = Some(offset);
        }
        Ok(())
    }

    /// Checks the L2 tables of a snapshot's L1 table `l1` before it becomes the active one:
    /// laid out as at open and in use.
    pub(super) fn check_l2_tables(&mut self, l1: &[u64]) -> io::Result<()> {
        self.check_l2_layout(l1)?;
        for offset in Self::sorted_l2_offsets(l1) {
            let cluster = offset >> self.header.cluster_bits;
            if self.refcounts.get(&self.file, cluster)? == 0 {
                let what = Structure::L2Table;
                return Err(MetadataError::Unreferenced { what, offset }.into());
            }
        }
        Ok(())
    }

    /// Checks that every recorded structure has a refcount, and that the L2 tables the active
    /// L1 table flags as its own (COPIED) have no other user: one pass in file order.
    fn check_referenced(&mut self) -> io::Result<()> {
        let map = std::mem::take(self.refcounts.metadata_mut());
        let clusters = map.clusters_in_order().map(|(cluster, _)| cluster);
        self.refcounts.prefetch(&self.file, clusters);
        let mut owned: Vec<u64> = self
            .l1
            .iter()
            .filter(|&&e| e & COPIED != 0 && e & OFFSET_MASK != 0)
            .map(|e| (e & OFFSET_MASK) >> self.header.cluster_bits)
            .collect();
        owned.sort_unstable();
        let mut found = Ok(());
        for (cluster, what) in map.clusters_in_order() {
            let offset = cluster << self.header.cluster_bits;
            let refcount = match self.refcounts.get(&self.file, cluster) {
                Ok(refcount) => refcount,
                Err(e) => {
                    found = Err(e);
                    break;
                }
            };
            if refcount == 0 {
                found = Err(MetadataError::Unreferenced { what, offset }.into());
                break;
            }
            if what == Structure::L2Table && refcount != 1 && owned.binary_search(&cluster).is_ok()
            {
                found = Err(MetadataError::SharedButCopied {
                    what,
                    offset,
                    refcount,
                }
                .into());
                break;
            }
        }
        *self.refcounts.metadata_mut() = map;
        found
    }
}
