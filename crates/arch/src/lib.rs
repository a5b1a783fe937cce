//! x86_64 platform knowledge: the guest physical memory map, how Linux is booted (bzImage
//! 64-bit boot protocol and PVH), the initial vCPU state, CPUID and the ACPI tables.
//!
//! Everything here is pure computation on guest memory (`vm-memory`) and KVM data structures;
//! nothing calls KVM, so all of it is unit-tested without `/dev/kvm`. No threads.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod acpi;
pub mod bios;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;

/// Guest memory as Ferro maps it: anonymous (or file-backed) mmaps, no dirty bitmap yet.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[cfg(any(test, feature = "test-images"))]
pub mod test_images;
