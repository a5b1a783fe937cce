//! `/dev/kvm`: the system handle, its capabilities and what it can offer guests.

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::error::{ioctl_err, Error, Result};
use crate::vm::Vm;

const KVM_PATH: &str = "/dev/kvm";
const KVM_API_VERSION: i32 = 12;

/// Capabilities without which Ferro cannot build a PC guest.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::Pit2, "in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::UserMemory, "user memory (KVM_CAP_USER_MEMORY)"),
    (Cap::SetTssAddr, "TSS address (KVM_CAP_SET_TSS_ADDR)"),
    (
        Cap::SetIdentityMapAddr,
        "identity map address (KVM_CAP_SET_IDENTITY_MAP_ADDR)",
    ),
    (Cap::ExtCpuid, "extended CPUID (KVM_CAP_EXT_CPUID)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::IrqRouting, "interrupt routing (KVM_CAP_IRQ_ROUTING)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (Cap::MpState, "MP state (KVM_CAP_MP_STATE)"),
    (
        Cap::AdjustClock,
        "kvm-clock adjustment (KVM_CAP_ADJUST_CLOCK)",
    ),
];

/// The open `/dev/kvm` handle.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks that it speaks API 12 and has every capability Ferro uses.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| Error::Open {
            path: KVM_PATH,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        Ok(Hypervisor { kvm })
    }

    /// Creates an empty VM (no memory, no vCPUs).
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        Ok(Vm::new(fd, self.max_vcpus()))
    }

    /// The CPUID leaves KVM can virtualize on this host (already filtered by KVM).
    pub fn supported_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map(|cpuid| cpuid.as_slice().to_vec())
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Indices of the MSRs KVM saves and restores for a vCPU.
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        self.kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))
    }

    /// Largest number of vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Whether the local APIC can run its timer in TSC-deadline mode.
    pub fn has_tsc_deadline_timer(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }
}
