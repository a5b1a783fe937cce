//! Identity-mapped page tables for the 64-bit Linux entry.
//!
//! The boot protocol requires the kernel, boot_params and command line to be identity mapped;
//! Ferro maps the whole first 4 GiB with 2 MiB pages (1 PML4, 1 PDPT, 4 page directories) so the
//! initramfs at the top of low memory is covered too.

use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::layout::{PDPT_START, PD_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;
const PAGE_DIRECTORIES: u64 = 4;
const ENTRIES_PER_TABLE: u64 = 512;
const TWO_MIB: u64 = 2 << 20;

/// Writes the page tables into guest memory; returns the value for CR3.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_START.0 | PRESENT | WRITABLE, PML4_START)?;
    for dir in 0..PAGE_DIRECTORIES {
        let pd = PD_START.0 + dir * 0x1000;
        mem.write_obj(pd | PRESENT | WRITABLE, PDPT_START.unchecked_add(dir * 8))?;
        for entry in 0..ENTRIES_PER_TABLE {
            let phys = (dir * ENTRIES_PER_TABLE + entry) * TWO_MIB;
            let addr = vm_memory::GuestAddress(pd + entry * 8);
            mem.write_obj(phys | PRESENT | WRITABLE | HUGE_PAGE, addr)?;
        }
    }
    Ok(PML4_START.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, virt: u64) -> Option<u64> {
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        let pml4e = read(cr3 + ((virt >> 39) & 0x1ff) * 8);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((virt >> 30) & 0x1ff) * 8);
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + ((virt >> 21) & 0x1ff) * 8);
        if pde & PRESENT == 0 || pde & HUGE_PAGE == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) + (virt & 0x1f_ffff))
    }

    #[test]
    fn identity_maps_the_first_4_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START.0);
        for addr in [
            0u64,
            0x7000,
            0x100_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xffff_f000,
        ] {
            assert_eq!(translate(&mem, cr3, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }
}
