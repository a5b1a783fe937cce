//! Where an open image's metadata lives, so nothing is ever written over it: the header, the
//! active L1 table, the refcount table and blocks, the snapshot table, each snapshot's L1 table
//! and the L2 tables of the active L1 (QEMU's "overlap-check" covers the same structures).
//!
//! The allocator ([`super::refcount::Refcounts`]) owns the map and consults it before it hands
//! out a cluster; guest writes into clusters they already own consult it too. A hit means the
//! refcounts or the tables lie: the image is marked corrupt and the write fails.
//!
//! Threading: as the image, one thread at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;

/// A kind of metadata structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    Header,
    L1Table,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    /// The L1 table of the snapshot at this index of the snapshot table.
    SnapshotL1 {
        index: usize,
    },
    L2Table,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Header => write!(f, "the header"),
            Structure::L1Table => write!(f, "the L1 table"),
            Structure::RefcountTable => write!(f, "the refcount table"),
            Structure::RefcountBlock => write!(f, "a refcount block"),
            Structure::SnapshotTable => write!(f, "the snapshot table"),
            Structure::SnapshotL1 { index } => write!(f, "the L1 table of snapshot #{index}"),
            Structure::L2Table => write!(f, "an L2 table"),
        }
    }
}

/// Metadata found where it must not be, or unaccounted for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("{first} and {second} overlap at offset {offset:#x}")]
    Overlap {
        first: Structure,
        second: Structure,
        offset: u64,
    },
    #[error("{what} at offset {offset:#x} is marked free (refcount 0)")]
    Unreferenced { what: Structure, offset: u64 },
    #[error("{what} at offset {offset:#x} is shared (refcount {refcount}) but flagged as owned by the active L1 table")]
    SharedButCopied {
        what: Structure,
        offset: u64,
        refcount: u64,
    },
    #[error("{what} at offset {offset:#x} is not aligned to a cluster")]
    Unaligned { what: Structure, offset: u64 },
    #[error("{what} at offset {offset:#x} is past the end of the file")]
    PastEnd { what: Structure, offset: u64 },
    /// A write about to land on metadata (found at run time, never written).
    #[error("refusing to write {purpose} at offset {offset:#x}: {what} is there")]
    WriteOver {
        purpose: &'static str,
        what: Structure,
        offset: u64,
    },
    /// A refcount about to drop to 0 while metadata is in the cluster (a table also names it
    /// as data): freed, it would be handed out again.
    #[error("refusing to free the cluster at offset {offset:#x}: {what} is there")]
    Free { what: Structure, offset: u64 },
}

impl MetadataError {
    /// What to do about it, appended to the message.
    fn hint(&self) -> &'static str {
        match self {
            MetadataError::WriteOver { .. } | MetadataError::Free { .. } => {
                "; the image is now marked corrupt: `ferro img check` lists what is wrong"
            }
            MetadataError::Unreferenced { .. } | MetadataError::SharedButCopied { .. } => {
                "; `ferro img check --repair` rebuilds the refcounts from the tables"
            }
            _ => "; `ferro img check` lists what is wrong",
        }
    }
}

/// A [`MetadataError`] as the image's I/O errors carry it.
#[derive(Debug, thiserror::Error)]
#[error("corrupt qcow2 image: {0}{hint}", hint = .0.hint())]
pub struct Corrupt(pub MetadataError);

impl From<MetadataError> for io::Error {
    fn from(e: MetadataError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, Corrupt(e))
    }
}

/// Whether `e` refused a write over metadata, or freeing it: the image must be marked corrupt.
pub fn is_refused_update(e: &io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Corrupt>()),
        Some(Corrupt(
            MetadataError::WriteOver { .. } | MetadataError::Free { .. }
        ))
    )
}

/// Which clusters hold metadata.
#[derive(Debug, Default)]
pub struct MetadataMap {
    cluster_bits: u32,
    /// Structures other than refcount blocks and L2 tables, by first cluster: (end, kind).
    /// They never overlap each other.
    extents: BTreeMap<u64, (u64, Structure)>,
    refcount_blocks: BTreeSet<u64>,
    l2_tables: BTreeSet<u64>,
}

