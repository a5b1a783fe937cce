//! The boot GDT (and the empty IDT beside it) in guest memory, and the segment registers
//! derived from it.
//!
//! Linux's 64-bit entry wants flat 64-bit code and data segments; the PVH entry wants flat
//! 32-bit protected-mode segments. Both tables live at [`crate::layout::BOOT_GDT_START`].

use kvm_bindings::kvm_segment;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Selectors of the boot GDT (index * 8).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Access/flags words (bits 40..55 of a descriptor, without the limit nibble).
const CODE64: u16 = 0xa09b; // present, ring 0, code exec/read accessed, L=1, G=1
const CODE32: u16 = 0xc09b; // present, ring 0, code exec/read accessed, D=1, G=1
const DATA: u16 = 0xc093; // present, ring 0, data read/write accessed, B=1, G=1
const TSS: u16 = 0x808b; // present, 32/64-bit busy TSS, G=1

/// Which entry protocol the vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentMode {
    /// 64-bit long mode (Linux boot protocol's 64-bit entry).
    Long,
    /// 32-bit protected mode with paging off (PVH entry).
    Protected32,
}

/// Encodes a segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The four entries of the boot GDT: null, code, data, TSS.
pub fn boot_gdt(mode: SegmentMode) -> [u64; 4] {
    let code = match mode {
        SegmentMode::Long => CODE64,
        SegmentMode::Protected32 => CODE32,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ]
}

/// Writes the boot GDT and an empty IDT for `mode` into guest memory.
pub fn write_boot_descriptor_tables<M: GuestMemoryBackend>(
    mem: &M,
    mode: SegmentMode,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
}

/// Decodes descriptor `entry` (loaded with `selector`) into KVM's segment register form.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    #[test]
    fn descriptor_tables_land_in_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_boot_descriptor_tables(&mem, SegmentMode::Long).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START.0 + 8)).unwrap();
        assert_eq!(code, boot_gdt(SegmentMode::Long)[1]);
        let idt: u64 = mem.read_obj(BOOT_IDT_START).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn encodes_flat_long_mode_code() {
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn encodes_base_and_limit_fields() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = segment_from_entry(e, 0x10);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn decodes_long_mode_code_segment() {
        let seg = segment_from_entry(boot_gdt(SegmentMode::Long)[1], CODE_SELECTOR);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.type_, seg.s, seg.present, seg.dpl), (0xb, 1, 1, 0));
        assert_eq!((seg.l, seg.db, seg.g, seg.unusable), (1, 0, 1, 0));
    }

    #[test]
    fn decodes_protected_mode_segments() {
        let gdt = boot_gdt(SegmentMode::Protected32);
        let code = segment_from_entry(gdt[1], CODE_SELECTOR);
        assert_eq!((code.l, code.db, code.type_), (0, 1, 0xb));
        let data = segment_from_entry(gdt[2], DATA_SELECTOR);
        assert_eq!((data.type_, data.db, data.limit), (0x3, 1, 0xffff_ffff));
        let tss = segment_from_entry(gdt[3], TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment_from_entry(0, 0).unusable, 1);
    }
}
