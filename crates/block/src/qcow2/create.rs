//! Creating empty qcow2 images (version 3, 16-bit refcounts), laid out as qemu-img does:
//! header, refcount table, refcount blocks, L1 table.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{self, Header};

/// Options for [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_bits: u32,
    /// Backing file name as stored in the image, and its format.
    pub backing: Option<(String, Option<String>)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            backing: None,
        }
    }
}

/// Writes an empty version 3 image into `file` (which must be empty).
pub fn create(file: &File, options: &CreateOptions) -> io::Result<()> {
    let cluster_bits = options.cluster_bits;
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cluster size must be 512 bytes to 2 MiB, a power of two",
        ));
    }
    if options.size > header::MAX_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the size is too large",
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let l1_entries = Header::l1_entries_for(options.size, cluster_bits).max(1);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the size needs too large an L1 table",
        ));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
    let refcount_order = 4;
    let per_block = (cluster_size * 8) >> refcount_order;
    // Header, refcount table, refcount blocks, L1 table: enough blocks to count them all.
    let mut blocks: u64 = 1;
    let table_clusters = loop {
        let table_clusters = (blocks * 8).div_ceil(cluster_size);
        if 1 + table_clusters + blocks + l1_clusters <= blocks * per_block {
            break table_clusters;
        }
        blocks += 1;
    };
    let table_offset = cluster_size;
    let blocks_offset = table_offset + table_clusters * cluster_size;
    let l1_offset = blocks_offset + blocks * cluster_size;
    let used = 1 + table_clusters + blocks + l1_clusters;
    let (backing_file, backing_format) = match &options.backing {
        Some((name, format)) => (Some(name.clone()), format.clone()),
        None => (None, None),
    };
    let header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: options.size,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: table_offset,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: header::V3_HEADER_LEN,
        compression_type: 0,
        backing_file,
        backing_format,
        unknown_extensions: Vec::new(),
    };
    let header_bytes = header.to_bytes().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the backing file name does not fit in the header",
        )
    })?;
    let mut image = vec![0u8; (used * cluster_size) as usize];
    image[..header_bytes.len()].copy_from_slice(&header_bytes);
    for b in 0..blocks {
        let entry = blocks_offset + b * cluster_size;
        let at = (table_offset + b * 8) as usize;
        image[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    }
    for cluster in 0..used {
        let at = (blocks_offset + cluster * 2) as usize;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.write_all_at(&image, 0)?;
    file.sync_all()
}
