//! Internal snapshots: reading and replacing an image's snapshot table (its entries' format is
//! `snapshot_table`), and creating, applying and deleting snapshots of an image nobody else
//! uses (the caller holds the exclusive lock).
//!
//! A snapshot is a copy of the L1 table. Every L1 table (the active one and each snapshot's)
//! that reaches a cluster counts once in its refcount, as QEMU counts them; a cluster shared
//! that way loses its COPIED flag, so the next write to it copies it.
//!
//! Order of updates, for crash safety: references are added (refcounts raised) and made
//! durable before the table that uses them is published; references are dropped only after
//! the table that used them is gone. A crash leaks clusters at worst.

use std::io;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::header::{self, MAX_SNAPSHOTS};
use super::metadata::Structure;
use super::snapshot_table::{be64, parse_table, table_bytes, Snapshot, MAX_TABLE_BYTES};
use super::{corrupt, Mapping, Qcow2Image, COPIED, OFFSET_MASK};

fn not_found(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no snapshot named {name:?}"),
    )
}

impl Qcow2Image {
    /// The image's internal snapshots.
    pub fn snapshots(&self) -> io::Result<Vec<Snapshot>> {
        Ok(self.read_snapshot_table()?.0)
    }

    /// The snapshots and the bytes their table uses (as stored, which is not always what
    /// Ferro would write for them: older QEMUs wrote less extra data per entry).
    pub(super) fn read_snapshot_table(&self) -> io::Result<(Vec<Snapshot>, u64)> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok((Vec::new(), 0));
        }
        if count > MAX_SNAPSHOTS {
            return Err(corrupt(format!("{count} snapshots")));
        }
        let file_len = self.file.metadata()?.len();
        let len = file_len
            .saturating_sub(self.header.snapshots_offset)
            .min(MAX_TABLE_BYTES) as usize;
        let mut raw = vec![0u8; len];
        self.file
            .read_exact_at(&mut raw, self.header.snapshots_offset)
            .map_err(|e| corrupt(format!("cannot read the snapshot table: {e}")))?;
        parse_table(&raw, count, self.cluster_size())
    }

    fn find_snapshot(&self, name: &str) -> io::Result<(usize, Vec<Snapshot>)> {
        let all = self.snapshots()?;
        let index = all
            .iter()
            .position(|s| s.name == name)
            .or_else(|| all.iter().position(|s| s.id == name))
            .ok_or_else(|| not_found(name))?;
        Ok((index, all))
    }

    /// Takes a snapshot named `name` of the current contents.
    pub fn create_snapshot(&mut self, name: &str) -> io::Result<Snapshot> {
        self.check_writable()?;
        self.flush_metadata()?;
        let mut all = self.snapshots()?;
        if name.is_empty() || all.iter().any(|s| s.name == name || s.id == name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("a snapshot named {name:?} exists already (or the name is empty)"),
            ));
        }
        if all.len() as u32 >= MAX_SNAPSHOTS {
            return Err(io::Error::other("the image has too many snapshots"));
        }
        let mut snapshot = self.new_entry(name, &all);
        all.push(snapshot.clone());
        // Refused before anything changes: once references are added, only the new table
        // would account for them.
        table_bytes(&all, self.header.version)?;
        all.pop();
        // The snapshot's L1 table: a copy of the active one.
        let l1_bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(self.cluster_size());
        let l1_offset = match l1_clusters {
            0 => 0, // an empty disk: nothing to copy, nothing to count
            n => self.allocate(n, "a snapshot's L1 table")?,
        };
        self.file.write_all_at(&l1_bytes, l1_offset)?;
        let active = self.l1.clone();
        self.adjust_tree(&active, 1)?;
        self.fix_copied_flags()?;
        snapshot.l1_table_offset = l1_offset;
        all.push(snapshot.clone());
        self.write_snapshot_table(&all)?;
        Ok(snapshot)
    }

    /// The entry for a new snapshot named `name` of the current disk, numbered after
    /// `existing`; its L1 table is still to be placed.
    fn new_entry(&self, name: &str, existing: &[Snapshot]) -> Snapshot {
        let id = existing
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Snapshot {
            id: id.to_string(),
            name: name.to_string(),
            l1_table_offset: 0,
            l1_size: self.l1.len() as u32,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            extra_rest: Vec::new(),
            icount: None,
        }
    }

    /// Reverts the disk to snapshot `name` (a name or an id); the snapshot stays.
    pub fn apply_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        self.flush_metadata()?;
        let (index, all) = self.find_snapshot(name)?;
        let snapshot = &all[index];
        let target = self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)?;
        // Its L2 tables become active ones: they must be sound, as at open.
        self.check_l2_tables(&target)?;
        if let Some(size) = snapshot.disk_size {
            let needed = header::Header::l1_entries_for(size, self.header.cluster_bits);
            if u64::from(snapshot.l1_size) < needed {
                return Err(corrupt(format!(
                    "snapshot {name:?} has too small an L1 table"
                )));
            }
        }
        self.grow_l1(target.len() as u64)?;
        self.adjust_tree(&target, 1)?;
        self.file.sync_data()?;
        let old = self.l1.clone();
        let mut new = target;
        new.resize(old.len(), 0);
        let raw: Vec<u8> = new.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&raw, self.header.l1_table_offset)?;
        self.refcounts
            .metadata_mut()
            .replace_l2_tables(l2_offsets(&new))?;
        self.l1 = new;
        if let Some(size) = snapshot.disk_size.filter(|&s| s != self.header.size) {
            self.file
                .write_all_at(&size.to_be_bytes(), header::SIZE_FIELD)?;
            self.header.size = size;
        }
        self.file.sync_data()?;
        self.adjust_tree(&old, -1)?;
        self.fix_copied_flags()?;
        self.file.sync_data()
    }

    /// Deletes snapshot `name` (a name or an id), freeing what only it used.
    pub fn delete_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        self.flush_metadata()?;
        let (index, mut all) = self.find_snapshot(name)?;
        let snapshot = all.remove(index);
        let l1 = self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)?;
        self.write_snapshot_table(&all)?;
        self.adjust_tree(&l1, -1)?;
        let l1_clusters = (u64::from(snapshot.l1_size) * 8).div_ceil(self.cluster_size());
        for i in 0..l1_clusters {
            let host = snapshot.l1_table_offset + i * self.cluster_size();
            self.release(Mapping::Data { host, owned: false })?;
        }
        self.fix_copied_flags()?;
        self.file.sync_data()
    }

    /// Reads an L1 table of `entries` entries at `offset`.
    fn read_l1(&self, offset: u64, entries: u32) -> io::Result<Vec<u64>> {
        if u64::from(entries) * 8 > header::MAX_L1_BYTES
            || !offset.is_multiple_of(self.cluster_size())
        {
            return Err(corrupt(format!("invalid L1 table at {offset:#x}")));
        }
        let len = u64::from(entries) * 8;
        if offset.saturating_add(len) > self.file.metadata()?.len() {
            return Err(corrupt(format!(
                "the L1 table at {offset:#x} is past the end of the file"
            )));
        }
        let mut raw = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut raw, offset)
            .map_err(|e| corrupt(format!("cannot read the L1 table at {offset:#x}: {e}")))?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Adds `delta` (+1 or -1) to the refcount of every cluster reachable from `l1`: its L2
    /// tables and their data clusters.
    fn adjust_tree(&mut self, l1: &[u64], delta: i64) -> io::Result<()> {
        for &l1_entry in l1 {
            let table = l1_entry & OFFSET_MASK;
            if table == 0 {
                continue;
            }
            if !table.is_multiple_of(self.cluster_size()) {
                return Err(corrupt(format!("L2 table at unaligned offset {table:#x}")));
            }
            let entries = self.l2.table(&self.file, table)?.to_vec();
            for entry in entries {
                let mapping = self.decode(entry)?;
                self.adjust_mapping(mapping, delta)?;
            }
            self.adjust_mapping(
                Mapping::Data {
                    host: table,
                    owned: false,
                },
                delta,
            )?;
        }
        // Freed tables may be reused for anything: forget what the cache holds.
        self.l2.clear();
        Ok(())
    }

    /// Sets COPIED on active L1 and L2 entries exactly where the cluster's refcount is 1.
    fn fix_copied_flags(&mut self) -> io::Result<()> {
        for index in 0..self.l1.len() {
            let l1_entry = self.l1[index];
            let table = l1_entry & OFFSET_MASK;
            if table == 0 {
                continue;
            }
            let entries = self.l2.table(&self.file, table)?.to_vec();
            let mut fixed = Vec::with_capacity(entries.len());
            for &entry in &entries {
                fixed.push(self.with_copied_flag(entry)?);
            }
            if fixed != entries {
                self.l2.store(&self.file, table, fixed)?;
            }
            let owned = self.with_copied_flag(table | COPIED)? & COPIED != 0;
            let l1_fixed = if owned {
                l1_entry | COPIED
            } else {
                l1_entry & !COPIED
            };
            if l1_fixed != l1_entry {
                self.write_l1_entry(index, l1_fixed)?;
            }
        }
        Ok(())
    }

    /// Writes `snapshots` as a new table, points the header at it once it is durable, then
    /// frees the old table.
    fn write_snapshot_table(&mut self, snapshots: &[Snapshot]) -> io::Result<()> {
        let raw = table_bytes(snapshots, self.header.version)?;
        let cluster_size = self.cluster_size();
        let old = (self.header.snapshots_offset, self.read_snapshot_table()?.1);
        let new_offset = if raw.is_empty() {
            0
        } else {
            let clusters = (raw.len() as u64).div_ceil(cluster_size);
            let offset = self.allocate(clusters, "a snapshot table")?;
            self.file.write_all_at(&raw, offset)?;
            offset
        };
        self.file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(snapshots.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&new_offset.to_be_bytes());
        self.file.write_all_at(&fields, header::SNAPSHOT_FIELDS)?;
        self.file.sync_data()?;
        self.header.nb_snapshots = snapshots.len() as u32;
        self.header.snapshots_offset = new_offset;
        self.record_snapshots(snapshots, raw.len() as u64)?;
        if old.0 != 0 {
            for i in 0..old.1.div_ceil(cluster_size) {
                self.release(Mapping::Data {
                    host: old.0 + i * cluster_size,
                    owned: false,
                })?;
            }
        }
        Ok(())
    }

    /// Records where the snapshot table and the snapshots' L1 tables are (replacing what was
    /// recorded), so nothing is allocated over them.
    pub(super) fn record_snapshots(
        &mut self,
        snapshots: &[Snapshot],
        table_len: u64,
    ) -> io::Result<()> {
        let map = self.refcounts.metadata_mut();
        map.remove_kind(|what| {
            matches!(
                what,
                Structure::SnapshotTable | Structure::SnapshotL1 { .. }
            )
        });
        if !snapshots.is_empty() {
            map.add_extent(
                self.header.snapshots_offset,
                table_len,
                Structure::SnapshotTable,
            )?;
        }
        for (index, snapshot) in snapshots.iter().enumerate() {
            map.add_extent(
                snapshot.l1_table_offset,
                u64::from(snapshot.l1_size) * 8,
                Structure::SnapshotL1 { index },
            )?;
        }
        Ok(())
    }
}

/// The L2 table offsets an L1 table names.
pub(super) fn l2_offsets(l1: &[u64]) -> impl Iterator<Item = u64> + '_ {
    l1.iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&offset| offset != 0)
}

#[cfg(test)]
mod tests;
