//! A cache of L2 tables. Entries changed by guest writes stay dirty in the cache until the
//! image flushes its metadata (after the data and refcounts they point at are durable);
//! dirty tables are never evicted. Other changes are written through.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::corrupt;

/// Memory the cache may hold, whatever the cluster size.
const BUDGET: u64 = 8 << 20;

#[derive(Debug)]
pub struct L2Cache {
    cluster_size: u64,
    tables: HashMap<u64, Vec<u64>>,
    order: VecDeque<u64>,
    capacity: usize,
    dirty: HashSet<u64>,
}

impl L2Cache {
    pub fn new(cluster_size: u64) -> Self {
        L2Cache {
            cluster_size,
            tables: HashMap::new(),
            order: VecDeque::new(),
            capacity: (BUDGET / cluster_size).max(4) as usize,
            dirty: HashSet::new(),
        }
    }

    fn insert(&mut self, offset: u64, entries: Vec<u64>) {
        if !self.tables.contains_key(&offset) {
            // The oldest clean tables go; with none clean the cache grows until the owner
            // flushes (it does so well before, see `dirty_count`), and shrinks back after.
            while self.tables.len() >= self.capacity {
                let Some(at) = self.order.iter().position(|t| !self.dirty.contains(t)) else {
                    break;
                };
                if let Some(evicted) = self.order.remove(at) {
                    self.tables.remove(&evicted);
                }
            }
            self.order.push_back(offset);
        }
        self.tables.insert(offset, entries);
    }

    /// Tables the cache holds when full.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tables changed in memory only.
    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// The table at `offset`, loaded if needed.
    pub fn table(&mut self, file: &File, offset: u64) -> io::Result<&[u64]> {
        if !self.tables.contains_key(&offset) {
            if !offset.is_multiple_of(self.cluster_size) {
                return Err(corrupt(format!("L2 table at unaligned offset {offset:#x}")));
            }
            let mut raw = vec![0u8; self.cluster_size as usize];
            file.read_exact_at(&mut raw, offset)
                .map_err(|e| corrupt(format!("cannot read the L2 table at {offset:#x}: {e}")))?;
            let entries = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            self.insert(offset, entries);
        }
        self.tables
            .get(&offset)
            .map(Vec::as_slice)
            .ok_or_else(|| io::Error::other("L2 table vanished from the cache"))
    }

    pub fn entry(&mut self, file: &File, table: u64, index: usize) -> io::Result<u64> {
        self.table(file, table)?
            .get(index)
            .copied()
            .ok_or_else(|| corrupt(format!("L2 index {index} out of range")))
    }

    /// Changes one entry in the cache only; [`Self::write_dirty`] writes it later.
    pub fn set_deferred(
        &mut self,
        file: &File,
        table: u64,
        index: usize,
        value: u64,
    ) -> io::Result<()> {
        self.table(file, table)?;
        let slot = self
            .tables
            .get_mut(&table)
            .and_then(|entries| entries.get_mut(index))
            .ok_or_else(|| corrupt(format!("L2 index {index} out of range")))?;
        *slot = value;
        self.dirty.insert(table);
        Ok(())
    }

    /// Writes every dirty table.
    pub fn write_dirty(&mut self, file: &File) -> io::Result<()> {
        let mut dirty: Vec<u64> = self.dirty.iter().copied().collect();
        dirty.sort_unstable();
        for offset in dirty {
            if let Some(entries) = self.tables.get(&offset) {
                file.write_all_at(&to_bytes(entries), offset)?;
            }
            self.dirty.remove(&offset);
        }
        Ok(())
    }

    /// Writes a whole new table.
    pub fn store(&mut self, file: &File, offset: u64, entries: Vec<u64>) -> io::Result<()> {
        file.write_all_at(&to_bytes(&entries), offset)?;
        self.dirty.remove(&offset);
        self.insert(offset, entries);
        Ok(())
    }

    /// Forgets every clean table (after tables were freed: their clusters may be reused).
    pub fn clear(&mut self) {
        let dirty = &self.dirty;
        self.tables.retain(|offset, _| dirty.contains(offset));
        self.order.retain(|offset| dirty.contains(offset));
    }
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// An empty file for the tables (each test sizes it; the tables read as zeroes).
    fn tables_file() -> File {
        tempfile::tempfile().unwrap()
    }

    fn poke(file: &File, cluster: u64, table: u64, index: u64, value: u64) {
        file.write_all_at(&value.to_be_bytes(), table * cluster + index * 8)
            .unwrap();
    }

