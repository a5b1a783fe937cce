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
            if self.tables.len() >= self.capacity {
                // The oldest clean table goes; with none clean the cache grows until the
                // owner flushes (it does so well before, see `dirty_count`).
                if let Some(at) = self.order.iter().position(|t| !self.dirty.contains(t)) {
                    if let Some(evicted) = self.order.remove(at) {
                        self.tables.remove(&evicted);
                    }
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
