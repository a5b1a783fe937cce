//! The ioctl request numbers the filters name, computed from `linux/kvm.h`'s definitions (type,
//! number, argument struct) so a size change in kvm-bindings changes them too.

use std::mem::size_of;

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_lapic_state, kvm_mp_state,
    kvm_msi, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// `KVMIO`, the type byte of every KVM ioctl.
pub(crate) const KVMIO: u64 = 0xAE;

/// The bits of a request number that hold its type.
pub(crate) const TYPE_MASK: u64 = 0xff << 8;

const fn kvm(dir: u32, nr: u32, size: usize) -> u64 {
    // Every size here is a small struct; `as` cannot truncate.
    ioctl_expr(dir, KVMIO as u32, nr, size as u32) as u64
}

pub(crate) const KVM_RUN: u64 = kvm(_IOC_NONE, 0x80, 0);
pub(crate) const KVM_GET_REGS: u64 = kvm(_IOC_READ, 0x81, size_of::<kvm_regs>());
pub(crate) const KVM_GET_SREGS: u64 = kvm(_IOC_READ, 0x83, size_of::<kvm_sregs>());
pub(crate) const KVM_GET_LAPIC: u64 = kvm(_IOC_READ, 0x8e, size_of::<kvm_lapic_state>());
pub(crate) const KVM_GET_MP_STATE: u64 = kvm(_IOC_READ, 0x98, size_of::<kvm_mp_state>());
pub(crate) const KVM_GET_VCPU_EVENTS: u64 = kvm(_IOC_READ, 0x9f, size_of::<kvm_vcpu_events>());
pub(crate) const KVM_SET_USER_MEMORY_REGION: u64 =
    kvm(_IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>());
pub(crate) const KVM_IRQ_LINE: u64 = kvm(_IOC_WRITE, 0x61, size_of::<kvm_irq_level>());
pub(crate) const KVM_SET_GSI_ROUTING: u64 = kvm(_IOC_WRITE, 0x6a, size_of::<kvm_irq_routing>());
pub(crate) const KVM_IRQFD: u64 = kvm(_IOC_WRITE, 0x76, size_of::<kvm_irqfd>());
pub(crate) const KVM_IOEVENTFD: u64 = kvm(_IOC_WRITE, 0x79, size_of::<kvm_ioeventfd>());
pub(crate) const KVM_SIGNAL_MSI: u64 = kvm(_IOC_WRITE, 0xa5, size_of::<kvm_msi>());

// TUN/TAP (`linux/if_tun.h`), as libc defines them.
pub(crate) const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
pub(crate) const TUNSETQUEUE: u64 = libc::TUNSETQUEUE;
pub(crate) const TUNGETIFF: u64 = libc::TUNGETIFF;
pub(crate) const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ;

// Terminals: the console's raw mode, set and restored.
pub(crate) const TERMINAL: [u64; 5] = [
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h as compiled for x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    }
}
