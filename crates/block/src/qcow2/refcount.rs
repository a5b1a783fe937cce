//! Cluster reference counts: the refcount table, refcount blocks (loaded on demand, written
//! through), allocation of free clusters and growth of the table.
//!
//! Writes happen in an order that never lets metadata point at a cluster whose refcount is not
//! on disk: a new refcount block is written before the table entry that points at it, and a
//! new table before the header points at it (with a flush in between).
//!
//! The refcounts alone are not trusted to say a cluster is free: every cluster handed out is
//! first checked against the [`MetadataMap`] of the image's known metadata, which the
//! allocator keeps (its own table and blocks) and the image updates (everything else).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::corrupt;
use super::metadata::{MetadataError, MetadataMap, Structure};
use super::refblock::{decode, encode, entries_per_block};

/// The image's refcounts.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    table_offset: u64,
    table: Vec<u64>,
    blocks: HashMap<u64, Vec<u8>>,
    /// First cluster index worth looking at for free clusters.
    free_hint: u64,
    /// One past the highest cluster given a refcount in this session (it may not be written
    /// yet, so the file's length alone does not tell where free space starts).
    end: u64,
    /// Where metadata is: never handed out, whatever the refcounts say.
    metadata: MetadataMap,
}

/// Where the refcount table lives after it grew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMove {
    pub offset: u64,
    pub clusters: u32,
}

const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