impl MetadataMap {
    pub fn new(cluster_bits: u32) -> Self {
        MetadataMap {
            cluster_bits,
            ..Default::default()
        }
    }

    /// The clusters `len` bytes at `offset` touch.
    pub fn clusters(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        first..last + 1
    }

    fn offset(&self, cluster: u64) -> u64 {
        cluster << self.cluster_bits
    }

    /// The first structure in `clusters`, with the cluster where it starts to overlap.
    pub fn find(&self, clusters: Range<u64>) -> Option<(Structure, u64)> {
        self.find_where(clusters, true)
    }

    /// As [`Self::find`], leaving out the active L2 tables.
    pub fn find_except_l2(&self, clusters: Range<u64>) -> Option<(Structure, u64)> {
        self.find_where(clusters, false)
    }

    fn find_where(&self, clusters: Range<u64>, with_l2: bool) -> Option<(Structure, u64)> {
        if clusters.is_empty() {
            return None;
        }
        let mut hits = Vec::new();
        if let Some((&start, &(end, what))) = self.extents.range(..clusters.end).next_back() {
            if end > clusters.start {
                hits.push((what, start.max(clusters.start)));
            }
        }
        if let Some(&c) = self.refcount_blocks.range(clusters.clone()).next() {
            hits.push((Structure::RefcountBlock, c));
        }
        if let Some(&c) = self.l2_tables.range(clusters).next().filter(|_| with_l2) {
            hits.push((Structure::L2Table, c));
        }
        hits.into_iter().min_by_key(|&(_, c)| c)
    }

