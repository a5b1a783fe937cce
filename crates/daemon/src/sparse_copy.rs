//! The full copy of a raw volume: only its data segments (SEEK_DATA / SEEK_HOLE), copied in
//! the kernel (copy_file_range) where the file system allows, as cp and qemu-img do, and made
//! durable before it counts as done, as libvirt's volume clone does.
//!
//! Durability costs a write-out of everything copied. Waiting for it at the end would add the
//! whole write-out time to the copy time, so each piece's write-out is started as soon as the
//! piece is copied (sync_file_range) and the final fdatasync only waits for the tail. A large
//! copy keeps a bounded window of pieces in write-out (see [`WINDOW_PIECES`]).
//!
//! Runs on the caller's (blocking) thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Unit of copying, of progress and of started write-out.
const PIECE: u64 = 8 << 20;
/// Pieces whose write-out may be under way at once (256 MiB). Beyond that the copy waits for
/// the oldest: a large copy then never reaches the kernel's dirty-page limits, where writers
/// are throttled (measured: 6 GiB in 2.0 s instead of 4.6 s), and what it wrote leaves the
/// page cache instead of pushing out the VMs' pages. A copy smaller than the window is
/// unchanged.
const WINDOW_PIECES: usize = 32;

/// Copies the raw file `source` (`size` bytes) into `target` (created, `size` long, empty),
/// leaving holes as holes; tells `progress` (bytes done, total) after each piece and returns
/// once the data is on stable storage.
pub fn copy_raw(
    source: &Path,
    target: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<()> {
    copy_raw_windowed(source, target, size, WINDOW_PIECES, progress)
}

/// [`copy_raw`] keeping at most `window` pieces written but not yet on storage.
fn copy_raw_windowed(
    source: &Path,
    target: &Path,
    size: u64,
    window: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<()> {
    let from = File::open(source)?;
    let to = std::fs::OpenOptions::new().write(true).open(target)?;
    let mut in_kernel = true;
    let mut offset = 0u64;
    let mut in_flight = std::collections::VecDeque::new();
    while offset < size {
        let Some(data) = seek(&from, offset, libc::SEEK_DATA)? else {
            break; // only a hole is left
        };
        let end = seek(&from, data, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        let mut piece = data;
        while piece < end {
            let piece_end = end.min(piece + PIECE);
            if in_kernel {
                in_kernel = copy_in_kernel(&from, &to, piece, piece_end)?;
            }
            if !in_kernel {
                copy_by_hand(&from, &to, piece, piece_end)?;
            }
            start_write_out(&to, piece, piece_end);
            in_flight.push_back((piece, piece_end));
            if in_flight.len() > window {
                if let Some((start, end)) = in_flight.pop_front() {
                    finish_write_out(&to, start, end)?;
                }
            }
            piece = piece_end;
            progress(piece, size);
        }
        offset = end;
    }
    progress(size, size);
    to.sync_data()
}

/// Copies `start..end` with copy_file_range; false (nothing copied) when the file system or
/// kernel cannot, so the caller copies by hand.
fn copy_in_kernel(from: &File, to: &File, start: u64, end: u64) -> io::Result<bool> {
    let (mut from_offset, mut to_offset) = (start as i64, start as i64);
    while (from_offset as u64) < end {
        let len = (end - from_offset as u64) as usize;
        // SAFETY: both fds are open files borrowed for the call; the offsets are locals the
        // call updates; no memory buffer is involved.
        let copied = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut from_offset,
                to.as_raw_fd(),
                &mut to_offset,
                len,
                0,
            )
        };
        if copied < 0 {
            let err = io::Error::last_os_error();
            let unsupported = matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
            );
            if unsupported && from_offset as u64 == start {
                return Ok(false);
            }
            return Err(err);
        }
        if copied == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(true)
}

/// Copies `start..end` with reads and writes (file systems without copy_file_range).
fn copy_by_hand(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (end - start).min(PIECE) as usize];
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..len], offset)?;
        to.write_all_at(&buf[..len], offset)?;
        offset += len as u64;
    }
    Ok(())
}

