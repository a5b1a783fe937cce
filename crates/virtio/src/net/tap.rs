//! TAP devices: the host end of a guest NIC, opened with a virtio-net header on every packet so
//! checksum and segmentation offloads pass through.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub use host_sys::tap::offload;
use host_sys::tap::{self as host_tap, flags, TapError as HostError};

/// Why a TAP device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?} (1 to 15 characters, no '/', ':' or whitespace)")]
    InvalidName(String),
    #[error(transparent)]
    Attach(HostError),
    #[error("TAP device {name} has one queue; {wanted} queue pairs need one created with `ip tuntap add {name} mode tap multi_queue`")]
    SingleQueue { name: String, wanted: usize },
    #[error("interface {0} exists and is not a TAP device")]
    NotTap(String),
    #[error("cannot configure TAP device {name}")]
    Configure {
        name: String,
        #[source]
        source: HostError,
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

fn is_einval(e: &TapError) -> bool {
    matches!(e, TapError::Attach(host) if host.os_error() == Some(libc::EINVAL))
}

/// A new non-blocking /dev/net/tun file attached to device `name` with `flags`.
fn attach(name: &str, flags: u16) -> Result<File, TapError> {
    host_tap::attach(name, flags, true).map_err(TapError::Attach)
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
        if !host_sys::ifname::valid(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let created = !host_sys::ifname::exists(name);
        let single_queue = flags::TAP | flags::NO_PI | flags::VNET_HDR;
        // A queue must be opened as the device was made: try multi-queue first. EINVAL comes
        // from an existing single-queue TAP device, and from an interface that is no TAP
        // device at all (a bridge, a TUN device), which refuses the single-queue try too.
        let (first, queue_flags) = match attach(name, single_queue | flags::MULTI_QUEUE) {
            Ok(file) => (file, single_queue | flags::MULTI_QUEUE),
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
        let count = if queue_flags & flags::MULTI_QUEUE != 0 {
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
                    None => attach(name, queue_flags)?,
                },
                name: name.to_string(),
                created,
                attached: AtomicBool::new(true),
            };
            tap.set_vnet_header_size(12)?;
            taps.push(tap);
        }
        if created {
            host_tap::bring_up(name).map_err(|e| taps[0].configure_err(e))?;
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
        if let Err(error) = host_tap::set_queue_attached(&self.file, on) {
            // EINVAL also means the queue was already so: believe the kernel's own word.
            let already = error.os_error() == Some(libc::EINVAL)
                && self.kernel_says_attached().ok() == Some(on);
            if !already {
                return Err(self.configure_err(error));
            }
        }
        self.attached.store(on, Ordering::Release);
        Ok(())
    }

    /// Whether the kernel has this queue attached (TUNGETIFF flags a detached one).
    fn kernel_says_attached(&self) -> Result<bool, HostError> {
        host_tap::queue_attached(&self.file)
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

    fn configure_err(&self, source: HostError) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            source,
        }
    }

    fn set_vnet_header_size(&self, size: i32) -> Result<(), TapError> {
        host_tap::set_vnet_header_size(&self.file, size).map_err(|e| self.configure_err(e))
    }

    /// Tells the kernel which offloads the guest can take (see [`offload`]).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        host_tap::set_offload(&self.file, flags).map_err(|e| self.configure_err(e))
    }

    /// Reads one packet (virtio-net header first); None when nothing is waiting.
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
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
pub(super) use host_sys::netns::in_new_netns;

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
            let file = attach("fsq0", flags::TAP | flags::NO_PI | flags::VNET_HDR).unwrap();
            host_tap::set_persistent(&file, true).unwrap();
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
            let file = attach("ftun0", flags::TUN | flags::NO_PI).unwrap();
            host_tap::set_persistent(&file, true).unwrap();
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

    #[test]
    fn names_are_checked() {
        assert!(matches!(
            Tap::open("bad/name"),
            Err(TapError::InvalidName(_))
        ));
    }
}
