//! An image held in memory, for tests and fuzzing.

use std::io;

use crate::{slices_len, Buffers, DiskImage};

/// A disk whose bytes live in a vector.
#[derive(Debug, Clone)]
pub struct MemoryImage {
    pub bytes: Vec<u8>,
}

impl MemoryImage {
    pub fn new(size: usize) -> Self {
        MemoryImage {
            bytes: vec![0; size],
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len() as u64)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "beyond the end of the disk")
            })?;
        Ok(offset as usize..end as usize)
    }
}

impl DiskImage for MemoryImage {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        let range = self.range(offset, slices_len(buffers))?;
        let mut at = range.start;
        for buffer in buffers {
            buffer.copy_from(&self.bytes[at..at + buffer.len()]);
            at += buffer.len();
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        let range = self.range(offset, slices_len(buffers))?;
        let mut at = range.start;
        for buffer in buffers {
            buffer.copy_to(&mut self.bytes[at..at + buffer.len()]);
            at += buffer.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        let range = self.range(offset, len)?;
        self.bytes[range].fill(0);
        Ok(())
    }
}
