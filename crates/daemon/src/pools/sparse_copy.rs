//! The full copy of a raw volume: only its data segments (SEEK_DATA / SEEK_HOLE), copied in
//! the kernel (copy_file_range) where the file system allows, as cp and qemu-img do. The copy
//! returns once the data is written, like theirs; `write_back` then puts it on storage.
//!
//! A copy larger than [`WINDOW`] keeps a bounded window of pieces in write-out,
//! so it never runs into the kernel's dirty-page throttling; a smaller one leaves the
//! write-out to the kernel and to `write_back`.
//!
//! Runs on the caller's (blocking) thread.

use host_sys::file;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Unit of copying, of progress and of started write-out.
const PIECE: u64 = 8 << 20;
/// Bytes that may be written but not on storage at once. A larger copy goes in batches whose
/// write-out starts once each is copied, waiting for the one before: it then never reaches
/// the kernel's dirty-page limits, where writers are throttled (measured with a window of
/// 256 MiB: 6 GiB in 2.0 s instead of 4.6 s), and what it wrote leaves the page cache instead
/// of pushing out the VMs' pages. A smaller copy is left to the kernel's own write-out (and
/// `write_back`'s sync), since waiting on a part of it would cost more than it saves.
pub const WINDOW: u64 = 1 << 30;

