//! Raw images: the file is the disk. Sparse files stay sparse: discard punches holes.
//!
//! Reads, writes and flushes are positional system calls with no state of their own, so many
//! threads may run them at once ([`RawImage::concurrent_io`]). A raw image whose format was
//! probed rather than given refuses changes to its first sector that would make it probe as
//! another format (see [`crate::probe`]); those changes, and only those, are serialized.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::VolatileSlice;

use crate::iov::{read_file_at, slices_len, write_file_at, Slices};
use crate::probe::{first_sector_after, refuse_disguise, PROBE_LEN};
use crate::{Buffers, ConcurrentIo, DiskImage};

/// A raw image file.
#[derive(Debug)]
pub struct RawImage {
    data: Arc<RawData>,
}

/// The file and its size: all reads and writes need.
#[derive(Debug)]
struct RawData {
    file: File,
    size: u64,
    /// Set when the format was probed: held while a change to the first sector is checked
    /// and made, so two writes cannot each pass the check and together form a signature.
    probed: Option<Mutex<()>>,
}

impl RawImage {
    /// A raw image whose owner said it is raw: every byte is the guest's.
    pub fn new(file: File) -> io::Result<Self> {
        Self::with_probe_guard(file, false)
    }

    /// A raw image whose format was only probed: guest writes that would make it look like
    /// another format are refused with `PermissionDenied`.
    pub fn probed(file: File) -> io::Result<Self> {
        Self::with_probe_guard(file, true)
    }

    fn with_probe_guard(file: File, probed: bool) -> io::Result<Self> {
        let size = file_size(&file)?;
        Ok(RawImage {
            data: Arc::new(RawData {
                file,
                size,
                probed: probed.then(|| Mutex::new(())),
            }),
        })
    }
}

impl RawData {
    /// The lock a change at `offset` must hold while its effect on the first sector is checked
    /// and made: `None` when the format was given, or the change starts past the probed bytes.
    fn probe_guard(&self, offset: u64) -> Option<&Mutex<()>> {
        self.probed.as_ref().filter(|_| offset < PROBE_LEN as u64)
    }

    /// Refuses a change that would put `head` (host bytes) at `offset` if the first sector
    /// would then probe as another format. The caller holds [`RawData::probe_guard`].
    fn check_first_sector(&self, offset: u64, head: &[u8]) -> io::Result<()> {
        let mut current = vec![0u8; PROBE_LEN];
        let read = self.file.read_at(&mut current, 0)?;
        current.truncate(read);
        match refuse_disguise(&first_sector_after(&current, offset, head)) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// Runs `change`, which writes zeroes from `offset` on (`len` bytes), unless the image was
    /// probed and the zeroes would make it probe as another format.
    fn guarded_zeroes(
        &self,
        offset: u64,
        len: u64,
        change: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(lock) = self.probe_guard(offset) else {
            return change();
        };
        let _held = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let in_sector = (PROBE_LEN as u64 - offset).min(len) as usize;
        self.check_first_sector(offset, &vec![0; in_sector])?;
        change()
    }

    /// Writes `buffers` (guest memory) at `offset` of a probed image, where it reaches the
    /// first sector. The bytes for the first sector are copied once, checked and written from
    /// that copy: checking guest memory and then writing from it would let another vCPU change
    /// them in between.
    fn write_guarded(
        &self,
        offset: u64,
        buffers: Buffers<'_, '_>,
        lock: &Mutex<()>,
    ) -> io::Result<()> {
        let _held = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rest = Slices::new(buffers);
        let in_sector = (PROBE_LEN as u64 - offset).min(rest.len());
        let mut head = Vec::new();
        for piece in rest.take(in_sector)? {
            let start = head.len();
            head.resize(start + piece.len(), 0);
            piece.copy_to(&mut head[start..]);
        }
        self.check_first_sector(offset, &head)?;
        write_file_at(&self.file, offset, &[VolatileSlice::from(&mut head[..])])?;
        if rest.is_empty() {
            return Ok(());
        }
        let tail = rest.take(rest.len())?;
        write_file_at(&self.file, offset + in_sector, &tail)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "access at {offset:#x}+{len:#x} beyond the end of the disk ({:#x})",
                    self.size
                ),
            )),
        }
    }
}

