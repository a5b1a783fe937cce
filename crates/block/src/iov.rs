//! Guest buffers as iovecs for vectored system calls.

use std::io;

use vm_memory::VolatileSlice;

/// Total length of `buffers`.
pub fn slices_len(buffers: &[VolatileSlice<'_, ()>]) -> u64 {
    buffers.iter().map(|b| b.len() as u64).sum()
}

/// A list of guest buffers that can be consumed piece by piece, from the front. Consuming
/// moves a cursor (no buffer is shifted), so using up n buffers costs O(n) however they are
/// taken.
#[derive(Debug)]
pub struct Slices<'a> {
    slices: Vec<VolatileSlice<'a, ()>>,
    /// Index of the first buffer not used up yet; `slices[first]` may be partly consumed.
    first: usize,
    /// Bytes left.
    len: u64,
}

impl<'a> Slices<'a> {
    pub fn new(buffers: &[VolatileSlice<'a, ()>]) -> Self {
        let slices: Vec<_> = buffers.iter().filter(|s| !s.is_empty()).copied().collect();
        Slices {
            len: slices_len(&slices),
            slices,
            first: 0,
        }
    }

    /// The buffers not used up yet.
    fn rest(&self) -> &[VolatileSlice<'a, ()>] {
        self.slices.get(self.first..).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Drops the first `count` bytes.
    pub fn advance(&mut self, count: usize) -> io::Result<()> {
        if count as u64 > self.len {
            return Err(io::Error::other("advanced past the end of the buffers"));
        }
        self.take_with(count as u64, |_| {})
    }

    /// Splits off the first `count` bytes (or fewer, if that is all there is).
    pub fn take(&mut self, count: u64) -> io::Result<Vec<VolatileSlice<'a, ()>>> {
        let mut taken = Vec::new();
        self.take_with(count.min(self.len), |slice| taken.push(slice))?;
        Ok(taken)
    }

    /// Consumes `count` bytes (at most what is left), handing each piece to `each`.
    fn take_with(
        &mut self,
        count: u64,
        mut each: impl FnMut(VolatileSlice<'a, ()>),
    ) -> io::Result<()> {
        let mut left = count;
        while left > 0 {
            let Some(first) = self.slices.get_mut(self.first) else {
                break;
            };
            let len = first.len() as u64;
            if len <= left {
                each(*first);
                self.first += 1;
                left -= len;
                self.len -= len;
            } else {
                each(first.subslice(0, left as usize).map_err(io::Error::other)?);
                *first = first.offset(left as usize).map_err(io::Error::other)?;
                self.len -= left;
                left = 0;
            }
        }
        Ok(())
    }

    /// Runs a vectored system call on (up to 1024 of) the buffers; `call` gets the iovecs and
    /// returns the bytes it transferred.
    pub fn with_iovecs<F>(&self, call: F) -> io::Result<usize>
    where
        F: FnOnce(&[libc::iovec]) -> isize,
    {
        const IOV_MAX: usize = 1024;
        let guards: Vec<_> = self
            .rest()
            .iter()
            .take(IOV_MAX)
            .map(|s| s.ptr_guard_mut())
            .collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(self.rest())
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

/// Fills guest buffers with zeroes, from a fixed buffer (a guest buffer may be gigabytes).
pub fn zero_fill(buffers: &[VolatileSlice<'_, ()>]) {
    static ZEROES: [u8; 4096] = [0; 4096];
    for slice in buffers {
        let mut rest = *slice;
        while !rest.is_empty() {
            let n = rest.len().min(ZEROES.len());
            rest.copy_from(&ZEROES[..n]);
            match rest.offset(n) {
                Ok(next) => rest = next,
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One single-byte slice per byte of `bytes`.
    fn byte_slices(bytes: &mut [u8]) -> Vec<VolatileSlice<'_, ()>> {
        bytes.chunks_mut(1).map(VolatileSlice::from).collect()
    }

    #[test]
    fn a_long_list_is_taken_and_advanced_piece_by_piece() {
        // As many buffers as the longest indirect chain has descriptors.
        let mut bytes: Vec<u8> = (0..65535u32).map(|i| i as u8).collect();
        let buffers = byte_slices(&mut bytes);
        let mut slices = Slices::new(&buffers);
        assert_eq!(slices.len(), 65535);
        slices.advance(10).unwrap();
        let two = slices.take(2).unwrap();
        assert_eq!(two.len(), 2);
        let mut first = [0u8; 1];
        two[0].copy_to(&mut first);
        assert_eq!(first, [10]);
        // All but the last byte, then the last, then nothing.
        let most = slices.take(slices.len() - 1).unwrap();
        assert_eq!(most.len(), 65535 - 13);
        assert_eq!(slices.len(), 1);
        let last = slices.take(100).unwrap();
        let mut byte = [0u8; 1];
        last[0].copy_to(&mut byte);
        assert_eq!(byte, [(65534 % 256) as u8]);
        assert!(slices.is_empty());
        assert!(slices.take(1).unwrap().is_empty());
        assert!(slices.advance(1).is_err());
    }

    #[test]
    fn a_buffer_is_split_where_a_take_ends() {
        let mut bytes = [1u8; 100];
        let buffers = [VolatileSlice::from(&mut bytes[..])];
        let mut slices = Slices::new(&buffers);
        slices.advance(30).unwrap();
        let taken = slices.take(50).unwrap();
        assert_eq!((taken.len(), taken[0].len()), (1, 50));
        assert_eq!(slices.len(), 20);
        let n = slices.with_iovecs(|iov| iov.iter().map(|v| v.iov_len as isize).sum());
        assert_eq!(n.unwrap(), 20);
        zero_fill(&slices.take(20).unwrap());
        assert_eq!(bytes[..80], [1u8; 80]);
        assert_eq!(bytes[80..], [0u8; 20]);
    }
}
