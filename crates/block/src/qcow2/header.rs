//! The qcow2 header and its extensions (QEMU's docs/interop/qcow2.txt), parsed defensively:
//! every field that sizes an allocation or locates a table is checked before use.

use std::io;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 112;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Offset of refcount_table_offset (u64) and refcount_table_clusters (u32) in the header.
pub const REFCOUNT_TABLE_FIELDS: u64 = 48;
/// Offset of l1_size (u32) and l1_table_offset (u64).
pub const L1_FIELDS: u64 = 36;
/// Offset of the virtual size (u64).
pub const SIZE_FIELD: u64 = 24;
/// Offset of nb_snapshots (u32) and snapshots_offset (u64).
pub const SNAPSHOT_FIELDS: u64 = 60;
/// Offset of the incompatible feature bits (v3).
pub const INCOMPATIBLE_FIELD: u64 = 72;
/// Offset of the autoclear feature bits (v3).
pub const AUTOCLEAR_FIELD: u64 = 88;
/// Largest virtual size (QEMU's limit: 2 EiB).
pub const MAX_SIZE: u64 = 1 << 61;

/// Incompatible feature bits.
pub mod incompatible {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// The bits Ferro understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | COMPRESSION_TYPE;
}

/// Compatible feature bits.
pub mod compatible {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear bits (cleared by any writer that does not know them).
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// Header extension types.
pub mod extension {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA: u32 = 0x4441_5441;
}

/// A header Ferro cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("cluster size 2^{0} is outside 512 bytes..2 MiB")]
    ClusterBits(u32),
    #[error("encrypted images are not supported")]
    Encrypted,
    #[error("unsupported incompatible features {0:#x}")]
    IncompatibleFeatures(u64),
    #[error("refcount order {0} is not supported (0..=6)")]
    RefcountOrder(u32),
    #[error("header length {0} is invalid")]
    HeaderLength(u32),
    #[error("{what} at {offset:#x} is not aligned to a cluster")]
    Unaligned { what: &'static str, offset: u64 },
    #[error("virtual size {0:#x} is too large")]
    Size(u64),
    #[error("the L1 table ({entries} entries) is too small for the disk or too large")]
    L1Size { entries: u32 },
    #[error("the refcount table ({clusters} clusters) is too large")]
    RefcountTableSize { clusters: u32 },
    #[error("{0} snapshots is too many")]
    Snapshots(u32),
    #[error("the backing file name ({0} bytes) is too long or outside the first cluster")]
    BackingName(u32),
    #[error("header extension {kind:#x} ({len} bytes) runs past the first cluster")]
    Extension { kind: u32, len: u32 },
    #[error("the image uses an external data file, which is not supported")]
    ExternalData,
    #[error("compression type {0} is not supported (0: zlib)")]
    CompressionType(u8),
    #[error("the image is too short for its header")]
    Truncated,
}

impl From<HeaderError> for io::Error {
    fn from(e: HeaderError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing format from the header extension, if any.
    pub backing_format: Option<String>,
    /// Extensions Ferro does not interpret, kept so a rewritten header preserves them.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses the first cluster of an image (`first` holds at least 512 bytes, more if the
    /// file is longer, up to one cluster).
    pub fn parse(first: &[u8]) -> Result<Self, HeaderError> {
        if first.len() < V2_HEADER_LEN as usize {
            return Err(HeaderError::Truncated);
        }
        if be32(first, 0) != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        if be32(first, 32) != 0 {
            return Err(HeaderError::Encrypted);
        }
        let mut header = Header {
            version,
            backing_file_offset: be64(first, 8),
            backing_file_size: be32(first, 16),
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if first.len() < 104 {
                return Err(HeaderError::Truncated);
            }
            header.incompatible_features = be64(first, 72);
            header.compatible_features = be64(first, 80);
            header.autoclear_features = be64(first, 88);
            header.refcount_order = be32(first, 96);
            header.header_length = be32(first, 100);
            if header.header_length < 104
                || header.header_length as u64 > cluster_size.min(first.len() as u64)
                || !header.header_length.is_multiple_of(8)
            {
                return Err(HeaderError::HeaderLength(header.header_length));
            }
            if header.header_length > 104 {
                header.compression_type = first[104];
            }
        }
        header.validate(cluster_size)?;
        header.parse_extensions(first)?;
        header.parse_backing_name(first)?;
        Ok(header)
    }

    fn validate(&self, cluster_size: u64) -> Result<(), HeaderError> {
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if self.incompatible_features & incompatible::EXTERNAL_DATA != 0 {
            return Err(HeaderError::ExternalData);
        }
        if unknown != 0 {
            return Err(HeaderError::IncompatibleFeatures(unknown));
        }
        if self.compression_type != 0 {
            return Err(HeaderError::CompressionType(self.compression_type));
        }
        if self.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(self.refcount_order));
        }
        if self.size > MAX_SIZE {
            return Err(HeaderError::Size(self.size));
        }
        for (what, offset) in [
            ("the L1 table", self.l1_table_offset),
            ("the refcount table", self.refcount_table_offset),
        ] {
            if offset % cluster_size != 0 {
                return Err(HeaderError::Unaligned { what, offset });
            }
        }
        if self.nb_snapshots > 0 && !self.snapshots_offset.is_multiple_of(cluster_size) {
            return Err(HeaderError::Unaligned {
                what: "the snapshot table",
                offset: self.snapshots_offset,
            });
        }
        let needed = Self::l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed || u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(HeaderError::L1Size {
                entries: self.l1_size,
            });
        }
        if self.refcount_table_clusters == 0
            || u64::from(self.refcount_table_clusters) * cluster_size
                > MAX_REFCOUNT_TABLE_BYTES.max(cluster_size)
        {
            return Err(HeaderError::RefcountTableSize {
                clusters: self.refcount_table_clusters,
            });
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::Snapshots(self.nb_snapshots));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, first: &[u8]) -> Result<(), HeaderError> {
        if self.version < 3 {
            // Version 2 images may still carry extensions right after the 72-byte header.
        }
        let limit = if self.backing_file_offset > 0 {
            (self.backing_file_offset as usize).min(first.len())
        } else {
            first.len()
        };
        let mut at = self.header_length as usize;
        while at + 8 <= limit {
            let kind = be32(first, at);
            let len = be32(first, at + 4);
            if kind == extension::END {
                break;
            }
            let start = at + 8;
            let end = start
                .checked_add(len as usize)
                .filter(|&end| end <= limit)
                .ok_or(HeaderError::Extension { kind, len })?;
            let data = &first[start..end];
            match kind {
                extension::BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                extension::EXTERNAL_DATA => return Err(HeaderError::ExternalData),
                extension::ENCRYPTION => return Err(HeaderError::Encrypted),
                extension::FEATURE_TABLE => {}
                other => self.unknown_extensions.push((other, data.to_vec())),
            }
            at = start + (len as usize).next_multiple_of(8);
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, first: &[u8]) -> Result<(), HeaderError> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let start = self.backing_file_offset as usize;
        let len = self.backing_file_size;
        let end = start.checked_add(len as usize);
        match end {
            Some(end) if len > 0 && len <= MAX_BACKING_NAME && end <= first.len() => {
                self.backing_file = Some(String::from_utf8_lossy(&first[start..end]).into_owned());
                Ok(())
            }
            _ => Err(HeaderError::BackingName(len)),
        }
    }

    /// Serializes the header, its extensions and the backing file name into one cluster.
    /// Returns None if they do not fit.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(format) = &self.backing_format {
            push_ext(&mut b, extension::BACKING_FORMAT, format.as_bytes());
        }
        for (kind, data) in &self.unknown_extensions {
            push_ext(&mut b, *kind, data);
        }
        push_ext(&mut b, extension::END, &[]);
        if let Some(name) = &self.backing_file {
            let offset = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            put64(&mut b, 8, offset);
            put32(&mut b, 16, name.len() as u32);
        } else {
            put64(&mut b, 8, 0);
            put32(&mut b, 16, 0);
        }
        (b.len() <= cluster_size).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    fn cluster(header: &Header) -> Vec<u8> {
        let mut bytes = header.to_bytes().unwrap();
        bytes.resize(header.cluster_size() as usize, 0);
        bytes
    }

    #[test]
    fn round_trips_with_extensions_and_backing_name() {
        let h = sample();
        let parsed = Header::parse(&cluster(&h)).unwrap();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(parsed.backing_format.as_deref(), Some("raw"));
        assert_eq!(parsed.unknown_extensions, h.unknown_extensions);
        let mut expected = h.clone();
        expected.backing_file_offset = parsed.backing_file_offset;
        expected.backing_file_size = 8;
        assert_eq!(parsed, expected);
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        let mut bytes = cluster(&sample());
        bytes[0] = b'X';
        assert_eq!(Header::parse(&bytes), Err(HeaderError::BadMagic));
        let check = |f: &dyn Fn(&mut Header), expected: HeaderError| {
            let mut h = sample();
            f(&mut h);
            let mut bytes = h.to_bytes().unwrap();
            bytes.resize(1 << 16, 0);
            assert_eq!(Header::parse(&bytes), Err(expected));
        };
        check(&|h| h.version = 4, HeaderError::Version(4));
        check(
            &|h| h.incompatible_features = incompatible::EXTENDED_L2,
            HeaderError::IncompatibleFeatures(incompatible::EXTENDED_L2),
        );
        check(
            &|h| h.incompatible_features = incompatible::EXTERNAL_DATA,
            HeaderError::ExternalData,
        );
        check(&|h| h.refcount_order = 7, HeaderError::RefcountOrder(7));
        check(
            &|h| h.l1_table_offset = 0x30001,
            HeaderError::Unaligned {
                what: "the L1 table",
                offset: 0x30001,
            },
        );
        check(&|h| h.l1_size = 1, HeaderError::L1Size { entries: 1 });
        check(
            &|h| h.l1_size = u32::MAX,
            HeaderError::L1Size { entries: u32::MAX },
        );
        check(&|h| h.size = u64::MAX, HeaderError::Size(u64::MAX));
        check(
            &|h| h.refcount_table_clusters = 0,
            HeaderError::RefcountTableSize { clusters: 0 },
        );
        check(
            &|h| h.refcount_table_clusters = 1 << 20,
            HeaderError::RefcountTableSize { clusters: 1 << 20 },
        );
        check(&|h| h.compression_type = 1, HeaderError::CompressionType(1));
        check(
            &|h| h.nb_snapshots = MAX_SNAPSHOTS + 1,
            HeaderError::Snapshots(MAX_SNAPSHOTS + 1),
        );
    }

    #[test]
    fn cluster_bits_are_bounded() {
        let mut h = sample();
        h.cluster_bits = 22;
        let mut bytes = h.to_bytes().unwrap();
        bytes.resize(1 << 16, 0);
        assert_eq!(Header::parse(&bytes), Err(HeaderError::ClusterBits(22)));
    }

    #[test]
    fn truncated_and_hostile_extensions() {
        assert_eq!(Header::parse(&[0u8; 10]), Err(HeaderError::Truncated));
        let mut bytes = cluster(&sample());
        // Make the first extension claim 1 MiB.
        let at = V3_HEADER_LEN as usize;
        bytes[at + 4..at + 8].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(matches!(
            Header::parse(&bytes),
            Err(HeaderError::Extension { .. })
        ));
        let mut h = sample();
        h.backing_file = None;
        let mut bytes = cluster(&h);
        bytes[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
        bytes[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(Header::parse(&bytes), Err(HeaderError::BackingName(100)));
    }

    #[test]
    fn version_2_headers() {
        let mut h = sample();
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.backing_format = None;
        h.unknown_extensions.clear();
        let parsed = Header::parse(&cluster(&h)).unwrap();
        assert_eq!((parsed.version, parsed.refcount_order), (2, 4));
        assert_eq!(parsed.backing_file.as_deref(), Some("base.raw"));
    }
}
