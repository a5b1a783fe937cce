//! File calls std lacks: in-kernel copies, hole punching, sparse seeks, write-out control,
//! open file description locks, file system space, no-replace renames, descriptor flags.
//! These are thin: each returns the kernel's `io::Error`, whose errno callers match on (an
//! unsupported call falls back to plain reads and writes). Any thread.

use std::io;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use rustix::fs::{Advice, FallocateFlags, OFlags, RenameFlags, SeekFrom, CWD};

/// Copies up to `len` bytes from `from` at `*from_offset` to `to` at `*to_offset` in the
/// kernel (copy_file_range), advancing both offsets; returns the bytes copied (0 at EOF).
pub fn copy_range(
    from: impl AsFd,
    from_offset: &mut u64,
    to: impl AsFd,
    to_offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    Ok(rustix::fs::copy_file_range(
        from,
        Some(from_offset),
        to,
        Some(to_offset),
        len,
    )?)
}

/// Deallocates `offset..offset + len` (reads give zeroes), keeping the file's size.
pub fn punch_hole(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    Ok(rustix::fs::fallocate(file, mode, offset, len)?)
}

/// Zeroes `offset..offset + len` keeping it allocated, keeping the file's size.
pub fn zero_range(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
    Ok(rustix::fs::fallocate(file, mode, offset, len)?)
}

/// The first byte of data at or after `offset` (SEEK_DATA); None when only a hole follows.
pub fn next_data(file: impl AsFd, offset: u64) -> io::Result<Option<u64>> {
    sparse_seek(file, SeekFrom::Data(offset))
}

/// The first byte of a hole at or after `offset` (SEEK_HOLE; the end of file counts as one).
pub fn next_hole(file: impl AsFd, offset: u64) -> io::Result<Option<u64>> {
    sparse_seek(file, SeekFrom::Hole(offset))
}

