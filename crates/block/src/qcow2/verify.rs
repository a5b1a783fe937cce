//! The checks every open makes before the image is used: the metadata structures (header, L1
//! table, refcount table and blocks, snapshot table, snapshots' L1 tables, the L2 tables the
//! active L1 names) lie inside the file, do not overlap, and are counted as in use. An image
//! whose refcounts call metadata free would have it overwritten by the next allocation.
//!
//! The cost stays small for large images: L2 tables are located from the L1 table and their
//! refcounts looked up in the refcount blocks; no L2 table is read. Images with the dirty bit
//! (refcounts known to be stale, opened read-only only) skip the refcount part.

use std::io;

use super::header::incompatible;
use super::metadata::{MetadataError, MetadataMap, Structure};
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
        let l1 = std::mem::take(&mut self.l1);
        let checked = self.check_l2_tables(&l1, true);
        self.l1 = l1;
        checked?;
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

    /// Checks the L2 tables `l1` names, before they become the active ones: aligned, inside
    /// the file, clear of other metadata and of each other, and in use (with the COPIED flag
    /// only where nothing else uses them, when `check_copied`).
    pub(super) fn check_l2_tables(&mut self, l1: &[u64], check_copied: bool) -> io::Result<()> {
        let file_len = self.file.metadata()?.len();
        let cluster_size = self.cluster_size();
        // In file order, so each refcount block is read once.
        let mut tables: Vec<u64> = l1
            .iter()
            .copied()
            .filter(|e| e & OFFSET_MASK != 0)
            .collect();
        tables.sort_unstable_by_key(|e| e & OFFSET_MASK);
        let mut previous = None;
        for entry in tables {
            let offset = entry & OFFSET_MASK;
            let what = Structure::L2Table;
            if !offset.is_multiple_of(cluster_size) {
                return Err(MetadataError::Unaligned { what, offset }.into());
            }
            if offset >= file_len {
                return Err(MetadataError::PastEnd { what, offset }.into());
            }
            let map = self.refcounts.metadata();
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
            if !self.refcounts_trusted() {
                continue;
            }
            let refcount = self
                .refcounts
                .get(&self.file, offset >> self.header.cluster_bits)?;
            if refcount == 0 {
                return Err(MetadataError::Unreferenced { what, offset }.into());
            }
            if check_copied && entry & COPIED != 0 && refcount != 1 {
                return Err(MetadataError::SharedButCopied {
                    what,
                    offset,
                    refcount,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Checks that every recorded structure other than the L2 tables (checked with their L1
    /// entries) has a refcount.
    fn check_referenced(&mut self) -> io::Result<()> {
        let map = std::mem::take(self.refcounts.metadata_mut());
        let found = self.first_unreferenced(&map);
        *self.refcounts.metadata_mut() = map;
        match found? {
            Some((what, offset)) => Err(MetadataError::Unreferenced { what, offset }.into()),
            None => Ok(()),
        }
    }

    fn first_unreferenced(&mut self, map: &MetadataMap) -> io::Result<Option<(Structure, u64)>> {
        for (what, clusters) in map.all() {
            if what == Structure::L2Table {
                continue;
            }
            for cluster in clusters {
                if self.refcounts.get(&self.file, cluster)? == 0 {
                    return Ok(Some((what, cluster << self.header.cluster_bits)));
                }
            }
        }
        Ok(None)
    }
}
