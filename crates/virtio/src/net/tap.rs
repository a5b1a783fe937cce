//! TAP devices: the host end of a guest NIC, opened with a virtio-net header on every packet so
//! checksum and segmentation offloads pass through.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload flags for [`Tap::set_offload`].
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// Why a TAP device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?} (1 to 15 characters, no '/', ':' or whitespace)")]
    InvalidName(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to TAP device {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP device {name} has one queue; {wanted} queue pairs need one created with `ip tuntap add {name} mode tap multi_queue`")]
    SingleQueue { name: String, wanted: usize },
    #[error("interface {0} exists and is not a TAP device")]
    NotTap(String),
    #[error("cannot configure TAP device {name}")]
    Configure {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Ferro created the device: it disappears when the last file on it closes.
    created: bool,
    /// Whether this queue is attached (takes packets); a queue opened is attached.
    attached: AtomicBool,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// Checks a Linux interface name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Whether network interface `name` exists in this thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

fn is_einval(e: &TapError) -> bool {
    matches!(e, TapError::Attach { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
}

/// A new /dev/net/tun file attached to device `name` with `flags`.
fn attach(name: &str, flags: libc::c_short) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, for the call's duration.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(TapError::Attach {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

impl Tap {
    /// Attaches to TAP device `name`, creating it (and bringing it up) if it does not exist.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut queues = Self::open_queues(name, 1, false)?;
        Ok(queues.remove(0))
    }

    /// Opens `queues` queues of TAP device `name` (one file each), creating the device (and
    /// bringing it up) if it does not exist; a new device is multi-queue. An existing
    /// single-queue device gives one queue when `fewer_ok`, an error otherwise.
    pub fn open_queues(name: &str, queues: usize, fewer_ok: bool) -> Result<Vec<Self>, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let created = !interface_exists(name);
        let single_queue = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // A queue must be opened as the device was made: try multi-queue first. EINVAL comes
        // from an existing single-queue TAP device, and from an interface that is no TAP
        // device at all (a bridge, a TUN device), which refuses the single-queue try too.
        let (first, flags) = match attach(name, single_queue | IFF_MULTI_QUEUE) {
            Ok(file) => (file, single_queue | IFF_MULTI_QUEUE),
            Err(e) if is_einval(&e) => match attach(name, single_queue) {
                Err(e) if is_einval(&e) => return Err(TapError::NotTap(name.to_string())),
                // A single-queue TAP device (busy or not) cannot give the pairs asked for.
                _ if queues > 1 && !fewer_ok => {
                    return Err(TapError::SingleQueue {
                        name: name.to_string(),
                        wanted: queues,
                    })
                }
                Ok(file) => (file, single_queue),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let count = if flags & IFF_MULTI_QUEUE != 0 {
            queues.max(1)
        } else {
            1
        };
        let mut taps = Vec::with_capacity(count);
        let mut file = Some(first);
        for _ in 0..count {
            let tap = Tap {
                file: match file.take() {
                    Some(first) => first,
                    None => attach(name, flags)?,
                },
                name: name.to_string(),
                created,
                attached: AtomicBool::new(true),
            };
            tap.set_vnet_header_size(12)?;
            taps.push(tap);
        }
        if created {
            taps[0].bring_up()?;
        }
        Ok(taps)
    }

    /// Lets this queue of a multi-queue device carry packets (`on`) or takes it out of the
    /// device's queue selection: packets from the host only go to attached queues, and a queue
    /// detached loses what it held. A queue already so is left alone: each switch takes the
    /// host's rtnl lock, and a detach waits for an RCU grace period.
    pub fn set_queue_enabled(&self, on: bool) -> Result<(), TapError> {
        if self.attached.load(Ordering::Acquire) == on {
            return Ok(());
        }
        let mut req = ifreq("");
        req.ifr_ifru.ifru_flags = if on {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        // SAFETY: TUNSETQUEUE reads one ifreq, which `req` is, for the call's duration.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &req) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            // EINVAL also means the queue was already so: believe the kernel's own word.
            let already = error.raw_os_error() == Some(libc::EINVAL)
                && self.kernel_says_attached().ok() == Some(on);
            if !already {
                return Err(self.configure_err(error));
            }
        }
        self.attached.store(on, Ordering::Release);
        Ok(())
    }

    /// Whether the kernel has this queue attached (TUNGETIFF flags a detached one).
    fn kernel_says_attached(&self) -> io::Result<bool> {
        let mut req = ifreq("");
        // SAFETY: TUNGETIFF writes one ifreq, which `req` is, for the call's duration.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        Ok(flags & IFF_DETACH_QUEUE == 0)
    }

    /// Whether this queue takes packets from the host.
    pub fn queue_enabled(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether Ferro created the device (it goes away with Ferro).
    pub fn created(&self) -> bool {
        self.created
    }

    fn configure_err(&self, source: io::Error) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            source,
        }
    }

    fn set_vnet_header_size(&self, size: libc::c_int) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads an int for the call's duration.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(self.configure_err(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest can take (see [`offload`]).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if ret < 0 {
            return Err(self.configure_err(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn bring_up(&self) -> Result<(), TapError> {
        // SAFETY: a plain socket call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.configure_err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the ifreq we pass for the call's duration.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(self.configure_err(io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFFLAGS set the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq we pass for the call's duration.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(self.configure_err(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads one packet (virtio-net header first); None when nothing is waiting.
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(n as usize))
    }

    /// Reads one packet straight into iovecs (guest buffers); None when no packet is waiting.
    /// A packet longer than the buffers is cut short, so callers offer room for the largest.
    pub fn read_packet_into(&self, iovecs: &[libc::iovec]) -> isize {
        // SAFETY: the caller's iovecs point at writable memory valid for the call (see
        // block::Slices).
        unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        }
    }

    /// A TAP stand-in on any packet file (a datagram socket), for tests and fuzzing.
    pub fn from_file(file: File) -> Tap {
        Tap {
            file,
            name: "test".into(),
            created: false,
            attached: AtomicBool::new(true),
        }
    }

    /// Writes one packet given as iovecs (virtio-net header first).
    pub fn write_packet(&self, iovecs: &[libc::iovec]) -> isize {
        // SAFETY: the caller's iovecs point at memory valid for the call (see block::Slices).
        unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
/// Runs `body` on a thread of its own in a new network namespace, so TAP devices it
/// makes vanish with it; skipped where that is not allowed (not root, or no /dev/net/tun).
pub(super) fn in_new_netns(body: impl FnOnce() + Send + 'static) {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare takes flags only; CLONE_NEWNET moves this thread alone into a
        // new network namespace, which goes away with the thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0
            || !std::path::Path::new("/dev/net/tun").exists()
        {
            eprintln!("skipped: no network namespace or TUN device here");
            return;
        }
        body();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_device_is_multi_queue_and_its_queues_switch() {
        in_new_netns(|| {
            let taps = Tap::open_queues("fmq0", 3, false).unwrap();
            assert_eq!(taps.len(), 3);
            assert!(taps.iter().all(Tap::created));
            assert!(
                taps.iter().all(Tap::queue_enabled),
                "opened queues are attached"
            );
            // Detaching and attaching are accepted, and repeating either is harmless (the
            // repeat makes no call: the kernel would answer it EINVAL).
            taps[2].set_queue_enabled(false).unwrap();
            taps[2].set_queue_enabled(false).unwrap();
            taps[1].set_queue_enabled(false).unwrap();
            assert!(!taps[1].queue_enabled() && !taps[2].queue_enabled());
            taps[2].set_queue_enabled(true).unwrap();
            taps[2].set_queue_enabled(true).unwrap();
            assert!(taps[2].queue_enabled());
            assert!(taps[2].kernel_says_attached().unwrap());
            assert!(!taps[1].kernel_says_attached().unwrap());
            // A flag out of step with the kernel is put right by the kernel's EINVAL.
            taps[1].attached.store(true, Ordering::Release);
            taps[1].set_queue_enabled(false).unwrap();
            assert!(!taps[1].queue_enabled());
            // One more queue of the same device opens as multi-queue too.
            let more = Tap::open_queues("fmq0", 1, false).unwrap();
            assert_eq!(more.len(), 1);
            assert!(!more[0].created(), "the device existed");
        });
    }

    #[test]
    fn a_single_queue_device_gives_one_queue_or_a_clear_error() {
        in_new_netns(|| {
            // A persistent single-queue device, as `ip tuntap add NAME mode tap` makes.
            let file = attach("fsq0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
            persist(&file);
            drop(file);
            let err = Tap::open_queues("fsq0", 2, false).unwrap_err();
            assert!(
                matches!(err, TapError::SingleQueue { wanted: 2, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("multi_queue"), "{err}");
            let taps = Tap::open_queues("fsq0", 4, true).unwrap();
            assert_eq!(taps.len(), 1, "the default count falls back to one pair");
            assert!(!taps[0].created());
            // A single-queue device has nothing to switch: accepted as a no-op.
            taps[0].set_queue_enabled(true).unwrap();
        });
    }

    #[test]
    fn an_interface_that_is_no_tap_device_is_named_as_such() {
        in_new_netns(|| {
            // A persistent TUN device: an interface of the same driver but the wrong kind.
            const IFF_TUN: libc::c_short = 0x0001;
            let file = attach("ftun0", IFF_TUN | IFF_NO_PI).unwrap();
            persist(&file);
            for (queues, fewer_ok) in [(1, false), (2, false), (2, true)] {
                let err = Tap::open_queues("ftun0", queues, fewer_ok).unwrap_err();
                assert!(matches!(err, TapError::NotTap(_)), "{err}");
                assert_eq!(
                    err.to_string(),
                    "interface ftun0 exists and is not a TAP device"
                );
            }
        });
    }

    /// Keeps the device `file` is attached to when the file closes.
    fn persist(file: &File) {
        const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
        // SAFETY: TUNSETPERSIST takes a plain integer argument.
        let persisted = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1) };
        assert_eq!(persisted, 0);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("tap0"));
        assert!(valid_name("ferro-vm1-0"));
        assert!(!valid_name(""));
        assert!(!valid_name("a-very-long-interface-name"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("tap 0"));
        assert!(!valid_name("eth0:1"));
        assert!(matches!(
            Tap::open("bad/name"),
            Err(TapError::InvalidName(_))
        ));
    }
}