/// Copies the file `from` (`size` bytes) into `target` (created, `size` long, empty),
/// leaving holes as holes; tells `progress` (bytes done, total) as it goes and returns once
/// the data is written (not necessarily on storage: the caller syncs it).
pub fn copy_raw(
    from: File,
    target: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<()> {
    let pieces = data_pieces(&from, size)?;
    let data: u64 = pieces.iter().map(|(start, end)| end - start).sum();
    let copier = Copier::new(from, target)?;
    copier.copy(&pieces, WINDOW, workers_for(data), &mut |done| {
        progress(scale(done, data, size), size)
    })?;
    progress(size, size);
    Ok(())
}

/// `start..end` of the file.
type Piece = (u64, u64);

/// Threads that copy at once: the page cache copies run on every core (cp runs on one), up to
/// a few (beyond that the target's inode lock is the limit); one for a small copy.
fn workers_for(data: u64) -> usize {
    if data < 4 * PIECE {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// `done` of `data` bytes, as a share of `size`: progress over the whole volume.
fn scale(done: u64, data: u64, size: u64) -> u64 {
    match data {
        0 => size,
        _ => (u128::from(done) * u128::from(size) / u128::from(data)) as u64,
    }
}

/// The data segments of `file` up to `size` (SEEK_DATA / SEEK_HOLE), cut into pieces of at
/// most [`PIECE`].
fn data_pieces(file: &File, size: u64) -> io::Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let Some(data) = file::next_data(file, offset)? else {
            break; // only a hole is left
        };
        let end = file::next_hole(file, data)?.unwrap_or(size).min(size);
        let mut piece = data;
        while piece < end {
            let piece_end = end.min(piece + PIECE);
            pieces.push((piece, piece_end));
            piece = piece_end;
        }
        offset = end.max(data + 1);
    }
    Ok(pieces)
}

/// Consecutive runs of `pieces` of at most `limit` bytes (at least one piece each).
fn batches(pieces: &[Piece], limit: u64) -> Vec<&[Piece]> {
    let mut batches = Vec::new();
    let (mut first, mut bytes) = (0, 0);
    for (i, (start, end)) in pieces.iter().enumerate() {
        if i > first && bytes + (end - start) > limit {
            batches.push(&pieces[first..i]);
            (first, bytes) = (i, 0);
        }
        bytes += end - start;
    }
    if first < pieces.len() {
        batches.push(&pieces[first..]);
    }
    batches
}

/// One copy's files, shared by its worker threads.
struct Copier {
    from: File,
    to: File,
    /// Cleared when the file system cannot copy_file_range: pieces are then copied by hand.
    in_kernel: AtomicBool,
}

impl Copier {
    fn new(from: File, target: &Path) -> io::Result<Self> {
        Ok(Copier {
            from,
            to: std::fs::OpenOptions::new().write(true).open(target)?,
            in_kernel: AtomicBool::new(true),
        })
    }

    /// Copies `pieces` with `workers` threads, telling `progress` the bytes done. A copy of
    /// more than `window` bytes goes in batches of half of it: once a batch is copied its
    /// write-out starts and the previous batch's is waited for, so at most `window` bytes are
    /// ever written but not on storage.
    fn copy(
        &self,
        pieces: &[Piece],
        window: u64,
        workers: usize,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let data: u64 = pieces.iter().map(|(start, end)| end - start).sum();
        let mut done = 0;
        let mut writing_out: Option<&[Piece]> = None;
        for batch in batches(pieces, window / 2) {
            self.copy_batch(batch, workers, &mut |bytes| {
                done += bytes;
                progress(done);
            })?;
            if data > window {
                for &(start, end) in batch {
                    start_write_out(&self.to, start, end);
                }
                for &(start, end) in writing_out.replace(batch).unwrap_or_default() {
                    finish_write_out(&self.to, start, end)?;
                }
            }
        }
        Ok(())
    }

    /// Copies `batch` with `workers` threads (this one among them, the one that reports).
    fn copy_batch(
        &self,
        batch: &[Piece],
        workers: usize,
        report: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let next = AtomicUsize::new(0);
        let copied = AtomicU64::new(0);
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..workers)
                .map(|_| scope.spawn(|| self.work(batch, &next, &copied, &mut || {})))
                .collect();
            let mine = self.work(batch, &next, &copied, &mut || {
                report(copied.swap(0, Ordering::Relaxed))
            });
            let theirs = helpers.into_iter().map(|helper| {
                helper
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a copy thread panicked")))
            });
            let all: io::Result<Vec<()>> = std::iter::once(mine).chain(theirs).collect();
            report(copied.swap(0, Ordering::Relaxed));
            all.map(drop)
        })
    }

    /// Copies pieces of `batch` until none is left (or one fails, which stops the others).
    fn work(
        &self,
        batch: &[Piece],
        next: &AtomicUsize,
        copied: &AtomicU64,
        tick: &mut dyn FnMut(),
    ) -> io::Result<()> {
        loop {
            let Some(&(start, end)) = batch.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            if let Err(e) = self.copy_piece(start, end) {
                next.store(batch.len(), Ordering::Relaxed);
                return Err(e);
            }
            copied.fetch_add(end - start, Ordering::Relaxed);
            tick();
        }
    }

    fn copy_piece(&self, start: u64, end: u64) -> io::Result<()> {
        if self.in_kernel.load(Ordering::Relaxed) {
            if copy_in_kernel(&self.from, &self.to, start, end)? {
                return Ok(());
            }
            self.in_kernel.store(false, Ordering::Relaxed);
        }
        copy_by_hand(&self.from, &self.to, start, end)
    }
}

