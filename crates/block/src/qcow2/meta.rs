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

#[cfg(test)]
mod tests {
    use super::super::testing::{
        check_clean, host_of, l2_entry_on_disk, new_image, read, read_bytes, read_u64, refcount,
        reopen, write,
    };
    use super::*;
    use crate::qcow2::metadata::Structure;
    use crate::DiskImage;

    #[test]
    fn a_new_cluster_is_published_only_when_metadata_is_flushed() {
        let (file, mut image) = new_image(12, 1 << 20);
        write(&mut image, 0, &[5u8; 4096]).unwrap();
        let host = host_of(&mut image, 0);
        // Data and refcount are there; nothing on disk points at them yet.
        assert_eq!(read_bytes(&file, host, 4096), vec![5u8; 4096]);
        assert_eq!(refcount(&mut image, host), 1);
        assert_eq!(read_u64(&file, image.header.l1_table_offset), 0);
        assert!(image.flush_metadata().unwrap());
        let l1_entry = read_u64(&file, image.header.l1_table_offset);
        assert_ne!(l1_entry & COPIED, 0);
        assert_eq!(l2_entry_on_disk(&file, &image, 0), host | COPIED);
        assert!(!image.flush_metadata().unwrap(), "nothing left to write");
        drop(image);
        check_clean(&file);
    }

    #[test]
    fn a_released_cluster_keeps_its_refcount_until_no_table_on_disk_names_it() {
        let (file, mut image) = new_image(12, 1 << 20);
        write(&mut image, 0, &[5u8; 4096]).unwrap();
        image.flush().unwrap();
        let host = host_of(&mut image, 0);
        image.discard(0, 4096).unwrap();
        assert_eq!(image.mapping(0).unwrap(), Mapping::Unallocated);
        assert_eq!(l2_entry_on_disk(&file, &image, 0), host | COPIED);
        assert_eq!(refcount(&mut image, host), 1, "the disk still uses it");
        image.flush().unwrap();
        assert_eq!(l2_entry_on_disk(&file, &image, 0), 0);
        assert_eq!(refcount(&mut image, host), 0);
        drop(image);
        check_clean(&file);
    }

    #[test]
    fn half_a_cache_of_dirty_tables_forces_a_flush() {
        // 2 MiB clusters: the cache holds 4 tables, each maps 512 GiB.
        let table_span = 1u64 << 39;
        let (file, mut image) = new_image(21, 3 * table_span);
        assert_eq!(image.l2.capacity(), 4);
        let l1 = image.header.l1_table_offset;
        write(&mut image, 0, &[1u8; 512]).unwrap();
        assert_eq!(image.l2.dirty_count(), 1);
        assert_eq!(read_u64(&file, l1), 0, "one dirty table waits");
        write(&mut image, table_span, &[2u8; 512]).unwrap();
        assert_eq!(image.l2.dirty_count(), 0);
        assert_ne!(read_u64(&file, l1), 0);
        assert_ne!(read_u64(&file, l1 + 8), 0);
        assert_eq!(read(&mut image, table_span, 512), vec![2u8; 512]);
    }

    #[test]
    fn thousands_of_pending_releases_force_a_flush() {
        // 512-byte clusters: 4096 of them are 2 MiB.
        let (file, mut image) = new_image(9, 4 << 20);
        write(&mut image, 0, &vec![3u8; 4096 * 512]).unwrap();
        image.flush().unwrap();
        let first = host_of(&mut image, 0);
        image.discard(0, 4095 * 512).unwrap();
        assert_eq!(image.pending_release.len(), 4095);
        assert_eq!(refcount(&mut image, first), 1);
        image.discard(4095 * 512, 512).unwrap();
        assert!(image.pending_release.is_empty());
        assert_eq!(refcount(&mut image, first), 0);
        assert_eq!(l2_entry_on_disk(&file, &image, 0), 0);
        drop(image);
        check_clean(&file);
    }

    #[test]
    fn writing_through_a_table_shared_with_a_snapshot_copies_the_table() {
        let (file, mut image) = new_image(12, 1 << 20);
        write(&mut image, 0, &[1u8; 8192]).unwrap();
        image.create_snapshot("s").unwrap();
        let old_table = image.l1[0] & OFFSET_MASK;
        let (host0, host1) = (host_of(&mut image, 0), host_of(&mut image, 4096));
        assert_eq!(refcount(&mut image, old_table), 2);
        write(&mut image, 4096, &[2u8; 4096]).unwrap();
        let new_table = image.l1[0] & OFFSET_MASK;
        assert_ne!(new_table, old_table);
        assert_ne!(image.l1[0] & COPIED, 0);
        // The untouched cluster stays shared, the rewritten one is the active table's own.
        assert_eq!(
            image.mapping(0).unwrap(),
            Mapping::Data {
                host: host0,
                owned: false
            }
        );
        assert!(matches!(
            image.mapping(4096).unwrap(),
            Mapping::Data { host, owned: true } if host != host1
        ));
        let map = image.refcounts.metadata();
        assert_eq!(map.find(map.clusters(old_table, 1)), None);
        assert_eq!(
            map.find(map.clusters(new_table, 1)).map(|(what, _)| what),
            Some(Structure::L2Table)
        );
        assert_eq!(
            refcount(&mut image, old_table),
            2,
            "released after the flush"
        );
        image.flush().unwrap();
        assert_eq!(refcount(&mut image, old_table), 1, "the snapshot's now");
        assert_eq!(read_u64(&file, old_table + 8) & OFFSET_MASK, host1);
        assert_eq!(read(&mut image, 0, 8192)[4096..], [2u8; 4096]);
        drop(image);
        check_clean(&file);
    }

    #[test]
    fn l2_tables_get_their_own_clusters_and_are_recorded_as_metadata() {
        let (file, mut image) = new_image(12, 4 << 20);
        // 4 KiB clusters: an L2 table maps 2 MiB.
        write(&mut image, 0, &[1u8; 4096]).unwrap();
        write(&mut image, 2 << 20, &[2u8; 4096]).unwrap();
        image.flush().unwrap();
        let tables: Vec<u64> = image.l1.iter().map(|e| e & OFFSET_MASK).collect();
        assert_eq!(tables.len(), 2);
        assert_ne!(tables[0], tables[1]);
        for table in &tables {
            assert_eq!(refcount(&mut image, *table), 1);
            let map = image.refcounts.metadata();
            assert_eq!(
                map.find(map.clusters(*table, 1)).map(|(what, _)| what),
                Some(Structure::L2Table)
            );
        }
        assert_eq!(read(&mut image, 2 << 20, 4096), vec![2u8; 4096]);
        drop(image);
        check_clean(&file);
    }

    #[test]
    fn closing_an_image_writes_its_tables() {
        let (file, mut image) = new_image(12, 1 << 20);
        write(&mut image, 8192, &[4u8; 100]).unwrap();
        assert_eq!(read_u64(&file, image.header.l1_table_offset), 0);
        drop(image);
        let mut image = reopen(&file);
        assert_eq!(read(&mut image, 8192, 100), vec![4u8; 100]);
        drop(image);
        check_clean(&file);
    }
}
