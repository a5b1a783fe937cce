//! Table updates caused by guest writes, and the order in which they reach the disk.
//!
//! A write that needs a new cluster writes the data and raises the refcount at once, but the
//! L2 entry (and L1 entry, for a new L2 table) that points at it changes in memory only.
//! [`Qcow2Image::flush_metadata`] then makes data and refcounts durable, writes the changed
//! tables, makes them durable, and only then drops the references the old entries held. So the
//! disk never holds a table entry whose cluster is not counted, nor a freed cluster that a
//! durable table still uses; a crash loses what was not flushed and may leak clusters. This is
//! what lets allocating writes go without a sync each (the guest's flush pays for them).
//!
//! Threading: as the image, one thread at a time.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::FileExt;

use super::{corrupt, Mapping, PendingEntry, Qcow2Image, COPIED, OFFSET_MASK};

/// Releases gathered before a metadata flush is forced (bounds memory and leak size).
const MAX_PENDING_RELEASES: usize = 4096;

impl Qcow2Image {
    /// Makes the L2 table for `l1_index` exist and be owned by the active L1 (allocating, or
    /// copying one shared with a snapshot); the L1 entry changes in memory.
    fn own_l2_table(&mut self, l1_index: usize) -> io::Result<()> {
        let entry = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| corrupt(format!("L1 index {l1_index} beyond the table")))?;
        let old = entry & OFFSET_MASK;
        if old != 0 && entry & COPIED != 0 {
            return Ok(());
        }
        let new = self.allocate(1, "an L2 table")?;
        let mut entries = vec![0u64; self.header.l2_entries() as usize];
        if old != 0 {
            // Shared with a snapshot: copy it. Its clusters keep their refcounts (each L1 table
            // reaching a cluster counts once, and there are as many as before); an entry is
            // exclusively owned again only where its refcount is 1.
            entries = self.l2.table(&self.file, old)?.to_vec();
            for e in entries.iter_mut() {
                *e = self.with_copied_flag(*e)?;
            }
            self.pending_release.push(Mapping::Data {
                host: old,
                owned: false,
            });
        }
        // Nothing points at the new table yet: writing it now is safe.
        self.l2.store(&self.file, new, entries)?;
        let map = self.refcounts.metadata_mut();
        if old != 0 {
            map.remove_l2_table(old); // the snapshot's from now on
        }
        map.add_l2_table(new)?;
        self.l1[l1_index] = new | COPIED;
        self.l1_dirty.insert(l1_index);
        Ok(())
    }

    /// Writes an L1 entry through (for operations that order their own writes).
    pub(super) fn write_l1_entry(&mut self, index: usize, entry: u64) -> io::Result<()> {
        self.file.write_all_at(
            &entry.to_be_bytes(),
            self.header.l1_table_offset + index as u64 * 8,
        )?;
        self.l1[index] = entry;
        self.l1_dirty.remove(&index);
        Ok(())
    }

    /// Points guest clusters at their new clusters (in memory; see the module docs).
    pub(super) fn commit(&mut self, pending: Vec<PendingEntry>) -> io::Result<()> {
        let mut tables = BTreeSet::new();
        for p in &pending {
            tables.insert(self.indices(p.guest).0);
        }
        for l1_index in tables {
            self.own_l2_table(l1_index)?;
        }
        for p in pending {
            let (l1_index, l2_index) = self.indices(p.guest);
            let table = self.l2_table_offset(l1_index)?;
            self.l2.set_deferred(&self.file, table, l2_index, p.entry)?;
            if matches!(
                p.old,
                Mapping::Data { .. } | Mapping::Compressed { .. } | Mapping::Zero { host: Some(_) }
            ) {
                self.pending_release.push(p.old);
            }
        }
        let cache_half_dirty = self.l2.dirty_count() * 2 >= self.l2.capacity();
        if cache_half_dirty || self.pending_release.len() >= MAX_PENDING_RELEASES {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Writes the tables changed in memory, in crash-safe order (see the module docs), then
    /// drops the references they released. Returns whether there was anything to write (if
    /// so, everything written before is durable too, unless barriers are skipped).
    pub(super) fn flush_metadata(&mut self) -> io::Result<bool> {
        if self.l2.dirty_count() == 0 && self.l1_dirty.is_empty() && self.pending_release.is_empty()
        {
            return Ok(false);
        }
        self.barrier()?;
        self.l2.write_dirty(&self.file)?;
        for index in std::mem::take(&mut self.l1_dirty) {
            let entry = self.l1[index];
            self.file.write_all_at(
                &entry.to_be_bytes(),
                self.header.l1_table_offset + index as u64 * 8,
            )?;
        }
        self.barrier()?;
        for mapping in std::mem::take(&mut self.pending_release) {
            self.release(mapping)?;
        }
        Ok(true)
    }
}

impl Qcow2Image {
    /// Waits until everything written before is on storage, unless this image's maker syncs
    /// it later (see [`crate::DiskImage::skip_barriers`]).
    pub(super) fn barrier(&self) -> io::Result<()> {
        match self.ordered {
            true => self.file.sync_data(),
            false => Ok(()),
        }
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.writable && !self.broken {
            if let Err(e) = self.flush_metadata() {
                tracing::error!("qcow2: cannot write the image's tables on close: {e}");
            }
        }
    }
}
