//! Growing an image: the virtual size, and the L1 table when the new size needs more entries.

use std::io;
use std::os::unix::fs::FileExt;

use super::header::{self, Header};
use super::metadata::Structure;
use super::{Mapping, Qcow2Image};

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

impl Qcow2Image {
    /// Grows the virtual disk to `size` bytes (shrinking is not supported).
    pub fn resize(&mut self, size: u64) -> io::Result<()> {
        self.check_writable()?;
        if size < self.header.size {
            return Err(invalid("shrinking a qcow2 image is not supported"));
        }
        if size > header::MAX_SIZE {
            return Err(invalid("the size is too large"));
        }
        if self.header.version < 3 && self.header.nb_snapshots > 0 {
            return Err(invalid("a version 2 image with snapshots cannot be resized (they do not record their size)"));
        }
        self.grow_l1(Header::l1_entries_for(size, self.header.cluster_bits))?;
        self.file
            .write_all_at(&size.to_be_bytes(), header::SIZE_FIELD)?;
        self.file.sync_data()?;
        self.header.size = size;
        Ok(())
    }

    /// Makes the active L1 table hold at least `entries` entries, moving it to new clusters
    /// (the header switches to the copy once it is durable; then the old one is freed).
    pub(super) fn grow_l1(&mut self, entries: u64) -> io::Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        self.flush_metadata()?;
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(invalid("the size needs too large an L1 table"));
        }
        let cluster_size = self.cluster_size();
        let clusters = (entries * 8).div_ceil(cluster_size);
        let new = self.allocate(clusters, "an L1 table")?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        raw.resize((clusters * cluster_size) as usize, 0);
        self.file.write_all_at(&raw, new)?;
        self.file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..].copy_from_slice(&new.to_be_bytes());
        self.file.write_all_at(&fields, header::L1_FIELDS)?;
        self.file.sync_data()?;
        let old = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cluster_size);
        self.header.l1_table_offset = new;
        self.header.l1_size = entries as u32;
        self.l1 = l1;
        let map = self.refcounts.metadata_mut();
        map.remove_extent(old);
        map.add_extent(new, entries * 8, Structure::L1Table)?;
        for i in 0..old_clusters {
            self.release(Mapping::Data {
                host: old + i * cluster_size,
                owned: false,
            })?;
        }
        Ok(())
    }
}
