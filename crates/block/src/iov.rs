//! Guest buffers as iovecs for vectored system calls.

use std::io;

use vm_memory::VolatileSlice;

/// Total length of `buffers`.
pub fn slices_len(buffers: &[VolatileSlice<'_, ()>]) -> u64 {
    buffers.iter().map(|b| b.len() as u64).sum()
}

/// A list of guest buffers that can be consumed piece by piece.
#[derive(Debug)]
pub struct Slices<'a> {
    slices: Vec<VolatileSlice<'a, ()>>,
}

impl<'a> Slices<'a> {
    pub fn new(buffers: &[VolatileSlice<'a, ()>]) -> Self {
        Slices {
            slices: buffers.iter().filter(|s| !s.is_empty()).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    pub fn len(&self) -> u64 {
        slices_len(&self.slices)
    }

    /// Drops the first `count` bytes.
    pub fn advance(&mut self, mut count: usize) -> io::Result<()> {
        while count > 0 {
            let Some(first) = self.slices.first_mut() else {
                return Err(io::Error::other("advanced past the end of the buffers"));
            };
            if count < first.len() {
                *first = first.offset(count).map_err(io::Error::other)?;
                return Ok(());
            }
            count -= first.len();
            self.slices.remove(0);
        }
        Ok(())
    }

    /// Splits off the first `count` bytes (or fewer, if that is all there is).
    pub fn take(&mut self, count: u64) -> io::Result<Vec<VolatileSlice<'a, ()>>> {
        let mut taken = Vec::new();
        let mut left = count;
        while left > 0 {
            let Some(first) = self.slices.first().copied() else {
                break;
            };
            let len = first.len() as u64;
            if len <= left {
                taken.push(first);
                self.slices.remove(0);
                left -= len;
            } else {
                let head = first.subslice(0, left as usize).map_err(io::Error::other)?;
                taken.push(head);
                self.slices[0] = first.offset(left as usize).map_err(io::Error::other)?;
                left = 0;
            }
        }
        Ok(taken)
    }

    /// Runs a vectored system call on (up to 1024 of) the buffers; `call` gets the iovecs and
    /// returns the bytes it transferred.
    pub fn with_iovecs<F>(&self, call: F) -> io::Result<usize>
    where
        F: FnOnce(&[libc::iovec]) -> isize,
    {
        const IOV_MAX: usize = 1024;
        let guards: Vec<_> = self
            .slices
            .iter()
            .take(IOV_MAX)
            .map(|s| s.ptr_guard_mut())
            .collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(&self.slices)
            .map(|(guard, slice)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            })
            .collect();
        // The guards keep every pointer valid until the call returns.
        let ret = call(&iovecs);
        drop(guards);
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }
}

/// Direction of a vectored file transfer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Read,
    Write,
}

/// Moves all of `buffers` from or to `file` at `offset`, resuming after short transfers and
/// interruptions; a read past the end of the file zeroes the rest.
fn transfer(
    file: &std::fs::File,
    mut offset: u64,
    buffers: &[VolatileSlice<'_, ()>],
    direction: Transfer,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut slices = Slices::new(buffers);
    while !slices.is_empty() {
        let n = slices.with_iovecs(|iov| {
            let (ptr, count, at) = (
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            );
            match direction {
                // SAFETY: the iovecs point at guest buffers kept alive by `with_iovecs`.
                Transfer::Read => unsafe { libc::preadv(fd, ptr, count, at) },
                // SAFETY: as above; the kernel only reads from them.
                Transfer::Write => unsafe { libc::pwritev(fd, ptr, count, at) },
            }
        });
        match n {
            Ok(0) if direction == Transfer::Read => zero_fill(&slices.take(slices.len())?),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the image took no data",
                ))
            }
            Ok(n) => {
                slices.advance(n)?;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads `buffers.len()` bytes of `file` at `offset` into guest buffers; bytes past the end of
/// the file read as zeroes.
pub fn read_file_at(
    file: &std::fs::File,
    offset: u64,
    buffers: &[VolatileSlice<'_, ()>],
) -> io::Result<()> {
    transfer(file, offset, buffers, Transfer::Read)
}

/// Writes guest buffers to `file` at `offset`.
pub fn write_file_at(
    file: &std::fs::File,
    offset: u64,
    buffers: &[VolatileSlice<'_, ()>],
) -> io::Result<()> {
    transfer(file, offset, buffers, Transfer::Write)
}

/// Fills guest buffers with zeroes.
pub fn zero_fill(buffers: &[VolatileSlice<'_, ()>]) {
    for slice in buffers {
        slice.copy_from(&vec![0u8; slice.len()]);
    }
}