/// Copies `start..end` with copy_file_range; false (nothing copied) when the file system or
/// kernel cannot, so the caller copies by hand.
fn copy_in_kernel(from: &File, to: &File, start: u64, end: u64) -> io::Result<bool> {
    let (mut from_offset, mut to_offset) = (start, start);
    while from_offset < end {
        let len = (end - from_offset) as usize;
        let copied = match file::copy_range(from, &mut from_offset, to, &mut to_offset, len) {
            Ok(copied) => copied,
            Err(err) => {
                let unsupported = matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                );
                if unsupported && from_offset == start {
                    return Ok(false);
                }
                return Err(err);
            }
        };
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
/// [`finish_write_out`] and the final fdatasync, which report any write error: a failure here
/// changes nothing.
fn start_write_out(to: &File, start: u64, end: u64) {
    let _ = file::start_write_out(to, start, end - start);
}

/// Starts writing out all of `file` that is dirty, for copies made through an image format
/// (whose layout is not the caller's to know): the same head start as each piece gets here.
pub fn start_write_out_all(to: &File) {
    // A length of 0 means up to the end of the file.
    let _ = file::start_write_out(to, 0, 0);
}

/// Waits until `start..end` is written out and drops it from the page cache: the copy keeps
/// only a window of dirty pages, so it never runs into the kernel's dirty-page throttling.
fn finish_write_out(to: &File, start: u64, end: u64) -> io::Result<()> {
    file::finish_write_out(to, start, end - start)?;
    // Advice only: pages that stay cached cost memory, not correctness.
    let _ = file::dont_need(to, start, end - start);
    Ok(())
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
        copy_raw(File::open(&from).unwrap(), &to, SIZE, &mut |done, total| {
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
        copy_raw(File::open(&from).unwrap(), &to, SIZE, &mut |_, _| {}).unwrap();
        assert_eq!(read(&to, 0, 4096), [1u8; 4096]);
        let from_file = File::open(&from).unwrap();
        let to_file = std::fs::OpenOptions::new().write(true).open(&to).unwrap();
        assert!(copy_in_kernel(&from_file, &to_file, 0, 8192).is_err());
    }

    #[test]
    fn any_window_and_any_number_of_threads_copy_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let (from, data) = source(dir.path());
        let pieces = data_pieces(&File::open(&from).unwrap(), SIZE).unwrap();
        assert_eq!(
            pieces,
            [
                (1 << 20, 9 << 20),
                (9 << 20, 17 << 20),
                (17 << 20, 21 << 20),
                (SIZE - 4096, SIZE)
            ]
        );
        let total: u64 = pieces.iter().map(|(s, e)| e - s).sum();
        for (window, workers) in [(0, 1), (PIECE, 2), (WINDOW, 3), (0, 4)] {
            let to = empty_target(dir.path());
            let copier = Copier::new(File::open(&from).unwrap(), &to).unwrap();
            let mut reports = Vec::new();
            copier
                .copy(&pieces, window, workers, &mut |done| reports.push(done))
                .unwrap();
            let case = format!("window {window}, {workers} threads: {reports:?}");
            assert_eq!(reports.last(), Some(&total), "{case}");
            assert!(reports.windows(2).all(|w| w[0] <= w[1]), "{case}");
            assert_eq!(read(&to, 1 << 20, data.len()), data, "{case}");
            assert_eq!(read(&to, SIZE - 4096, 4096), [0xAB; 4096]);
            assert_eq!(read(&to, 32 << 20, 4096), [0; 4096]);
            std::fs::remove_file(&to).unwrap();
        }
    }

    #[test]
    fn batches_stay_under_their_limit_unless_one_piece_is_larger() {
        let pieces = [(0, 4), (4, 8), (10, 20), (30, 31)];
        let sizes =
            |limit| -> Vec<usize> { batches(&pieces, limit).iter().map(|b| b.len()).collect() };
        assert_eq!(sizes(0), [1, 1, 1, 1]);
        assert_eq!(sizes(8), [2, 1, 1]);
        assert_eq!(sizes(11), [2, 2]);
        assert_eq!(sizes(100), [4]);
        assert!(batches(&[], 8).is_empty());
        assert_eq!(scale(5, 10, 100), 50);
        assert_eq!(scale(0, 0, 100), 100);
    }

    #[test]
    fn a_failing_piece_stops_the_copy_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let (from, _) = source(dir.path());
        let to = empty_target(dir.path());
        let copier = Copier::new(File::open(&from).unwrap(), &to).unwrap();
        // Past the source's end: copy_file_range copies nothing there.
        let pieces = [(1 << 20, 2 << 20), (SIZE, SIZE + 4096), (2 << 20, 3 << 20)];
        let err = copier.copy(&pieces, WINDOW, 2, &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
