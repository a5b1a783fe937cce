//! Persistent multi-queue TAP devices on the test host, as `ip tuntap add NAME mode tap
//! multi_queue vnet_hdr` makes them (the testbed's busybox has no `ip tuntap`, and its
//! `tunctl` makes single-queue devices only).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

const FLAGS: libc::c_int =
    libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// Opens a queue of multi-queue TAP `name` (creating the device) and sets its persistence.
fn set_persistent(name: &str, persistent: bool) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `request` is, for the call's duration.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes a plain integer argument.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persistent),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates persistent multi-queue TAP device `name` (down, no address).
pub fn create_multi_queue(name: &str) -> io::Result<()> {
    set_persistent(name, true)
}

/// Removes multi-queue TAP device `name` (once no VMM holds a queue of it).
pub fn delete_multi_queue(name: &str) -> io::Result<()> {
    set_persistent(name, false)
}