    /// Fails if anything is in `clusters`; `what` names the structure about to go there.
    fn claim(&self, clusters: Range<u64>, what: Structure) -> Result<(), MetadataError> {
        match self.find(clusters) {
            Some((first, cluster)) => Err(MetadataError::Overlap {
                first,
                second: what,
                offset: self.offset(cluster),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a write of `purpose` (guest data, a new table) into `clusters` if metadata is
    /// there.
    pub fn check_write(
        &self,
        clusters: Range<u64>,
        purpose: &'static str,
    ) -> Result<(), MetadataError> {
        match self.find(clusters) {
            Some((what, cluster)) => Err(MetadataError::WriteOver {
                purpose,
                what,
                offset: self.offset(cluster),
            }),
            None => Ok(()),
        }
    }

    /// Records a structure of `len` bytes at `offset` (nothing for an empty one).
    pub fn add_extent(
        &mut self,
        offset: u64,
        len: u64,
        what: Structure,
    ) -> Result<(), MetadataError> {
        let clusters = self.clusters(offset, len);
        if clusters.is_empty() {
            return Ok(());
        }
        self.claim(clusters.clone(), what)?;
        self.extents.insert(clusters.start, (clusters.end, what));
        Ok(())
    }

    /// Forgets the structure recorded at `offset` by [`Self::add_extent`].
    pub fn remove_extent(&mut self, offset: u64) {
        self.extents.remove(&(offset >> self.cluster_bits));
    }

    /// Forgets every extent of kind `what` (for structures replaced as a whole).
    pub fn remove_kind(&mut self, what: impl Fn(Structure) -> bool) {
        self.extents.retain(|_, (_, kind)| !what(*kind));
    }

    pub fn add_refcount_block(&mut self, offset: u64) -> Result<(), MetadataError> {
        let cluster = offset >> self.cluster_bits;
        self.claim(cluster..cluster + 1, Structure::RefcountBlock)?;
        self.refcount_blocks.insert(cluster);
        Ok(())
    }

    pub fn add_l2_table(&mut self, offset: u64) -> Result<(), MetadataError> {
        let cluster = offset >> self.cluster_bits;
        self.claim(cluster..cluster + 1, Structure::L2Table)?;
        self.l2_tables.insert(cluster);
        Ok(())
    }

    pub fn remove_l2_table(&mut self, offset: u64) {
        self.l2_tables.remove(&(offset >> self.cluster_bits));
    }

    /// Replaces the L2 tables with `tables` (offsets; e.g. after a snapshot was applied).
    pub fn replace_l2_tables(
        &mut self,
        tables: impl IntoIterator<Item = u64>,
    ) -> Result<(), MetadataError> {
        let old = std::mem::take(&mut self.l2_tables);
        for offset in tables {
            if let Err(e) = self.add_l2_table(offset) {
                self.l2_tables = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Every metadata cluster with its structure, in file order.
    pub fn clusters_in_order(&self) -> impl Iterator<Item = (u64, Structure)> + '_ {
        let extents = self
            .extents
            .iter()
            .flat_map(|(&start, &(end, what))| (start..end).map(move |c| (c, what)));
        let blocks = self
            .refcount_blocks
            .iter()
            .map(|&c| (c, Structure::RefcountBlock));
        let l2 = self.l2_tables.iter().map(|&c| (c, Structure::L2Table));
        merge(merge(extents, blocks), l2)
    }
}

/// Two ascending sequences of clusters as one.
fn merge(
    a: impl Iterator<Item = (u64, Structure)>,
    b: impl Iterator<Item = (u64, Structure)>,
) -> impl Iterator<Item = (u64, Structure)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_found_at_cluster_granularity() {
        let mut map = MetadataMap::new(16);
        let c = 1u64 << 16;
        map.add_extent(0, 100, Structure::Header).unwrap();
        map.add_extent(3 * c, 2 * c + 8, Structure::L1Table)
            .unwrap();
        map.add_refcount_block(10 * c).unwrap();
        map.add_l2_table(12 * c).unwrap();
        assert_eq!(map.find(1..3), None);
        assert_eq!(map.find(0..1), Some((Structure::Header, 0)));
        // The L1 table's last 8 bytes spill into a third cluster.
        assert_eq!(map.find(5..6), Some((Structure::L1Table, 5)));
        assert_eq!(map.find(2..20), Some((Structure::L1Table, 3)));
        assert_eq!(map.find(6..11), Some((Structure::RefcountBlock, 10)));
        assert_eq!(map.find(11..13), Some((Structure::L2Table, 12)));
        assert_eq!(map.find_except_l2(11..13), None);
        assert_eq!(
            map.add_extent(4 * c, 1, Structure::SnapshotTable),
            Err(MetadataError::Overlap {
                first: Structure::L1Table,
                second: Structure::SnapshotTable,
                offset: 4 * c,
            })
        );
        assert!(map.add_l2_table(12 * c).is_err(), "one L2 table twice");
        assert!(map.add_l2_table(10 * c).is_err());
        let err = map.check_write(map.clusters(12 * c + 512, 512), "guest data");
        assert!(matches!(
            err,
            Err(MetadataError::WriteOver {
                what: Structure::L2Table,
                ..
            })
        ));
        map.remove_l2_table(12 * c);
        map.remove_extent(3 * c);
        assert_eq!(map.find(2..13), Some((Structure::RefcountBlock, 10)));
        assert_eq!(map.clusters(5, 0), 0..0);
        assert_eq!(map.find(map.clusters(u64::MAX - 10, 100)), None);
    }

    #[test]
    fn replacing_the_l2_tables_keeps_the_old_ones_on_failure() {
        let mut map = MetadataMap::new(12);
        map.add_extent(0, 4096, Structure::Header).unwrap();
        map.add_l2_table(4096).unwrap();
        assert!(map.replace_l2_tables([8192, 0]).is_err());
        assert_eq!(map.find(1..2), Some((Structure::L2Table, 1)));
        assert_eq!(map.find(2..3), None);
        map.replace_l2_tables([8192, 12288]).unwrap();
        assert_eq!(map.find(1..2), None);
        assert_eq!(map.clusters_in_order().count(), 3);
        map.add_refcount_block(5 * 4096).unwrap();
        map.add_extent(6 * 4096, 2 * 4096, Structure::L1Table)
            .unwrap();
        let order: Vec<(u64, Structure)> = map.clusters_in_order().collect();
        use Structure::*;
        assert_eq!(
            order,
            [
                (0, Header),
                (2, L2Table),
                (3, L2Table),
                (5, RefcountBlock),
                (6, L1Table),
                (7, L1Table)
            ]
        );
    }
}
