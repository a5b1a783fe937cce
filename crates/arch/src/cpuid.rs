//! The CPUID a vCPU sees: KVM's supported leaves with Ferro's topology written in.
//!
//! Topology model: one socket of `cpus` cores, one thread per core; a vCPU's APIC ID is its
//! index. Leaves that describe topology (0x1, 0x4, 0xB, 0x1F and AMD's 0x80000001,
//! 0x80000008, 0x8000001D, 0x8000001E) are rewritten so they agree with each other and with the
//! MADT. Features that need VMM support Ferro does not give (nested virtualization, MONITOR)
//! are hidden.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Largest vCPU count Ferro supports.
pub const MAX_VCPUS: u32 = 64;

/// What the guest's CPUID must describe.
#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    /// Number of vCPUs in the VM.
    pub cpus: u32,
    /// Whether KVM emulates the local APIC timer's TSC-deadline mode.
    pub tsc_deadline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT_ECX_SVM: u32 = 1 << 2;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Bits needed to number `cpus` cores (the width of the core field in an APIC ID).
pub fn core_id_bits(cpus: u32) -> u32 {
    cpus.max(1).next_power_of_two().trailing_zeros()
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    match (leaf0.ebx, leaf0.edx, leaf0.ecx) {
        (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => Vendor::Intel, // "GenuineIntel"
        (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,   // "AuthenticAMD"
        (0x6f67_7948, 0x6e65_476e, 0x656e_6975) => Vendor::Amd,   // "HygonGenuine"
        _ => Vendor::Other,
    }
}

fn max_basic_leaf(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax)
}

fn topology_subleaves(function: u32, apic_id: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    const LEVEL_SMT: u32 = 1;
    const LEVEL_CORE: u32 = 2;
    let entry = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        entry(0, 0, 1, LEVEL_SMT << 8),
        entry(1, core_id_bits(cpus), cpus, 1 | (LEVEL_CORE << 8)),
        entry(2, 0, 0, 2),
    ]
}

