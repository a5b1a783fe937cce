//! TAP devices: attaching a /dev/net/tun file to a device, its per-file settings (queue
//! attachment, virtio-net header size, offloads, persistence), and persistent devices made and
//! removed by name. The one TAP setup for the VMM, the daemon and the tests. Functions act on
//! the file given and may be called from any thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::ifname::{self, InvalidName};

/// TUNSETIFF flags (`linux/if_tun.h`); the kernel field is 16 bits wide.
pub mod flags {
    pub const TUN: u16 = libc::IFF_TUN as u16;
    pub const TAP: u16 = libc::IFF_TAP as u16;
    pub const NO_PI: u16 = libc::IFF_NO_PI as u16;
    pub const VNET_HDR: u16 = libc::IFF_VNET_HDR as u16;
    pub const MULTI_QUEUE: u16 = libc::IFF_MULTI_QUEUE as u16;
    /// Fail with EBUSY when an interface of that name exists already.
    pub const EXCLUSIVE: u16 = libc::IFF_TUN_EXCL as u16;
}

/// Offload flags for [`set_offload`] (`TUN_F_*`).
pub mod offload {
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
}

/// A TAP call that failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to TAP device {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {op} failed")]
    Configure {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl TapError {
    /// The errno behind the failure, if the kernel gave one.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            TapError::OpenTun(source)
            | TapError::Attach { source, .. }
            | TapError::Configure { source, .. } => source.raw_os_error(),
            TapError::InvalidName(_) => None,
        }
    }
}

fn configure_err(op: &'static str) -> TapError {
    TapError::Configure {
        op,
        source: io::Error::last_os_error(),
    }
}

/// An ifreq naming `name` (checked to leave the last byte NUL) with `flags`.
fn ifreq(name: &str, flags: u16) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

/// A new /dev/net/tun file (close-on-exec; non-blocking when asked) attached to device
/// `name` with `flags`, creating the device if it does not exist.
pub fn attach(name: &str, flags: u16, nonblocking: bool) -> Result<File, TapError> {
    ifname::check(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 })
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, for the call's duration.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(TapError::Attach {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Attaches (`on`) or detaches this queue of a multi-queue device (TUNSETQUEUE).
pub fn set_queue_attached(tap: impl AsFd, on: bool) -> Result<(), TapError> {
    let flags = if on {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    };
    let req = ifreq("", flags as u16);
    // SAFETY: TUNSETQUEUE reads one ifreq, which `req` is, for the call's duration.
    if unsafe { libc::ioctl(tap.as_fd().as_raw_fd(), libc::TUNSETQUEUE, &req) } < 0 {
        return Err(configure_err("queue switch"));
    }
    Ok(())
}

/// The flags the kernel holds for this file (TUNGETIFF); a detached queue has
/// `IFF_DETACH_QUEUE` set.
pub fn queue_attached(tap: impl AsFd) -> Result<bool, TapError> {
    let mut req = ifreq("", 0);
    // SAFETY: TUNGETIFF writes one ifreq, which `req` is, for the call's duration.
    if unsafe { libc::ioctl(tap.as_fd().as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
        return Err(configure_err("flag read"));
    }
    // SAFETY: TUNGETIFF filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_DETACH_QUEUE as libc::c_short == 0)
}

/// Sets the virtio-net header length the device puts before each packet.
pub fn set_vnet_header_size(tap: impl AsFd, size: i32) -> Result<(), TapError> {
    let size: libc::c_int = size;
    // SAFETY: TUNSETVNETHDRSZ reads an int, which `size` is, for the call's duration.
    if unsafe { libc::ioctl(tap.as_fd().as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(configure_err("vnet header size"));
    }
    Ok(())
}

/// Tells the kernel which offloads the reader can take (see [`offload`]).
pub fn set_offload(tap: impl AsFd, flags: u32) -> Result<(), TapError> {
    let arg = libc::c_ulong::from(flags);
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    if unsafe { libc::ioctl(tap.as_fd().as_raw_fd(), libc::TUNSETOFFLOAD, arg) } < 0 {
        return Err(configure_err("offload"));
    }
    Ok(())
}

/// Keeps the device when its last file closes (`true`), or lets it go with it.
pub fn set_persistent(tap: impl AsFd, persistent: bool) -> Result<(), TapError> {
    let arg = libc::c_ulong::from(persistent);
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
    if unsafe { libc::ioctl(tap.as_fd().as_raw_fd(), libc::TUNSETPERSIST, arg) } < 0 {
        return Err(configure_err("persistence"));
    }
    Ok(())
}

/// Sets IFF_UP on interface `name` (SIOCGIFFLAGS, then SIOCSIFFLAGS).
pub fn bring_up(name: &str) -> Result<(), TapError> {
    ifname::check(name)?;
    let socket = rustix::net::socket_with(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| TapError::Configure {
        op: "socket",
        source: e.into(),
    })?;
    let mut req = ifreq(name, 0);
    // SAFETY: SIOCGIFFLAGS fills the ifreq we pass for the call's duration.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(configure_err("flag read"));
    }
    // SAFETY: SIOCGIFFLAGS set the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass for the call's duration.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(configure_err("bring up"));
    }
    Ok(())
}

/// The flags of a multi-queue TAP device with virtio-net headers, as the VMM opens them.
pub const MULTI_QUEUE_VNET: u16 = flags::TAP | flags::NO_PI | flags::VNET_HDR | flags::MULTI_QUEUE;

/// Creates persistent multi-queue TAP device `name` (down, no address), as `ip tuntap add
/// NAME mode tap multi_queue vnet_hdr` does; `exclusive` fails (EBUSY) if `name` exists.
pub fn create_persistent(name: &str, exclusive: bool) -> Result<(), TapError> {
    let extra = if exclusive { flags::EXCLUSIVE } else { 0 };
    set_persistent(attach(name, MULTI_QUEUE_VNET | extra, false)?, true)
}

/// Removes persistent multi-queue TAP device `name` (it goes once no VMM holds a queue).
pub fn delete_persistent(name: &str) -> Result<(), TapError> {
    set_persistent(attach(name, MULTI_QUEUE_VNET, false)?, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::in_new_netns;

    #[test]
    fn a_persistent_device_is_made_switched_and_removed() {
        in_new_netns(|| {
            create_persistent("fhs0", true).unwrap();
            assert!(ifname::exists("fhs0"));
            let err = create_persistent("fhs0", true).unwrap_err();
            assert_eq!(err.os_error(), Some(libc::EBUSY), "{err}");
            let queue = attach("fhs0", MULTI_QUEUE_VNET, true).unwrap();
            set_vnet_header_size(&queue, 12).unwrap();
            set_offload(&queue, offload::CSUM | offload::TSO4).unwrap();
            assert!(queue_attached(&queue).unwrap());
            set_queue_attached(&queue, false).unwrap();
            assert!(!queue_attached(&queue).unwrap());
            set_queue_attached(&queue, true).unwrap();
            assert!(queue_attached(&queue).unwrap());
            bring_up("fhs0").unwrap();
            drop(queue);
            delete_persistent("fhs0").unwrap();
            assert!(!ifname::exists("fhs0"));
        });
    }

    #[test]
    fn a_bad_name_is_refused_before_any_call() {
        let err = attach("bad/name", MULTI_QUEUE_VNET, false).unwrap_err();
        assert!(matches!(err, TapError::InvalidName(_)), "{err}");
        assert_eq!(err.os_error(), None);
        assert!(matches!(bring_up(""), Err(TapError::InvalidName(_))));
    }
}
