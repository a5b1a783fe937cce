//! `ferro img check --repair`: what `qemu-img check -r all` fixes, from the references a
//! [`Scan`] counted. The refcounts are rebuilt whole (a new refcount table and blocks at the
//! end of the file, the header switched to them once they are durable, so a crash leaves the
//! old ones), then the active tables' COPIED flags are set from the new counts, then the
//! dirty and corrupt bits are cleared if nothing is left to fix.
//!
//! Structural damage (overlapping tables, unaligned offsets, references past the end of the
//! file) is reported, not repaired; a scan that could not read a table holding references
//! (an L1 or snapshot table) refuses to rebuild, since the rebuilt counts would free what
//! that table uses.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{self, incompatible};
use super::refblock::{encode, entries_per_block};
use super::scan::{be64s, entry_kind, read_padded, EntryKind, Scan};
use super::{COPIED, OFFSET_MASK};

fn refuse(message: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("cannot repair: {message}"),
    )
}

/// Repairs what `scan` found; returns what was done (nothing if there was nothing to do).
pub(super) fn repair(file: &File, scan: &Scan) -> io::Result<Vec<String>> {
    let mut done = Vec::new();
    if !scan.refcounts_wrong && !scan.copied_wrong {
        return Ok(done);
    }
    if scan.incomplete {
        return Err(refuse(
            "a table that holds references (an L1 table or the snapshot table) cannot be read, so rebuilt refcounts would free clusters still in use".into(),
        ));
    }
    if scan.refcounts_wrong {
        let (offset, clusters) = rebuild_refcounts(file, scan)?;
        done.push(format!(
            "rebuilt the refcounts from the tables: new refcount table at offset {offset:#x} ({clusters} clusters)"
        ));
    }
    let fixed = fix_copied_flags(file, scan)?;
    if fixed > 0 {
        done.push(format!("corrected {fixed} COPIED flags"));
    }
    file.sync_data()?;
    Ok(done)
}

/// Writes a new refcount structure holding `scan`'s reference counts past the end of the file
/// and points the header at it. Returns its offset and size in clusters.
fn rebuild_refcounts(file: &File, scan: &Scan) -> io::Result<(u64, u64)> {
    let h = &scan.header;
    let cluster_size = h.cluster_size();
    let per_block = entries_per_block(h.cluster_bits, h.refcount_order);
    let bits = 1u64 << h.refcount_order;
    let max = match h.refcount_order {
        6 => u64::MAX,
        _ => (1 << bits) - 1,
    };
    // The table and blocks go after everything, and count themselves too.
    let start = scan.file_clusters;
    let mut blocks = start.div_ceil(per_block).max(1);
    let table_clusters = loop {
        let table_clusters = (blocks * 8).div_ceil(cluster_size);
        let needed = (start + table_clusters + blocks).div_ceil(per_block);
        if needed <= blocks {
            break table_clusters;
        }
        blocks = needed;
    };
    if table_clusters * cluster_size > header::MAX_REFCOUNT_TABLE_BYTES.max(cluster_size) {
        return Err(refuse(
            "the image needs a larger refcount table than qcow2 allows".into(),
        ));
    }
    let new_structures = start..start + table_clusters + blocks;
    let blocks_start = start + table_clusters;
    // References from the old refcount structure go away with it.
    let mut old = scan.refcount_clusters.iter().peekable();
    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    for block_index in 0..blocks {
        let mut block = vec![0u8; cluster_size as usize];
        for index in 0..per_block {
            let cluster = block_index * per_block + index;
            let mut value = scan.refs.get(cluster);
            while old.next_if(|&&c| c == cluster).is_some() {
                value = value.saturating_sub(1);
            }
            if new_structures.contains(&cluster) {
                value = 1;
            }
            if value > max {
                return Err(refuse(format!(
                    "cluster {cluster} has {value} references, more than {bits}-bit refcounts hold (`qemu-img amend -o refcount_bits=...` widens them)"
                )));
            }
            if value != 0 {
                encode(bits, &mut block, index, value);
            }
        }
        let offset = (blocks_start + block_index) << h.cluster_bits;
        file.write_all_at(&block, offset)?;
        let at = block_index as usize * 8;
        table[at..at + 8].copy_from_slice(&offset.to_be_bytes());
    }
    let table_offset = start << h.cluster_bits;
    file.write_all_at(&table, table_offset)?;
    file.sync_data()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_offset.to_be_bytes());
    fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    file.write_all_at(&fields, header::REFCOUNT_TABLE_FIELDS)?;
    file.sync_data()?;
    Ok((table_offset, table_clusters))
}

/// Sets COPIED on the active L1 and L2 entries exactly where the cluster's reference count is
/// 1 (and never on compressed clusters). Returns how many entries changed.
fn fix_copied_flags(file: &File, scan: &Scan) -> io::Result<u64> {
    let h = &scan.header;
    let owned =
        |cluster_offset: u64, entry: u64| match scan.refs.get(cluster_offset >> h.cluster_bits) {
            1 => entry | COPIED,
            _ => entry & !COPIED,
        };
    let mut fixed = 0;
    for walk in &scan.active_l2 {
        let table = walk.entry & OFFSET_MASK;
        let l1_entry = owned(table, walk.entry);
        if l1_entry != walk.entry {
            let at = h.l1_table_offset + walk.index as u64 * 8;
            file.write_all_at(&l1_entry.to_be_bytes(), at)?;
            fixed += 1;
        }
        let entries = be64s(&read_padded(file, table, h.cluster_size())?);
        let mut changed = false;
        let mut raw = Vec::with_capacity(entries.len() * 8);
        for entry in entries {
            let right = match entry_kind(h, entry) {
                EntryKind::Compressed { .. } => entry & !COPIED,
                EntryKind::Data { host }
                    if host.is_multiple_of(h.cluster_size()) && host < scan.file_len =>
                {
                    owned(host, entry)
                }
                _ => entry,
            };
            if right != entry {
                changed = true;
                fixed += 1;
            }
            raw.extend_from_slice(&right.to_be_bytes());
        }
        if changed {
            file.write_all_at(&raw, table)?;
        }
    }
    Ok(fixed)
}

/// Clears the dirty bit once the refcounts are right, and the corrupt bit once nothing is
/// corrupt (version 3 images; version 2 has no such bits). Returns what was done.
pub(super) fn clear_flags(file: &File, scan: &Scan) -> io::Result<Vec<String>> {
    let features = scan.header.incompatible_features;
    let mut cleared = features;
    let mut done = Vec::new();
    if features & incompatible::DIRTY != 0 && !scan.refcounts_wrong {
        cleared &= !incompatible::DIRTY;
        done.push("cleared the dirty bit".to_string());
    }
    if features & incompatible::CORRUPT != 0 && scan.report.corruptions == 0 {
        cleared &= !incompatible::CORRUPT;
        done.push("cleared the corrupt bit".to_string());
    }
    if cleared != features && scan.header.version >= 3 {
        file.write_all_at(&cleared.to_be_bytes(), header::INCOMPATIBLE_FIELD)?;
        file.sync_data()?;
    }
    Ok(done)
}
