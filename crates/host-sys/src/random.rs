//! Random bytes from the kernel's `getrandom` system call itself, never from a file: a
//! confined VMM thread may make that call but may not open `/dev/urandom` (which the
//! `getrandom` crate falls back to in a static build, where it cannot find the C library's
//! wrapper).

use std::io;

use rustix::rand::{getrandom, GetRandomFlags};

/// Fills `buf` with random bytes (blocking only until the kernel's pool is first seeded).
pub fn fill(mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match getrandom(&mut *buf, GetRandomFlags::empty()) {
            Ok(0) => return Err(io::Error::other("getrandom returned no bytes")),
            Ok(n) => buf = &mut buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_large_buffers_whole() {
        let mut buf = vec![0u8; 1 << 20];
        fill(&mut buf).unwrap();
        // 1 MiB of zeros from a working source is not going to happen.
        assert!(buf.iter().any(|&b| b != 0));
        let mut empty = [0u8; 0];
        fill(&mut empty).unwrap();
    }
}
