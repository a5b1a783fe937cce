//! Socket calls std lacks: sending without waiting and binding to a device. Any thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use rustix::net::SendFlags;

/// Sends what fits of `buf` now (MSG_DONTWAIT), never raising SIGPIPE (MSG_NOSIGNAL) even on
/// a blocking socket; returns the bytes sent, WouldBlock when none fit.
pub fn send_now(socket: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        socket,
        buf,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?)
}

/// Makes packets from `socket` leave through interface `device` (SO_BINDTODEVICE).
pub fn bind_to_device(socket: impl AsFd, device: &str) -> io::Result<()> {
    crate::ifname::check(device).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: setsockopt reads `device.len()` bytes from the live string slice.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            device.as_ptr().cast(),
            device.len() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `info` with the kernel's `struct tcp_info` for `stream` (as much as fits; kernels
/// differ in its length) and returns the length written.
pub fn tcp_info(stream: &std::net::TcpStream, info: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(info.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that long, and
    // stores the length it wrote in `len`; both live across the call.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_full_socket_refuses_at_once_and_a_closed_one_raises_no_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        let chunk = [0u8; 65536];
        let mut sent = 0;
        let err = loop {
            match send_now(&a, &chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(sent > 0);
        drop(b);
        let err = send_now(&a, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn tcp_info_of_a_connection_is_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut info = [0u8; 256];
        let len = tcp_info(&stream, &mut info).unwrap();
        assert!(len >= 104, "tcp_info is at least 104 bytes long: {len}");
        assert_eq!(info[0], 1, "tcpi_state is TCP_ESTABLISHED");
    }

    #[test]
    fn binding_to_loopback_works_and_a_bad_name_is_refused() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        bind_to_device(&socket, "lo").unwrap();
        let err = bind_to_device(&socket, "bad/name").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
