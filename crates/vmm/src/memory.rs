//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO hole.

use arch::layout::MemoryLayout;
use arch::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::error::Error;

/// Maps the guest RAM of `layout`. Pages are only backed when the guest touches them.
pub fn create_guest_memory(layout: &MemoryLayout) -> Result<GuestMemoryMmap, Error> {
    let size = api::ByteSize(layout.ram_size());
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_ranges()
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| Error::GuestMemory { size, source })?;
    for region in memory.iter() {
        advise_huge_pages(region);
    }
    Ok(memory)
}

/// Asks for transparent huge pages: fewer TLB misses for the guest, as QEMU does by default.
/// Failure (THP disabled) only costs speed.
fn advise_huge_pages(region: &vm_memory::GuestRegionMmap<()>) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    // SAFETY: `host .. host + len` is exactly the mapping owned by `region`; MADV_HUGEPAGE only
    // changes how the kernel backs it and never invalidates its contents.
    let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        guest_log::guest_debug!(
            "madvise(MADV_HUGEPAGE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_split_around_the_hole() {
        let mem = create_guest_memory(&MemoryLayout::new(4 << 30).unwrap()).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        mem.write_obj(0xdead_beef_u32, GuestAddress((5 << 30) - 4))
            .unwrap();
        assert!(mem.write_obj(0u32, GuestAddress(0xd000_0000)).is_err());
    }
}