    fn peek(file: &File, cluster: u64, table: u64, index: u64) -> u64 {
        let mut raw = [0u8; 8];
        file.read_exact_at(&mut raw, table * cluster + index * 8)
            .unwrap();
        u64::from_be_bytes(raw)
    }

    #[test]
    fn the_memory_budget_bounds_the_capacity_whatever_the_cluster_size() {
        for bits in 9..=21u32 {
            let cluster = 1u64 << bits;
            let capacity = L2Cache::new(cluster).capacity() as u64;
            assert!(capacity * cluster <= BUDGET, "2^{bits}-byte clusters");
            assert!(capacity >= 4, "2^{bits}-byte clusters");
        }
        assert_eq!(L2Cache::new(512).capacity(), 16384);
        assert_eq!(L2Cache::new(64 << 10).capacity(), 128);
    }

    #[test]
    fn entries_are_read_big_endian_then_served_from_memory() {
        let cluster = 4096;
        let file = tables_file();
        file.set_len(2 * cluster).unwrap();
        poke(&file, cluster, 1, 7, 0x0102_0304_0506_0708);
        let mut cache = L2Cache::new(cluster);
        assert_eq!(
            cache.entry(&file, cluster, 7).unwrap(),
            0x0102_0304_0506_0708
        );
        assert_eq!(cache.table(&file, cluster).unwrap().len(), 512);
        // A hit does not read the file again.
        poke(&file, cluster, 1, 7, 5);
        assert_eq!(
            cache.entry(&file, cluster, 7).unwrap(),
            0x0102_0304_0506_0708
        );
        assert_eq!(cache.dirty_count(), 0);
    }