impl Refcounts {
    /// Loads the refcount table; the metadata map starts with it and its blocks.
    pub fn load(
        file: &File,
        cluster_bits: u32,
        refcount_order: u32,
        offset: u64,
        clusters: u32,
    ) -> io::Result<Self> {
        let len = u64::from(clusters) << cluster_bits;
        if offset.saturating_add(len) > file.metadata()?.len() {
            return Err(corrupt(
                "the refcount table is past the end of the file".into(),
            ));
        }
        let len = len as usize;
        let mut raw = vec![0u8; len];
        file.read_exact_at(&mut raw, offset)
            .map_err(|e| corrupt(format!("cannot read the refcount table: {e}")))?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & OFFSET_MASK)
            .collect();
        // Every block must exist and count its own clusters: a block shared by several table
        // entries (or past the end of the file) would make allocation scan forever.
        let file_len = file.metadata()?.len();
        let mut metadata = MetadataMap::new(cluster_bits);
        metadata.add_extent(0, 1 << cluster_bits, Structure::Header)?;
        metadata.add_extent(offset, len as u64, Structure::RefcountTable)?;
        for &block in table.iter().filter(|&&b| b != 0) {
            let what = Structure::RefcountBlock;
            if block % (1 << cluster_bits) != 0 {
                return Err(MetadataError::Unaligned {
                    what,
                    offset: block,
                }
                .into());
            }
            if block >= file_len {
                return Err(MetadataError::PastEnd {
                    what,
                    offset: block,
                }
                .into());
            }
            metadata.add_refcount_block(block)?;
        }
        Ok(Refcounts {
            cluster_bits,
            refcount_order,
            table_offset: offset,
            table,
            blocks: HashMap::new(),
            free_hint: 0,
            end: 0,
            metadata,
        })
    }

    /// Refcount table entry `index` (a block's offset, or 0).
    #[cfg(test)]
    pub fn table_entry(&self, index: usize) -> u64 {
        self.table.get(index).copied().unwrap_or(0)
    }

    /// Sets a refcount without asking the metadata map: how a lying image looks.
    #[cfg(test)]
    pub fn set_unchecked(&mut self, file: &File, cluster: u64, value: u64) -> io::Result<()> {
        let map = std::mem::take(&mut self.metadata);
        let result = self.set(file, cluster, value);
        self.metadata = map;
        result.map(|_| ())
    }

    /// Where the image's metadata is.
    pub fn metadata(&self) -> &MetadataMap {
        &self.metadata
    }

    /// For the image to record the structures it places, moves and frees.
    pub fn metadata_mut(&mut self) -> &mut MetadataMap {
        &mut self.metadata
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest refcount an entry holds.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << self.bits()) - 1
        }
    }

    fn per_block(&self) -> u64 {
        entries_per_block(self.cluster_bits, self.refcount_order)
    }

    fn block(&mut self, file: &File, offset: u64) -> io::Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&offset) {
            if !offset.is_multiple_of(self.cluster_size()) {
                return Err(corrupt(format!(
                    "refcount block at unaligned offset {offset:#x}"
                )));
            }
            let mut raw = vec![0u8; self.cluster_size() as usize];
            file.read_exact_at(&mut raw, offset).map_err(|e| {
                corrupt(format!(
                    "cannot read the refcount block at {offset:#x}: {e}"
                ))
            })?;
            if self.blocks.len() >= 64 {
                self.blocks.clear(); // written through, so dropping is free
            }
            self.blocks.insert(offset, raw);
        }
        self.blocks
            .get_mut(&offset)
            .ok_or_else(|| io::Error::other("refcount block vanished"))
    }

    /// The refcount of cluster `cluster` (by index).
    pub fn get(&mut self, file: &File, cluster: u64) -> io::Result<u64> {
        let per_block = self.per_block();
        let table_index = (cluster / per_block) as usize;
        let Some(&block_offset) = self.table.get(table_index) else {
            return Ok(0);
        };
        if block_offset == 0 {
            return Ok(0);
        }
        let index = cluster % per_block;
        let bits = self.bits();
        Ok(decode(bits, self.block(file, block_offset)?, index))
    }

    /// Sets the refcount of `cluster`, creating its refcount block (and growing the table) if
    /// needed. Returns where the table moved, if it did.
    pub fn set(&mut self, file: &File, cluster: u64, value: u64) -> io::Result<Option<TableMove>> {
        if value > self.max_refcount() {
            return Err(corrupt(format!(
                "refcount of cluster {cluster} would overflow"
            )));
        }
        if value == 0 {
            // Metadata is recorded until it is freed on purpose: a table naming it as data
            // must not free it.
            if let Some((what, _)) = self.metadata.find(cluster..cluster + 1) {
                return Err(MetadataError::Free {
                    what,
                    offset: cluster << self.cluster_bits,
                }
                .into());
            }
        }
        let per_block = self.per_block();
        let table_index = (cluster / per_block) as usize;
        let mut moved = None;
        if table_index >= self.table.len() {
            moved = Some(self.grow_table(file, table_index + 1)?);
        }
        if self.table[table_index] == 0 {
            self.create_block(file, table_index)?;
        }
        let block_offset = self.table[table_index];
        let index = cluster % per_block;
        let bits = self.bits();
        let block = self.block(file, block_offset)?;
        let range = encode(bits, block, index, value);
        file.write_all_at(&block[range.clone()], block_offset + range.start as u64)?;
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        if value > 0 {
            self.end = self.end.max(cluster + 1);
        }
        Ok(moved)
    }

    /// Sets the refcounts of clusters `start..start + count` to `value` with one write per
    /// refcount block (a run of new clusters would otherwise cost a write each); clusters
    /// whose block does not exist yet go through [`Refcounts::set`].
    fn set_run(
        &mut self,
        file: &File,
        start: u64,
        count: u64,
        value: u64,
    ) -> io::Result<Vec<TableMove>> {
        let per_block = self.per_block();
        let bits = self.bits();
        let end = start + count;
        let mut moves = Vec::new();
        let mut cluster = start;
        while cluster < end {
            let table_index = cluster / per_block;
            let block_offset = self.table.get(table_index as usize).copied().unwrap_or(0);
            if block_offset == 0 || value > self.max_refcount() {
                moves.extend(self.set(file, cluster, value)?);
                cluster += 1;
                continue;
            }
            let run_end = ((table_index + 1) * per_block).min(end);
            let block = self.block(file, block_offset)?;
            let first = encode(bits, block, cluster % per_block, value);
            let mut changed = first;
            for c in cluster + 1..run_end {
                changed.end = encode(bits, block, c % per_block, value).end;
            }
            file.write_all_at(&block[changed.clone()], block_offset + changed.start as u64)?;
            if value > 0 {
                self.end = self.end.max(run_end);
            } else if cluster < self.free_hint {
                self.free_hint = cluster;
            }
            cluster = run_end;
        }
        Ok(moves)
    }

    /// Adds `delta` to the refcount of `cluster`.
    pub fn adjust(
        &mut self,
        file: &File,
        cluster: u64,
        delta: i64,
    ) -> io::Result<Option<TableMove>> {
        let current = self.get(file, cluster)?;
        let value = current.checked_add_signed(delta).ok_or_else(|| {
            corrupt(format!(
                "refcount of cluster {cluster} would go below zero or overflow"
            ))
        })?;
        self.set(file, cluster, value)
    }

    /// Creates the refcount block for table entry `table_index` in the first cluster it
    /// covers (free, since nothing could count it without a block), then points the table at it.
    fn create_block(&mut self, file: &File, table_index: usize) -> io::Result<()> {
        let per_block = self.per_block();
        let first = table_index as u64 * per_block;
        if first == 0 {
            // The first block counts the header: an image without it is broken.
            return Err(corrupt(
                "the image has no refcount block for its header".into(),
            ));
        }
        let offset = first << self.cluster_bits;
        self.metadata
            .check_write(first..first + 1, "a new refcount block")?;
        let mut block = vec![0u8; self.cluster_size() as usize];
        encode(self.bits(), &mut block, 0, 1);
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        file.write_all_at(
            &offset.to_be_bytes(),
            self.table_offset + table_index as u64 * 8,
        )?;
        self.table[table_index] = offset;
        self.blocks.insert(offset, block);
        self.metadata.add_refcount_block(offset)?;
        self.end = self.end.max(first + 1);
        Ok(())
    }

    /// Asks the kernel to start reading the refcount blocks that count `clusters`, all at
    /// once: looked up one by one afterwards, they are then read from memory rather than
    /// with one wait on the disk each (seconds on a cold cache for a large image).
    pub fn prefetch(&self, file: &File, clusters: impl Iterator<Item = u64>) {
        let per_block = self.per_block();
        let blocks: std::collections::BTreeSet<u64> = clusters
            .filter_map(|c| self.table.get((c / per_block) as usize).copied())
            .filter(|&block| block != 0 && !self.blocks.contains_key(&block))
            .collect();
        for block in blocks {
            // Advice only: a refusal just leaves the reads for later.
            let _ = host_sys::file::will_need(file, block, self.cluster_size());
        }
    }

    /// Whether `cluster` is free (refcount 0).
    fn is_free(&mut self, file: &File, cluster: u64) -> io::Result<bool> {
        Ok(self.get(file, cluster)? == 0)
    }

    /// The first run of `count` free clusters at or after `from`.
    fn find_free_run(&mut self, file: &File, from: u64, count: u64) -> io::Result<u64> {
        let (mut start, mut run) = (from, 0);
        while run < count {
            if self.is_free(file, start + run)? {
                run += 1;
            } else {
                start += run + 1;
                run = 0;
            }
        }
        Ok(start)
    }

    /// The refcount blocks clusters `start..end` lack, placed at `end`, `end + 1`, ... (their
    /// own clusters may need blocks too, placed after them): (table index, cluster) each, and
    /// the end of the last one. Placing them at the start of the ranges they count instead
    /// would cut every free run at each range, and a run longer than a range would never fit.
    fn plan_blocks(&self, start: u64, end: u64) -> (Vec<(usize, u64)>, u64) {
        let per_block = self.per_block();
        let mut planned: Vec<(usize, u64)> = Vec::new();
        let mut next = end;
        let mut counted = start;
        while counted < next {
            let index = (counted / per_block) as usize;
            let has_block = self.table.get(index).is_some_and(|&b| b != 0)
                || planned.iter().any(|&(i, _)| i == index);
            if !has_block {
                planned.push((index, next));
                next += 1;
            }
            counted = (index as u64 + 1) * per_block;
        }
        (planned, next)
    }

    /// Writes the `planned` blocks (counting themselves), then points the table at them.
    fn write_blocks(&mut self, file: &File, planned: &[(usize, u64)]) -> io::Result<()> {
        let per_block = self.per_block();
        let bits = self.bits();
        let mut fresh: HashMap<usize, Vec<u8>> = planned
            .iter()
            .map(|&(index, _)| (index, vec![0u8; self.cluster_size() as usize]))
            .collect();
        for &(_, cluster) in planned {
            let index = (cluster / per_block) as usize;
            match fresh.get_mut(&index) {
                Some(block) => {
                    encode(bits, block, cluster % per_block, 1);
                }
                None => {
                    self.set(file, cluster, 1)?;
                }
            }
        }
        for &(index, cluster) in planned {
            let offset = cluster << self.cluster_bits;
            let block = fresh.remove(&index).unwrap_or_default();
            file.write_all_at(&block, offset)?;
            self.blocks.insert(offset, block);
        }
        file.sync_data()?;
        for &(index, cluster) in planned {
            let offset = cluster << self.cluster_bits;
            file.write_all_at(&offset.to_be_bytes(), self.table_offset + index as u64 * 8)?;
            self.table[index] = offset;
            self.metadata.add_refcount_block(offset)?;
            self.end = self.end.max(cluster + 1);
        }
        Ok(())
    }

    /// Allocates `count` contiguous clusters (refcount 1 each) for `purpose`; returns the
    /// first's offset and where the table moved, if it did. Free clusters that hold known
    /// metadata (the refcounts lie) are refused, not handed out.
    pub fn allocate(
        &mut self,
        file: &File,
        count: u64,
        purpose: &'static str,
    ) -> io::Result<(u64, Vec<TableMove>)> {
        if count == 0 {
            return Err(io::Error::other("allocation of no clusters"));
        }
        let per_block = self.per_block();
        let mut moves = Vec::new();
        let mut from = self.free_hint;
        loop {
            let start = self.find_free_run(file, from, count)?;
            let (planned, end) = self.plan_blocks(start, start + count);
            let entries = (end - 1) / per_block + 1;
            if entries > self.table.len() as u64 {
                // The new table may land in the run: look again.
                moves.push(self.grow_table(file, entries as usize)?);
                continue;
            }
            let mut taken = None;
            for cluster in start + count..end {
                if !self.is_free(file, cluster)? {
                    taken = Some(cluster);
                    break;
                }
            }
            if let Some(cluster) = taken {
                from = cluster + 1;
                continue;
            }
            self.metadata.check_write(start..end, purpose)?;
            self.write_blocks(file, &planned)?;
            moves.extend(self.set_run(file, start, count, 1)?);
            self.free_hint = self.free_hint.max(end);
            return Ok((start << self.cluster_bits, moves));
        }
    }

    /// Replaces the table with one of at least `entries` entries at the end of the file, with
    /// the refcount blocks that count it; points the header at it (after a flush), then frees
    /// the old table. Returns the new location for the caller's copy of the header.
    fn grow_table(&mut self, file: &File, entries: usize) -> io::Result<TableMove> {
        let cluster_size = self.cluster_size();
        let per_cluster = (cluster_size / 8) as usize;
        let per_block = self.per_block();
        let new_len = entries
            .max(self.table.len() * 2)
            .next_multiple_of(per_cluster);
        if (new_len * 8) as u64 > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(
                "the refcount table would exceed its maximum size".into(),
            ));
        }
        let table_clusters = (new_len / per_cluster) as u64;
        let table_start = file.metadata()?.len().div_ceil(cluster_size).max(self.end);
        let mut table = self.table.clone();
        table.resize(new_len, 0);
        // Blocks for every new cluster go right after the table; they may need blocks too.
        let mut next = table_start + table_clusters;
        let mut new_blocks = Vec::new();
        let mut counted = table_start;
        while counted < next {
            let index = (counted / per_block) as usize;
            if index >= table.len() {
                return Err(corrupt("the refcount table cannot cover itself".into()));
            }
            if table[index] == 0 {
                table[index] = next << self.cluster_bits;
                new_blocks.push(table[index]);
                next += 1;
            }
            counted += 1;
        }
        self.metadata
            .check_write(table_start..next, "a new refcount table")?;
        let old_table = (
            self.table_offset >> self.cluster_bits,
            (self.table.len() / per_cluster) as u64,
        );
        self.table = table;
        self.table_offset = table_start << self.cluster_bits;
        // Count the new clusters: in the new blocks (written whole below) or, where an
        // existing block covers them, written through now.
        let bits = self.bits();
        let mut fresh: HashMap<u64, Vec<u8>> = new_blocks
            .iter()
            .map(|&offset| (offset, vec![0u8; cluster_size as usize]))
            .collect();
        for cluster in table_start..next {
            let block_offset = self.table[(cluster / per_block) as usize];
            let index = cluster % per_block;
            if let Some(block) = fresh.get_mut(&block_offset) {
                encode(bits, block, index, 1);
            } else {
                let block = self.block(file, block_offset)?;
                let range = encode(bits, block, index, 1);
                file.write_all_at(&block[range.clone()], block_offset + range.start as u64)?;
            }
        }
        // Blocks, then the table, then (after a flush) the header's pointer to it.
        for (offset, block) in &fresh {
            file.write_all_at(block, *offset)?;
        }
        self.blocks.extend(fresh);
        let mut raw = Vec::with_capacity(new_len * 8);
        for entry in &self.table {
            raw.extend_from_slice(&entry.to_be_bytes());
        }
        file.write_all_at(&raw, self.table_offset)?;
        file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&self.table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_all_at(&fields, super::header::REFCOUNT_TABLE_FIELDS)?;
        file.sync_data()?;
        self.metadata
            .remove_extent(old_table.0 << self.cluster_bits);
        self.metadata.add_extent(
            self.table_offset,
            table_clusters * cluster_size,
            Structure::RefcountTable,
        )?;
        for &offset in &new_blocks {
            self.metadata.add_refcount_block(offset)?;
        }
        for cluster in old_table.0..old_table.0 + old_table.1 {
            self.set(file, cluster, 0)?;
        }
        self.end = self.end.max(next);
        Ok(TableMove {
            offset: self.table_offset,
            clusters: table_clusters as u32,
        })
    }
}

#[cfg(test)]
mod tests;
