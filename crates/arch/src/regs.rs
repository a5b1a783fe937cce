//! The state a vCPU starts in: general and special registers for the chosen entry protocol,
//! FPU, boot MSRs and the local APIC's LINT pins.

use crate::boot::EntryPoint;
use crate::gdt::{self, SegmentMode, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// General registers at the kernel's entry point.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    match *entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rip: rip.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            // The 64-bit boot protocol passes boot_params in RSI.
            rsi: ZERO_PAGE_START.0,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rip: rip.0,
            // The PVH protocol passes hvm_start_info in EBX.
            rbx: PVH_INFO_START.0,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// Special registers for `mode`, starting from KVM's reset state `sregs`. `cr3` is the page
/// table root for long mode.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: SegmentMode, cr3: u64) -> kvm_sregs {
    let table = gdt::boot_gdt(mode);
    let code = gdt::segment_from_entry(table[1], CODE_SELECTOR);
    let data = gdt::segment_from_entry(table[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment_from_entry(table[3], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    match mode {
        SegmentMode::Long => {
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.cr3 = cr3;
            sregs.cr4 |= CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        SegmentMode::Protected32 => {
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// x87 and SSE control words as after `fninit` and a reset MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITEBACK: u64 = 6;

/// MSR values Linux expects at boot: syscall MSRs cleared, fast strings on, and MTRRs enabled
/// with write-back as the default memory type (otherwise all of RAM would be uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as firmware does on a PC.
pub fn configure_lapic_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn linux64_entry_passes_zero_page_in_rsi() {
        let regs = boot_regs(&EntryPoint::Linux64(GuestAddress(0x100200)));
        assert_eq!(regs.rip, 0x100200);
        assert_eq!(regs.rsi, ZERO_PAGE_START.0);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn pvh_entry_passes_start_info_in_rbx() {
        let regs = boot_regs(&EntryPoint::Pvh(GuestAddress(0x1000000)));
        assert_eq!(regs.rip, 0x1000000);
        assert_eq!(regs.rbx, PVH_INFO_START.0);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let s = boot_sregs(kvm_sregs::default(), SegmentMode::Long, 0x9000);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, CODE_SELECTOR);
        assert_eq!(s.ss.selector, DATA_SELECTOR);
        assert_eq!(s.gdt.base, BOOT_GDT_START.0);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn protected_mode_sregs_have_paging_off() {
        let start = kvm_sregs {
            cr0: CR0_PG | 0x6000_0010,
            ..Default::default()
        };
        let s = boot_sregs(start, SegmentMode::Protected32, 0x9000);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
    }

    #[test]
    fn boot_msrs_enable_mtrrs_with_writeback() {
        let msrs = boot_msrs();
        let mtrr = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        let misc = msrs
            .iter()
            .find(|m| m.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data, 1);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0000); // masked, fixed
        configure_lapic_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x0000_0400);
    }
}
