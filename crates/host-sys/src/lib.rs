//! Host system calls behind safe wrappers, one module per topic. The other crates call these
//! instead of `libc`, so the workspace's `unsafe` outside KVM and guest memory lives here, each
//! block with its reason. Calls that `rustix` already wraps safely go through it; the rest
//! (TAP ioctls, OFD locks, signal masks, signalfd, group lookup) are written out here.
//! `random` calls `getrandom` directly (see there why).

pub mod file;
pub mod ifname;
pub mod netns;
pub mod process;
pub mod random;
pub mod signal;
pub mod socket;
pub mod system;
pub mod tap;
pub mod terminal;
pub mod user;