/// Starts writing `start..end` of `file` out without waiting for it. Only a head start for
/// the final fdatasync, which reports any write error: a failure here changes nothing.
fn start_write_out(file: &File, start: u64, end: u64) {
    // SAFETY: sync_file_range on an open fd borrowed for the call takes plain integers.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            start as i64,
            (end - start) as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Starts writing out all of `file` that is dirty, for copies made through an image format
/// (whose layout is not the caller's to know): the same head start as each piece gets here.
pub fn start_write_out_all(file: &File) {
    // SAFETY: as in start_write_out; a length of 0 means up to the end of the file.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Waits until `start..end` is written out and drops it from the page cache: the copy keeps
/// only a window of dirty pages, so it never runs into the kernel's dirty-page throttling.
fn finish_write_out(file: &File, start: u64, end: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range on an open fd borrowed for the call takes plain integers.
    let ret = unsafe {
        libc::sync_file_range(file.as_raw_fd(), start as i64, (end - start) as i64, flags)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; advice only.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            start as i64,
            (end - start) as i64,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    Ok(())
}

/// lseek(SEEK_DATA / SEEK_HOLE); None when no data follows (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open fd borrowed for the call takes plain integers.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if pos < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const SIZE: u64 = 64 << 20;

    /// A raw file of SIZE with data at 1 MiB (20 MiB long: three pieces) and at the last
    /// 4 KiB, holes elsewhere.
    fn source(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("source.raw");
        let file = File::create(&path).unwrap();
        file.set_len(SIZE).unwrap();
        let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all_at(&data, 1 << 20).unwrap();
        file.write_all_at(&[0xAB; 4096], SIZE - 4096).unwrap();
        (path, data)
    }

    fn empty_target(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("target.raw");
        File::create(&path).unwrap().set_len(SIZE).unwrap();
        path
    }

    fn read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    #[test]
    fn data_is_copied_holes_stay_holes_and_progress_rises_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (from, data) = source(dir.path());
        let to = empty_target(dir.path());
        let mut reports = Vec::new();
        copy_raw(&from, &to, SIZE, &mut |done, total| {
            reports.push((done, total))
        })
        .unwrap();

        assert_eq!(read(&to, 1 << 20, data.len()), data);
        assert_eq!(read(&to, SIZE - 4096, 4096), [0xAB; 4096]);
        assert_eq!(read(&to, 32 << 20, 4096), [0; 4096]);
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(
            allocated < 24 << 20,
            "holes stay holes: {allocated} bytes allocated"
        );
        assert!(reports.len() >= 4, "a report per piece: {reports:?}");
        assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");
        assert!(reports.iter().all(|&(_, total)| total == SIZE));
        assert_eq!(reports.last(), Some(&(SIZE, SIZE)));
    }

    #[test]
    fn the_copy_by_hand_matches_the_copy_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let (from, data) = source(dir.path());
        let to = empty_target(dir.path());
        let (from_file, to_file) = (
            File::open(&from).unwrap(),
            std::fs::OpenOptions::new().write(true).open(&to).unwrap(),
        );
        let (start, end) = (1 << 20, (1 << 20) + data.len() as u64);
        copy_by_hand(&from_file, &to_file, start, end).unwrap();
        assert_eq!(read(&to, start, data.len()), data);
    }

    #[test]
    fn a_short_source_copies_what_it_has_and_never_loops() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("short.raw");
        std::fs::write(&from, [1u8; 4096]).unwrap();
        let to = empty_target(dir.path());
        // The segment search stops at the file's end; asking for more copies what is there.
        copy_raw(&from, &to, SIZE, &mut |_, _| {}).unwrap();
        assert_eq!(read(&to, 0, 4096), [1u8; 4096]);
        let from_file = File::open(&from).unwrap();
        let to_file = std::fs::OpenOptions::new().write(true).open(&to).unwrap();
        assert!(copy_in_kernel(&from_file, &to_file, 0, 8192).is_err());
    }
    #[test]
    fn a_copy_larger_than_its_window_waits_piece_by_piece_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (from, data) = source(dir.path());
        for window in [0, 1] {
            let to = empty_target(dir.path());
            let mut pieces = 0;
            copy_raw_windowed(&from, &to, SIZE, window, &mut |_, _| pieces += 1).unwrap();
            assert!(pieces > window + 1, "the window was exceeded");
            assert_eq!(read(&to, 1 << 20, data.len()), data, "window {window}");
            assert_eq!(read(&to, SIZE - 4096, 4096), [0xAB; 4096]);
            assert_eq!(read(&to, 32 << 20, 4096), [0; 4096]);
            std::fs::remove_file(&to).unwrap();
        }
    }
}
