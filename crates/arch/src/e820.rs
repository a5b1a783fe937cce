//! The E820 memory map handed to the guest (through boot_params or the PVH start info).

use crate::layout::{self, MemoryLayout, ACPI_START, EBDA_START, HIGH_RAM_START};

/// E820 entry types (ACPI address range types).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a guest with RAM laid out as `memory`, in address order.
pub fn memory_map(memory: &MemoryLayout) -> Vec<E820Entry> {
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        E820Entry {
            addr: EBDA_START,
            size: layout::LEGACY_HOLE_START - EBDA_START,
            kind: E820_RESERVED,
        },
        // ACPI tables and the reset vector: the BIOS area.
        E820Entry {
            addr: ACPI_START.0,
            size: HIGH_RAM_START.0 - ACPI_START.0,
            kind: E820_RESERVED,
        },
    ];
    // The PCI ECAM must be reserved or Linux will not use it for configuration access.
    map.push(E820Entry {
        addr: layout::PCI_ECAM_START,
        size: layout::PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    for (start, size) in memory.ram_ranges() {
        if start.0 == 0 {
            map.push(ram(HIGH_RAM_START.0, size - HIGH_RAM_START.0));
        } else {
            map.push(ram(start.0, size));
        }
    }
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_START, RAM_ABOVE_4G_START};

    fn map_of(size: u64) -> Vec<E820Entry> {
        memory_map(&MemoryLayout::new(size).unwrap())
    }

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_low_ram_and_high_ram() {
        let map = map_of(256 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x10_0000,
                size: (256 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map.last().copied(),
            Some(E820Entry {
                addr: 0xe000_0000,
                size: 0x10_0000,
                kind: E820_RESERVED
            })
        );
        // Only the legacy hole (0x9fc00..0x100000) is not RAM.
        assert_eq!(ram_total(&map), (256 << 20) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let map = map_of(6 << 30);
        let above: Vec<_> = map
            .iter()
            .filter(|e| e.addr >= RAM_ABOVE_4G_START)
            .collect();
        assert_eq!(above.len(), 1);
        assert_eq!(above[0].size, (6 << 30) - MMIO_HOLE_START);
        assert!(map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= RAM_ABOVE_4G_START));
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [128u64 << 20, 3 << 30, 5 << 30] {
            let map = map_of(size);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{w:x?}");
            }
        }
    }
}
