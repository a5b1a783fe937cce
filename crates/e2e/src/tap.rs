//! Persistent multi-queue TAP devices on the test host, as `ip tuntap add NAME mode tap
//! multi_queue vnet_hdr` makes them (the testbed's busybox has no `ip tuntap`, and its
//! `tunctl` makes single-queue devices only).

pub use host_sys::tap::TapError;

/// Creates persistent multi-queue TAP device `name` (down, no address); an existing one of
/// that name is reused.
pub fn create_multi_queue(name: &str) -> Result<(), TapError> {
    host_sys::tap::create_persistent(name, false)
}

/// Removes multi-queue TAP device `name` (once no VMM holds a queue of it).
pub fn delete_multi_queue(name: &str) -> Result<(), TapError> {
    host_sys::tap::delete_persistent(name)
}
