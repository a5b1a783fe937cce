//! A cache of L2 tables, written through: an evicted table never needs writing back.

use std::collections::{HashMap, VecDeque};
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
}

impl L2Cache {
    pub fn new(cluster_size: u64) -> Self {
        L2Cache {
            cluster_size,
            tables: HashMap::new(),
            order: VecDeque::new(),
            capacity: (BUDGET / cluster_size).max(4) as usize,
        }
    }

    fn insert(&mut self, offset: u64, entries: Vec<u64>) {
        if !self.tables.contains_key(&offset) {
            if self.tables.len() >= self.capacity {
                if let Some(evicted) = self.order.pop_front() {
                    self.tables.remove(&evicted);
                }
            }
            self.order.push_back(offset);
        }
        self.tables.insert(offset, entries);
    }

    /// The table at `offset`, loaded if needed.
    pub fn table(&mut self, file: &File, offset: u64) -> io::Result<&[u64]> {
        if !self.tables.contains_key(&offset) {
            if offset % self.cluster_size != 0 {
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

    /// Changes one entry, on disk and in the cache.
    pub fn set(&mut self, file: &File, table: u64, index: usize, value: u64) -> io::Result<()> {
        self.table(file, table)?;
        file.write_all_at(&value.to_be_bytes(), table + index as u64 * 8)?;
        if let Some(entries) = self.tables.get_mut(&table) {
            if let Some(slot) = entries.get_mut(index) {
                *slot = value;
            }
        }
        Ok(())
    }

    /// Writes a whole new table.
    pub fn store(&mut self, file: &File, offset: u64, entries: Vec<u64>) -> io::Result<()> {
        let mut raw = Vec::with_capacity(entries.len() * 8);
        for entry in &entries {
            raw.extend_from_slice(&entry.to_be_bytes());
        }
        file.write_all_at(&raw, offset)?;
        self.insert(offset, entries);
        Ok(())
    }

    /// Forgets everything (after the tables were changed behind the cache's back).
    pub fn clear(&mut self) {
        self.tables.clear();
        self.order.clear();
    }
}