    #[test]
    fn bad_offsets_and_indices_are_errors() {
        let cluster = 4096;
        let file = tables_file();
        file.set_len(cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        let unaligned = cache.entry(&file, 512, 0).unwrap_err();
        assert_eq!(unaligned.kind(), io::ErrorKind::InvalidData);
        assert!(unaligned.to_string().contains("unaligned"), "{unaligned}");
        let past_end = cache.entry(&file, 4 * cluster, 0).unwrap_err();
        assert_eq!(past_end.kind(), io::ErrorKind::InvalidData);
        assert!(cache.entry(&file, 0, 512).is_err());
        assert!(cache.set_deferred(&file, 0, 512, 1).is_err());
        assert_eq!(
            cache.dirty_count(),
            0,
            "a refused change leaves nothing dirty"
        );
        assert_eq!(cache.entry(&file, 0, 511).unwrap(), 0);
    }

    #[test]
    fn a_full_cache_evicts_clean_tables_in_the_order_they_were_loaded() {
        // 2 MiB tables: the budget holds 4.
        let cluster: u64 = 2 << 20;
        let file = tables_file();
        file.set_len(6 * cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        assert_eq!(cache.capacity(), 4);
        for t in 0..5 {
            poke(&file, cluster, t, 0, t + 1);
            assert_eq!(cache.entry(&file, t * cluster, 0).unwrap(), t + 1);
        }
        // Change every table on disk: the cached ones still answer from memory.
        for t in 0..5 {
            poke(&file, cluster, t, 0, t + 100);
        }
        for t in 1..5 {
            assert_eq!(
                cache.entry(&file, t * cluster, 0).unwrap(),
                t + 1,
                "table {t}"
            );
        }
        // Table 0 went first: it is read again (and table 1 makes room for it).
        assert_eq!(cache.entry(&file, 0, 0).unwrap(), 100);
        assert_eq!(cache.entry(&file, cluster, 0).unwrap(), 101);
        assert_eq!(cache.entry(&file, 4 * cluster, 0).unwrap(), 5);
    }

    #[test]
    fn the_oldest_clean_table_goes_and_never_a_dirty_one() {
        let file = tempfile::tempfile().unwrap();
        // 2 MiB tables: the 8 MiB budget holds 4.
        let cluster: u64 = 2 << 20;
        let mut cache = L2Cache::new(cluster);
        let entries = (cluster / 8) as usize;
        for t in 0..4u64 {
            cache.store(&file, t * cluster, vec![t; entries]).unwrap();
        }
        cache.set_deferred(&file, 0, 5, 99).unwrap();
        assert_eq!(cache.dirty_count(), 1);
        // A fifth table evicts table 1 (the oldest clean one), not the dirty table 0.
        cache.store(&file, 4 * cluster, vec![4; entries]).unwrap();
        file.write_all_at(&[0xee; 8], cluster).unwrap();
        assert_eq!(
            cache.entry(&file, cluster, 0).unwrap(),
            0xeeee_eeee_eeee_eeee
        );
        assert_eq!(cache.entry(&file, 0, 5).unwrap(), 99);
        // Table 0's change is on disk only once written.
        assert_eq!(peek(&file, cluster, 0, 5), 0);
        cache.write_dirty(&file).unwrap();
        assert_eq!(cache.dirty_count(), 0);
        assert_eq!(peek(&file, cluster, 0, 5), 99);
        // With every table dirty the cache grows rather than drop a change.
        for t in 0..5u64 {
            cache.set_deferred(&file, t * cluster, 0, t + 100).unwrap();
        }
        assert_eq!(cache.dirty_count(), 5);
        for t in 0..5u64 {
            assert_eq!(cache.entry(&file, t * cluster, 0).unwrap(), t + 100);
        }
        cache.clear();
        assert_eq!(cache.entry(&file, 4 * cluster, 0).unwrap(), 104);
    }

    #[test]
    fn a_cache_that_grew_over_dirty_tables_shrinks_back_once_they_are_written() {
        let cluster: u64 = 2 << 20;
        let file = tables_file();
        file.set_len(10 * cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        for t in 0..6 {
            cache.set_deferred(&file, t * cluster, 0, t + 1).unwrap();
        }
        assert_eq!(cache.tables.len(), 6, "dirty tables are kept over capacity");
        cache.write_dirty(&file).unwrap();
        for t in 6..8 {
            cache.entry(&file, t * cluster, 0).unwrap();
        }
        assert!(
            cache.tables.len() <= cache.capacity(),
            "{} tables cached, capacity {}",
            cache.tables.len(),
            cache.capacity()
        );
        assert_eq!(cache.entry(&file, 7 * cluster, 0).unwrap(), 0);
        assert_eq!(peek(&file, cluster, 5, 0), 6);
    }

    #[test]
    fn deferred_changes_reach_the_file_only_when_written_and_only_once() {
        let cluster = 4096;
        let file = tables_file();
        file.set_len(2 * cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        cache.set_deferred(&file, 0, 3, 42).unwrap();
        cache.set_deferred(&file, 0, 4, 43).unwrap();
        cache.set_deferred(&file, cluster, 0, 44).unwrap();
        assert_eq!(cache.dirty_count(), 2, "dirty tables, not entries");
        assert_eq!(cache.entry(&file, 0, 3).unwrap(), 42);
        assert_eq!(peek(&file, cluster, 0, 3), 0);
        assert_eq!(peek(&file, cluster, 1, 0), 0);
        cache.write_dirty(&file).unwrap();
        assert_eq!(cache.dirty_count(), 0);
        assert_eq!(
            [peek(&file, cluster, 0, 3), peek(&file, cluster, 0, 4)],
            [42, 43]
        );
        assert_eq!(peek(&file, cluster, 1, 0), 44);
        // Written tables are clean: a second write leaves the file alone.
        poke(&file, cluster, 0, 3, 1);
        cache.write_dirty(&file).unwrap();
        assert_eq!(peek(&file, cluster, 0, 3), 1);
    }

    #[test]
    fn storing_a_table_writes_it_through_and_supersedes_pending_changes() {
        let cluster = 4096;
        let file = tables_file();
        file.set_len(cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        cache.set_deferred(&file, 0, 1, 9).unwrap();
        cache.store(&file, 0, vec![5; 512]).unwrap();
        assert_eq!(cache.dirty_count(), 0);
        assert_eq!(peek(&file, cluster, 0, 1), 5);
        assert_eq!(peek(&file, cluster, 0, 511), 5);
        cache.write_dirty(&file).unwrap();
        assert_eq!(peek(&file, cluster, 0, 1), 5);
        assert_eq!(cache.entry(&file, 0, 1).unwrap(), 5);
    }

    #[test]
    fn clear_forgets_clean_tables_and_keeps_dirty_ones() {
        let cluster = 4096;
        let file = tables_file();
        file.set_len(2 * cluster).unwrap();
        let mut cache = L2Cache::new(cluster);
        assert_eq!(cache.entry(&file, 0, 0).unwrap(), 0);
        cache.set_deferred(&file, cluster, 0, 7).unwrap();
        poke(&file, cluster, 0, 0, 1);
        poke(&file, cluster, 1, 0, 2);
        cache.clear();
        assert_eq!(
            cache.entry(&file, 0, 0).unwrap(),
            1,
            "a clean table is read again"
        );
        assert_eq!(
            cache.entry(&file, cluster, 0).unwrap(),
            7,
            "a dirty one is kept"
        );
        assert_eq!(cache.dirty_count(), 1);
        cache.write_dirty(&file).unwrap();
        assert_eq!(peek(&file, cluster, 1, 0), 7);
    }
}
