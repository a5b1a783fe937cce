//! The only crate in Ferro that talks to KVM.
//!
//! It wraps `kvm-ioctls` in three handles that mirror KVM's own file descriptors:
//! [`Hypervisor`] (`/dev/kvm`: capabilities, supported CPUID and MSRs), [`Vm`] (one guest:
//! memory slots, in-kernel irqchip and PIT and their state, irqfd) and [`Vcpu`] (one virtual
//! CPU: registers, CPUID, MSRs, MP state and pending events, `KVM_RUN`). The rest of the VMM never sees a raw ioctl.
//!
//! Threading: `Hypervisor` and `Vm` are `Send + Sync` and used from the VMM's main thread; a
//! `Vcpu` is moved into the thread that runs it and is only used there.

mod error;
mod host;
mod kvm;
mod vcpu;
mod vm;

pub use error::{Error, Result};
pub use host::{host_has_hardware_virtualization, host_memory_bytes};
pub use kvm::Hypervisor;
pub use vcpu::{MpState, SystemEvent, Vcpu, VcpuExit};
pub use vm::{IoapicState, IrqRoute, Pic, Vm};

/// Data types shared with the `arch` crate; these are plain structs, not ioctls.
pub use kvm_bindings::{
    kvm_cpuid_entry2 as CpuidEntry, kvm_fpu as FpuState, kvm_lapic_state as LapicState,
    kvm_msr_entry as MsrEntry, kvm_pic_state as PicState, kvm_regs as StandardRegisters,
    kvm_segment as SegmentRegister, kvm_sregs as SpecialRegisters, kvm_vcpu_events as VcpuEvents,
};