impl ConcurrentIo for RawData {
    fn read_at(&self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.check_range(offset, slices_len(buffers))?;
        read_file_at(&self.file, offset, buffers)
    }

    fn write_at(&self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.check_range(offset, slices_len(buffers))?;
        match self.probe_guard(offset) {
            Some(lock) => self.write_guarded(offset, buffers, lock),
            None => write_file_at(&self.file, offset, buffers),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl RawImage {
    /// Writes zeroes with plain writes, for file systems without fallocate modes.
    fn write_zero_blocks(&mut self, mut offset: u64, len: u64) -> io::Result<()> {
        let mut zeroes = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            let slice = VolatileSlice::from(&mut zeroes[..n]);
            // Straight to the file: the caller has checked (and guards) the range.
            write_file_at(&self.data.file, offset, &[slice])?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Size of a regular file or a block device.
fn file_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut file = file;
    file.seek(io::SeekFrom::End(0))
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.data.size
    }

    fn read_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.data.read_at(offset, buffers)
    }

    fn write_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()> {
        self.data.write_at(offset, buffers)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.data.flush()
    }

    fn concurrent_io(&self) -> Option<Arc<dyn ConcurrentIo>> {
        Some(self.data.clone())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.data.check_range(offset, len)?;
        let data = self.data.clone();
        data.guarded_zeroes(offset, len, || {
            host_sys::file::punch_hole(&self.data.file, offset, len)
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.data.check_range(offset, len)?;
        let data = self.data.clone();
        data.guarded_zeroes(offset, len, || self.zero_range(offset, len, may_unmap))
    }
}

impl RawImage {
    fn zero_range(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let file = &self.data.file;
        let zeroed = if may_unmap {
            host_sys::file::punch_hole(file, offset, len)
        } else {
            host_sys::file::zero_range(file, offset, len)
        };
        match zeroed {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) =>
            {
                self.write_zero_blocks(offset, len)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(contents: &[u8]) -> (tempfile::NamedTempFile, RawImage) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        let raw = RawImage::new(file.reopen().unwrap()).unwrap();
        (file, raw)
    }

    #[test]
    fn vectored_reads_and_writes() {
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let (_f, mut raw) = image(&data);
        assert_eq!(raw.size(), 8192);
        let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 412]);
        raw.read_at(
            1000,
            &[
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ],
        )
        .unwrap();
        assert_eq!(a, &data[1000..1100]);
        assert_eq!(b, &data[1100..1512]);
        let mut new = vec![0xeeu8; 512];
        raw.write_at(4096, &[VolatileSlice::from(&mut new[..])])
            .unwrap();
        raw.flush().unwrap();
        let mut back = vec![0u8; 512];
        raw.read_at(4096, &[VolatileSlice::from(&mut back[..])])
            .unwrap();
        assert_eq!(back, vec![0xee; 512]);
    }

    #[test]
    fn out_of_range_accesses_fail() {
        let (_f, mut raw) = image(&[0u8; 4096]);
        let mut buf = vec![0u8; 512];
        assert!(raw
            .read_at(4000, &[VolatileSlice::from(&mut buf[..])])
            .is_err());
        assert!(raw
            .write_at(u64::MAX - 10, &[VolatileSlice::from(&mut buf[..])])
            .is_err());
        assert!(raw.discard(4096, 1).is_err());
        assert!(raw.write_zeroes(0, 8192, false).is_err());
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (f, mut raw) = image(&vec![0xaau8; 1 << 20]);
        raw.discard(0, 64 << 10).unwrap();
        raw.write_zeroes(128 << 10, 4096, false).unwrap();
        raw.write_zeroes(256 << 10, 8192, true).unwrap();
        let contents = std::fs::read(f.path()).unwrap();
        assert!(contents[..64 << 10].iter().all(|&b| b == 0));
        assert_eq!(contents[64 << 10], 0xaa);
        assert!(contents[128 << 10..(128 << 10) + 4096]
            .iter()
            .all(|&b| b == 0));
        assert!(contents[256 << 10..(256 << 10) + 8192]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(contents[(256 << 10) + 8192], 0xaa);
        assert_eq!(contents.len(), 1 << 20, "size kept");
    }
}
