//! The snapshot table's format: entries (`Snapshot`) read from untrusted bytes and written
//! back, and the limits QEMU sets on them. Pure functions on bytes (no state, any thread),
//! shared by the snapshot operations and by the offline check, which reads the table without
//! opening the image.

use std::io;

use super::corrupt;
use super::header;

/// Fixed part of a snapshot table entry.
const ENTRY_HEADER: usize = 40;
/// Largest extra data QEMU accepts per entry.
const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table QEMU accepts.
pub(super) const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Extra data written for new entries: VM state size (64-bit), disk size, icount.
const EXTRA_LEN: usize = 24;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Creation time (seconds and nanoseconds since the epoch).
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest clock at creation.
    pub vm_clock_nsec: u64,
    /// Saved VM state (Ferro never saves one; QEMU's `savevm` does).
    pub vm_state_size: u64,
    /// Virtual disk size when it was taken (version 3 images).
    pub disk_size: Option<u64>,
    /// Extra data beyond what Ferro interprets, kept as it was.
    pub(super) extra_rest: Vec<u8>,
    pub(super) icount: Option<u64>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Snapshot {
    /// Serializes the entry (padded to 8 bytes).
    pub(super) fn to_bytes(&self, version: u32) -> io::Result<Vec<u8>> {
        let mut extra = Vec::new();
        if version >= 3 || self.disk_size.is_some() {
            extra.extend_from_slice(&self.vm_state_size.to_be_bytes());
            extra.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
            extra.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
            extra.extend_from_slice(&self.extra_rest);
        }
        let (id, name) = (self.id.as_bytes(), self.name.as_bytes());
        let too_long = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the snapshot name is too long (at most 65535 bytes)",
            )
        };
        let mut b = Vec::with_capacity(ENTRY_HEADER + extra.len() + id.len() + name.len() + 8);
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(
            &u16::try_from(id.len())
                .map_err(|_| too_long())?
                .to_be_bytes(),
        );
        b.extend_from_slice(
            &u16::try_from(name.len())
                .map_err(|_| too_long())?
                .to_be_bytes(),
        );
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(self.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&extra);
        b.extend_from_slice(id);
        b.extend_from_slice(name);
        b.resize(b.len().next_multiple_of(8), 0);
        Ok(b)
    }
}

/// Parses `count` entries from the table bytes `raw`; returns them and the bytes they use.
pub fn parse_table(raw: &[u8], count: u32, cluster_size: u64) -> io::Result<(Vec<Snapshot>, u64)> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    for index in 0..count {
        let bad = |what: &str| corrupt(format!("snapshot {index}: {what}"));
        let head = raw
            .get(at..at + ENTRY_HEADER)
            .ok_or_else(|| bad("the table is truncated"))?;
        let l1_table_offset = be64(head, 0);
        let l1_size = be32(head, 8);
        let id_len = usize::from(u16::from_be_bytes([head[12], head[13]]));
        let name_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let extra_len = be32(head, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad("too much extra data"));
        }
        if !l1_table_offset.is_multiple_of(cluster_size)
            || u64::from(l1_size) * 8 > header::MAX_L1_BYTES
        {
            return Err(bad("invalid L1 table"));
        }
        let extra_start = at + ENTRY_HEADER;
        let id_start = extra_start + extra_len as usize;
        let name_start = id_start + id_len;
        let end = name_start + name_len;
        let body = raw
            .get(extra_start..end)
            .ok_or_else(|| bad("the table is truncated"))?;
        let extra = &body[..extra_len as usize];
        let field = |at: usize| (extra.len() >= at + 8).then(|| be64(extra, at));
        out.push(Snapshot {
            id: String::from_utf8_lossy(&raw[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&raw[name_start..end]).into_owned(),
            l1_table_offset,
            l1_size,
            date_sec: be32(head, 16),
            date_nsec: be32(head, 20),
            vm_clock_nsec: be64(head, 24),
            vm_state_size: field(0).unwrap_or(u64::from(be32(head, 32))),
            disk_size: field(8),
            icount: field(16).filter(|&v| v != u64::MAX),
            extra_rest: extra.get(EXTRA_LEN..).unwrap_or(&[]).to_vec(),
        });
        at = end.next_multiple_of(8);
    }
    Ok((out, at as u64))
}

/// The stored form of a snapshot table, refused if it could not be read back (QEMU and
/// Ferro read at most [`MAX_TABLE_BYTES`]).
pub(super) fn table_bytes(snapshots: &[Snapshot], version: u32) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    for snapshot in snapshots {
        raw.extend_from_slice(&snapshot.to_bytes(version)?);
    }
    if raw.len() as u64 > MAX_TABLE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the snapshot table would take {} bytes, more than the {} MiB an image may hold: delete snapshots or use shorter names",
                raw.len(),
                MAX_TABLE_BYTES >> 20
            ),
        ));
    }
    Ok(raw)
}

#[cfg(test)]
pub(super) mod tests;