/// Builds the CPUID of vCPU `vcpu_id` from KVM's supported leaves.
pub fn guest_cpuid(
    supported: &[kvm_cpuid_entry2],
    vcpu_id: u32,
    config: &CpuidConfig,
) -> Vec<kvm_cpuid_entry2> {
    let vendor = vendor(supported);
    let cpus = config.cpus.max(1);
    let core_bits = core_id_bits(cpus);
    let addressable = 1u32 << core_bits;
    let apic_id = vcpu_id;
    let max_basic = max_basic_leaf(supported);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    for entry in &mut out {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0xffff) | (addressable << 16) | (apic_id << 24);
                entry.ecx |= ECX_HYPERVISOR;
                entry.ecx &= !(ECX_VMX | ECX_MONITOR);
                if config.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { addressable - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((addressable - 1) << 26);
            }
            LEAF_HYPERVISOR => {
                entry.eax = entry.eax.max(KVM_FEATURES_LEAF);
                [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
            }
            LEAF_EXT_FEATURES => {
                entry.ecx &= !EXT_ECX_SVM;
                if vendor == Vendor::Amd && cpus > 1 {
                    entry.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDRESS_SIZES if vendor == Vendor::Amd => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (cpus - 1);
            }
            LEAF_AMD_CACHE if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
            }
            LEAF_AMD_TOPOLOGY => {
                entry.eax = apic_id;
                entry.ebx = apic_id & (addressable - 1); // core id; one thread per core
                entry.ecx = 0; // node 0, one node per socket
                entry.edx = 0;
            }
            _ => {}
        }
    }
    if !out.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        out.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: KVM_FEATURES_LEAF,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if max_basic >= leaf {
            out.extend(topology_subleaves(leaf, apic_id, cpus));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(
                1,
                0,
                [0x906ea, 0x0010_0800, ECX_VMX | ECX_MONITOR, 0x078b_fbff],
            ),
            leaf(4, 0, [0x0000_0121, 0, 0, 0]), // L1d
            leaf(4, 3, [0x0000_0163, 0, 0, 0]), // L3
            leaf(4, 4, [0, 0, 0, 0]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            leaf(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, EXT_ECX_SVM, 0]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ]
    }

    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0x00b0_0f21, 0x0102_0800, 0, 0x078b_fbff]),
            leaf(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x8000_0001, 0, [0, 0, 0x0040_0393, 0]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x7001, 0]),
            leaf(0x8000_001d, 0, [0x121, 0x02c0_003f, 0x3f, 0]),
            leaf(0x8000_001d, 3, [0x4163, 0x03c0_003f, 0x7fff, 1]),
            leaf(0x8000_001e, 0, [0, 0, 0, 0]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    const FOUR: CpuidConfig = CpuidConfig {
        cpus: 4,
        tsc_deadline: true,
    };

    #[test]
    fn core_bits_round_up_to_a_power_of_two() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 64].map(core_id_bits),
            [0, 1, 2, 2, 3, 3, 4, 6]
        );
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_flags() {
        let cpuid = guest_cpuid(&intel(), 3, &FOUR);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & (ECX_VMX | ECX_MONITOR), 0);
    }

    #[test]
    fn single_cpu_has_no_htt_and_tsc_deadline_follows_config() {
        let config = CpuidConfig {
            cpus: 1,
            tsc_deadline: false,
        };
        let l1 = find(&guest_cpuid(&intel(), 0, &config), 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn extended_topology_leaves_describe_cores() {
        let cpuid = guest_cpuid(
            &intel(),
            2,
            &CpuidConfig {
                cpus: 3,
                tsc_deadline: false,
            },
        );
        for function in [0xb, 0x1f] {
            let smt = find(&cpuid, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = find(&cpuid, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            let end = find(&cpuid, function, 2);
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
        // The host's own 0xB entry is replaced, not duplicated.
        assert_eq!(cpuid.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn no_topology_leaf_beyond_the_max_basic_leaf() {
        let mut old = amd();
        old[0].eax = 0xa;
        let cpuid = guest_cpuid(&old, 0, &FOUR);
        assert!(cpuid
            .iter()
            .all(|e| e.function != 0xb && e.function != 0x1f));
        // Max basic leaf 0x10: 0xB is described, 0x1F is not.
        let cpuid = guest_cpuid(&amd(), 1, &FOUR);
        assert_eq!(find(&cpuid, 0xb, 1).ebx, 4);
        assert!(cpuid.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn cache_leaf_shares_l3_between_all_cores() {
        let cpuid = guest_cpuid(&intel(), 0, &FOUR);
        let l1d = find(&cpuid, 4, 0);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax >> 26, 3);
        let l3 = find(&cpuid, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, 0x163);
        assert_eq!(find(&cpuid, 4, 4).eax, 0);
    }

    #[test]
    fn amd_leaves_describe_the_same_topology() {
        let cpuid = guest_cpuid(&amd(), 3, &FOUR);
        let ext = find(&cpuid, 0x8000_0001, 0);
        assert_ne!(ext.ecx & EXT_ECX_CMP_LEGACY, 0);
        assert_eq!(ext.ecx & EXT_ECX_SVM, 0);
        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 3);
        assert_eq!((sizes.ecx >> 12) & 0xf, 2);
        let topo = find(&cpuid, 0x8000_001e, 0);
        assert_eq!(
            (topo.eax, topo.ebx & 0xff, (topo.ebx >> 8) & 0xff),
            (3, 3, 0)
        );
        let l3 = find(&cpuid, 0x8000_001d, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        let l1 = find(&cpuid, 0x8000_001d, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn intel_keeps_its_reserved_ecx_in_leaf_0x80000008() {
        let cpuid = guest_cpuid(&intel(), 1, &FOUR);
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx, 0);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx, 0);
    }

    #[test]
    fn kvm_signature_leaf_is_present() {
        let cpuid = guest_cpuid(&intel(), 0, &FOUR);
        let sig = find(&cpuid, 0x4000_0000, 0);
        assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        let without: Vec<_> = intel()
            .into_iter()
            .filter(|e| e.function != 0x4000_0000)
            .collect();
        let sig = find(&guest_cpuid(&without, 0, &FOUR), 0x4000_0000, 0);
        assert_eq!(sig.eax, 0x4000_0001);
        // Paravirtual feature bits from KVM pass through unchanged.
        assert_eq!(find(&cpuid, 0x4000_0001, 0).eax, 0x0100_7efb);
    }
}
