//! Disk images behind one interface: raw files and qcow2 (with backing chains).
//!
//! [`DiskImage`] is what a block device needs: size, vectored reads and writes straight from and
//! to guest memory ([`vm_memory::VolatileSlice`]s, no bounce buffers), flush to stable storage,
//! discard and write-zeroes. [`open`] opens a file, takes an exclusive lock on it (a shared one
//! for read-only use, and for backing files) so two VMs never write one image, and opens the
//! backing chain; the format is the caller's to give ([`probe`] guesses it only when nobody
//! said, and keeps a guessed raw image raw).
//!
//! Threading: an image is used by one thread at a time (the block device's worker), except
//! through its [`ConcurrentIo`] handle, which formats without per-write metadata (raw) offer for
//! reads and writes from many threads at once.

mod iov;
pub mod manage;
pub mod mem;
pub mod open;
pub mod probe;
pub mod qcow2;
pub mod raw;

use std::io;
use std::sync::Arc;

use vm_memory::VolatileSlice;

pub use iov::{read_file_at, slices_len, write_file_at, zero_fill, Slices};

/// Guest memory buffers of one request.
pub type Buffers<'a, 'b> = &'a [VolatileSlice<'b, ()>];

/// A disk image as block devices use it.
pub trait DiskImage: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buffers` with the bytes at `offset`.
    fn read_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    /// Writes `buffers` at `offset`.
    fn write_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// For an image no one uses until it is complete (a copy put in place afterwards, whose
    /// file its maker syncs): metadata writes drop their crash-safety ordering, and `flush`
    /// writes out what the image holds in memory without waiting for storage. Formats that
    /// hold nothing in memory (raw) keep their flush.
    fn skip_barriers(&mut self) {}
    /// Tells the image `len` bytes at `offset` are unused (reads may return anything; raw files
    /// read zeroes).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes; `may_unmap` allows freeing the space.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// A handle for reads, writes and flushes that may run on other threads at the same time as
    /// each other and as this image's own calls; `None` when the format must serialize them
    /// (its writes change metadata).
    fn concurrent_io(&self) -> Option<Arc<dyn ConcurrentIo>> {
        None
    }
}

/// Reads, writes and flushes callable from many threads at once (see
/// [`DiskImage::concurrent_io`]); same meaning as the [`DiskImage`] methods of those names.
pub trait ConcurrentIo: Send + Sync {
    fn read_at(&self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    fn write_at(&self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
}

pub use open::{open, open_with, Format, ImageOptions, OpenError, MAX_CHAIN_DEPTH};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_qcow2_header_is_an_error_not_raw_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        std::fs::write(&path, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Invalid { .. })
        ));
        // Forcing raw is the user's explicit choice.
        assert!(open(&path, false, Some(Format::Raw)).is_ok());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = open(&path, false, None).unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Locked { .. })
        ));
        assert!(matches!(
            open(&path, true, None),
            Err(OpenError::Locked { .. })
        ));
        drop(first);
        let reader = open(&path, true, None).unwrap();
        let second_reader = open(&path, true, None).unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Locked { .. })
        ));
        drop((reader, second_reader));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open(dir.path(), true, None),
            Err(OpenError::NotADisk { .. })
        ));
        assert!(matches!(
            open(&dir.path().join("nope"), true, None),
            Err(OpenError::Open { .. })
        ));
        assert_eq!("qcow2".parse::<Format>(), Ok(Format::Qcow2));
        assert!("vmdk".parse::<Format>().is_err());
    }
}