fn sparse_seek(file: impl AsFd, to: SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, to) {
        Ok(pos) => Ok(Some(pos)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Starts writing the dirty pages of `start..start + len` (0: to the end) without waiting.
pub fn start_write_out(file: impl AsFd, start: u64, len: u64) -> io::Result<()> {
    sync_file_range(file, start, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Writes out `start..start + len` and waits until it is on disk (data only, no metadata).
pub fn finish_write_out(file: impl AsFd, start: u64, len: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    sync_file_range(file, start, len, flags)
}

fn sync_file_range(file: impl AsFd, start: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let (start, len) = (to_off(start)?, to_off(len)?);
    // SAFETY: sync_file_range on a descriptor borrowed for the call takes plain integers.
    if unsafe { libc::sync_file_range(file.as_fd().as_raw_fd(), start, len, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn to_off(value: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Tells the kernel `offset..offset + len` (0: to the end) will be read soon.
pub fn will_need(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fadvise(
        file,
        offset,
        NonZeroU64::new(len),
        Advice::WillNeed,
    )?)
}

/// Tells the kernel `offset..offset + len` (0: to the end) can leave the page cache.
pub fn dont_need(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fadvise(
        file,
        offset,
        NonZeroU64::new(len),
        Advice::DontNeed,
    )?)
}

/// Locks all of `file` with an open file description lock (F_OFD_SETLK, as QEMU uses):
/// exclusive for writers, shared for readers; it goes with the open file. Returns false when
/// another open file holds a conflicting lock. (rustix's fcntl_lock takes a process-owned
/// POSIX lock instead, which a second open of the same file in this process would not see.)
pub fn lock(file: impl AsFd, exclusive: bool) -> io::Result<bool> {
    let kind = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    let flock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // the whole file, however large it grows
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads a valid, initialised flock; the fd is borrowed for the call.
    if unsafe { libc::fcntl(file.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &flock) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Capacity and free bytes (for unprivileged users) of the file system holding `path`.
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(path)?;
    Ok((stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize))
}

/// Renames `from` to `to`, failing (EEXIST) rather than replacing an existing `to`.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        CWD,
        from,
        CWD,
        to,
        RenameFlags::NOREPLACE,
    )?)
}

/// Makes a FIFO at `path` with permission bits `mode`.
pub fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    let mode = rustix::fs::Mode::from_raw_mode(mode);
    Ok(rustix::fs::mknodat(
        CWD,
        path,
        rustix::fs::FileType::Fifo,
        mode,
        0,
    )?)
}

/// Makes reads and writes on `owner`'s descriptor return WouldBlock instead of waiting. Takes
/// [`AsRawFd`] for types that have no `AsFd` yet (vmm-sys-util's TimerFd).
pub fn set_nonblocking(owner: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: `owner` is borrowed for this call, so its descriptor stays open for it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(owner.as_raw_fd()) };
    let flags = rustix::fs::fcntl_getfl(fd)?;
    Ok(rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)?)
}

/// Points this process's standard error at `file` (dup2 onto descriptor 2).
pub fn redirect_stderr(file: impl AsFd) -> io::Result<()> {
    Ok(rustix::stdio::dup2_stderr(file)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    fn sparse_file(dir: &Path) -> File {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("sparse"))
            .unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[7; 4096], 1 << 20).unwrap();
        file
    }

    #[test]
    fn sparse_seeks_find_data_and_holes_and_punching_makes_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse_file(dir.path());
        let Some(data) = next_data(&file, 0).unwrap() else {
            panic!("data was written");
        };
        if data == 0 {
            eprintln!("skipped: this file system reports no holes");
            return;
        }
        assert_eq!(data, 1 << 20);
        assert_eq!(next_hole(&file, data).unwrap(), Some((1 << 20) + 4096));
        assert_eq!(next_data(&file, 2 << 20).unwrap(), None);
        punch_hole(&file, 1 << 20, 4096).unwrap();
        assert_eq!(next_data(&file, 0).unwrap(), None);
        assert_eq!(file.metadata().unwrap().len(), 4 << 20, "the size is kept");
        file.write_all_at(&[7; 4096], 0).unwrap();
        zero_range(&file, 0, 4096).unwrap();
        let mut back = [1u8; 4096];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_copy_in_the_kernel_moves_bytes_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let from = sparse_file(dir.path());
        let to = File::create(dir.path().join("to")).unwrap();
        let (mut from_offset, mut to_offset) = (1 << 20, 10);
        let copied = copy_range(&from, &mut from_offset, &to, &mut to_offset, 100).unwrap();
        assert_eq!(copied, 100);
        assert_eq!((from_offset, to_offset), ((1 << 20) + 100, 110));
        let written = std::fs::read(dir.path().join("to")).unwrap();
        assert_eq!(&written[10..110], &[7; 100]);
        start_write_out(&to, 0, 0).unwrap();
        finish_write_out(&to, 0, 110).unwrap();
        dont_need(&to, 0, 110).unwrap();
        will_need(&from, 0, 0).unwrap();
    }

    #[test]
    fn an_ofd_lock_is_seen_by_a_second_open_in_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let first = File::create(&path).unwrap();
        let second = File::open(&path).unwrap();
        assert!(lock(&first, true).unwrap());
        assert!(!lock(&second, false).unwrap(), "exclusive excludes readers");
        drop(first);
        assert!(lock(&second, false).unwrap(), "the lock went with its file");
        let third = File::open(&path).unwrap();
        assert!(lock(&third, false).unwrap(), "readers share");
    }

    #[test]
    fn renames_fifos_flags_and_space() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let err = rename_no_replace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_file(&b).unwrap();
        rename_no_replace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "a");

        let fifo = dir.path().join("fifo");
        make_fifo(&fifo, 0o600).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(fifo.metadata().unwrap().file_type().is_fifo());

        let (reader, _writer) = std::io::pipe().unwrap();
        set_nonblocking(&reader).unwrap();
        let mut buf = [0u8; 1];
        let err = std::io::Read::read(&mut &reader, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        let (total, free) = fs_space(dir.path()).unwrap();
        assert!(total > 0 && free <= total);
    }
}
