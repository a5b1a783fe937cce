//! The guest-physical memory map of a Ferro PC.
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start info, modules, memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved) .. 0x000a_0000 legacy VGA/BIOS hole
//! 0x000e_0000  ACPI tables (RSDP first) .. 0x000f_f000
//! 0x000f_fff0  reset vector: a stub that asks the VMM for a reset (see `bios`)
//! 0x0010_0000  RAM: kernel, then free memory, initramfs at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (512 MiB), then PCI ECAM at 0xe000_0000, IOAPIC
//!              0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above 4 GiB (the part of guest memory that did not fit below the hole)
//! then         64-bit PCI BAR window (64 GiB, 1 GiB aligned after RAM)
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Size in bytes the GDT may occupy (up to the IDT).
pub const BOOT_GDT_MAX_SIZE: usize = 0x20;
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6100);
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPT_START: GuestAddress = GuestAddress(0xa000);
pub const PD_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line Ferro places in memory (the kernel may accept less).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const LEGACY_HOLE_START: u64 = 0xa0000;
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const ACPI_SIZE: usize = 0x1f000;
/// Where a CPU starts after reset (CS=0xF000, IP=0xFFF0), and where Linux jumps for a "BIOS"
/// reboot.
pub const RESET_VECTOR: GuestAddress = GuestAddress(0xffff0);
/// First byte of "high" memory, where the kernel is loaded.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO hole; low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB, where RAM that did not fit below the hole continues.
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;
/// 32-bit window for PCI BARs.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM of PCI bus 0 (1 MiB: 32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// Size of the 64-bit window for PCI BARs.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
pub const IOAPIC_START: u64 = 0xfec0_0000;
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
pub const APIC_START: u64 = 0xfee0_0000;

/// I/O ports of the platform devices.
pub mod ports {
    pub const COM1: u16 = 0x3f8;
    pub const COM_SIZE: u16 = 8;
    pub const I8042: u16 = 0x60;
    pub const I8042_SIZE: u16 = 5;
    pub const CMOS: u16 = 0x70;
    pub const CMOS_SIZE: u16 = 2;
    pub const POST: u16 = 0x80;
    /// ACPI sleep control/status and reset registers.
    pub const ACPI_PM: u16 = 0x600;
    pub const ACPI_PM_SIZE: u16 = 4;
    pub const ACPI_SLEEP_CONTROL: u16 = ACPI_PM;
    pub const ACPI_SLEEP_STATUS: u16 = ACPI_PM + 1;
    pub const ACPI_RESET: u16 = ACPI_PM + 2;
    /// Value the guest writes to [`ACPI_RESET`] to reset the machine.
    pub const ACPI_RESET_VALUE: u8 = 0x1;
    /// The ACPI Generic Event Device's event register (one byte, read to acknowledge).
    pub const ACPI_GED: u16 = ACPI_PM + ACPI_PM_SIZE;
    pub const ACPI_GED_SIZE: u16 = 1;
    /// PCI configuration mechanism #1 (address 0xCF8, data 0xCFC; reset control 0xCF9).
    pub const PCI_CONFIG: u16 = 0xcf8;
    pub const PCI_CONFIG_SIZE: u16 = 8;
}

/// Interrupt lines (ISA IRQ = GSI) of the legacy devices and their IOAPIC wiring.
pub mod irqs {
    pub const COM1: u32 = 4;
    /// The ACPI Generic Event Device's interrupt (edge, active high).
    pub const GED: u32 = 9;
    /// Pins of the (single) IOAPIC.
    pub const IOAPIC_PINS: u32 = 24;
    /// First IOAPIC pin for PCI INTx lines (pins 16..23, as on a PC).
    pub const PCI_INTX_BASE: u32 = 16;
    /// First GSI for MSI routes (after the IOAPIC's pins).
    pub const MSI_GSI_BASE: u32 = IOAPIC_PINS;

    /// GSI of the INTx `pin` (0 = INTA) of PCI device `slot`, swizzled as a PC does.
    pub fn pci_intx_gsi(slot: u32, pin: u32) -> u32 {
        PCI_INTX_BASE + (slot + pin) % (IOAPIC_PINS - PCI_INTX_BASE)
    }

    /// (GSI, IOAPIC pin) pairs of a PC: ISA IRQ 0 (the PIT) is wired to pin 2, as the MADT's
    /// interrupt source override says; every other GSI to the pin of the same number. The
    /// 8259 PIC is left unconnected because a hardware-reduced ACPI guest never programs it.
    pub fn ioapic_routes() -> Vec<(u32, u32)> {
        (0..IOAPIC_PINS)
            .filter(|&gsi| gsi != 2)
            .map(|gsi| (gsi, if gsi == 0 { 2 } else { gsi }))
            .collect()
    }
}

/// Highest guest-physical address (exclusive) any x86-64 CPU can have: 52 address bits.
pub const MAX_PHYS_ADDR: u64 = 1 << 52;
/// Most guest RAM a layout holds: RAM above 4 GiB and the 64-bit PCI window after it must end
/// within [`MAX_PHYS_ADDR`].
pub const MAX_RAM_SIZE: u64 =
    MAX_PHYS_ADDR - PCI_MMIO64_SIZE - (RAM_ABOVE_4G_START - MMIO_HOLE_START);
const PAGE_SIZE: u64 = 4 << 10;
const PCI_MMIO64_ALIGN: u64 = 1 << 30;

/// A RAM size no guest can be laid out with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("a guest needs some memory")]
    NoMemory,
    #[error("memory size {0:#x} is not a multiple of 4 KiB")]
    NotPageAligned(u64),
    #[error("memory size {size:#x} does not fit the guest's physical address space (at most {MAX_RAM_SIZE:#x})")]
    TooLarge { size: u64 },
}

/// Where one guest's RAM lies around the 32-bit MMIO hole, and where the 64-bit PCI window
/// follows it. Computed once per VM from its memory size and handed to everything that places
/// memory or describes it to the guest (memory slots, E820/PVH map, initramfs, ACPI, CMOS,
/// BAR allocation), so they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    size: u64,
    low_ram_end: u64,
    pci_mmio64_start: u64,
}

impl MemoryLayout {
    /// The layout of `size` bytes of RAM: below the MMIO hole first, the rest above 4 GiB.
    pub fn new(size: u64) -> Result<Self, LayoutError> {
        if size == 0 {
            return Err(LayoutError::NoMemory);
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(LayoutError::NotPageAligned(size));
        }
        if size > MAX_RAM_SIZE {
            return Err(LayoutError::TooLarge { size });
        }
        let low_ram_end = size.min(MMIO_HOLE_START);
        let ram_end = match size - low_ram_end {
            0 => low_ram_end,
            high => RAM_ABOVE_4G_START + high,
        };
        Ok(MemoryLayout {
            size,
            low_ram_end,
            pci_mmio64_start: ram_end
                .max(RAM_ABOVE_4G_START)
                .next_multiple_of(PCI_MMIO64_ALIGN),
        })
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.size
    }

    /// One past the last byte of RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.low_ram_end
    }

    /// Bytes of RAM above 4 GiB (0 when all of it fits below the hole).
    pub fn high_ram_size(&self) -> u64 {
        self.size - self.low_ram_end
    }

    /// Guest RAM ranges (start, size) in address order.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let mut ranges = vec![(GuestAddress(0), self.low_ram_end)];
        if self.high_ram_size() > 0 {
            ranges.push((GuestAddress(RAM_ABOVE_4G_START), self.high_ram_size()));
        }
        ranges
    }

    /// Start of the 64-bit PCI window ([`PCI_MMIO64_SIZE`] bytes): the first 1 GiB boundary
    /// above both 4 GiB and the end of RAM.
    pub fn pci_mmio64_start(&self) -> u64 {
        self.pci_mmio64_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64) -> MemoryLayout {
        MemoryLayout::new(size).unwrap()
    }

    #[test]
    fn memory_below_the_hole_is_one_range() {
        let l = layout(512 << 20);
        assert_eq!(l.ram_ranges(), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!((l.low_ram_end(), l.high_ram_size()), (512 << 20, 0));
        assert_eq!(l.pci_mmio64_start(), 4 << 30);
        let full = layout(MMIO_HOLE_START);
        assert_eq!(full.ram_ranges(), vec![(GuestAddress(0), MMIO_HOLE_START)]);
        assert_eq!(full.pci_mmio64_start(), 4 << 30);
    }

    #[test]
    fn memory_past_the_hole_continues_above_4g() {
        let l = layout(8 << 30);
        assert_eq!(
            l.ram_ranges(),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (
                    GuestAddress(RAM_ABOVE_4G_START),
                    (8 << 30) - MMIO_HOLE_START
                )
            ]
        );
        assert_eq!(l.ram_ranges().iter().map(|r| r.1).sum::<u64>(), 8 << 30);
        assert_eq!(l.low_ram_end(), MMIO_HOLE_START);
        assert_eq!(l.high_ram_size(), (8 << 30) - MMIO_HOLE_START);
        assert_eq!(l.ram_size(), 8 << 30);
        // One page past the hole: a page above 4 GiB, and the window on the next 1 GiB.
        let page = layout(MMIO_HOLE_START + 4096);
        assert_eq!(
            page.ram_ranges()[1],
            (GuestAddress(RAM_ABOVE_4G_START), 4096)
        );
        assert_eq!(page.pci_mmio64_start(), 5 << 30);
    }

    #[test]
    fn the_64bit_window_follows_ram_on_a_gib_boundary() {
        assert_eq!(layout(3 << 30).pci_mmio64_start(), 4 << 30);
        assert_eq!(
            layout(5 << 30).pci_mmio64_start(),
            6 << 30,
            "RAM ends at 4G + 2G"
        );
        assert_eq!(
            layout((5 << 30) + (1 << 20)).pci_mmio64_start(),
            7 << 30,
            "RAM ends 1 MiB past 6G"
        );
    }

    #[test]
    fn tiny_sizes_are_one_page_or_more() {
        let l = layout(4096);
        assert_eq!(l.ram_ranges(), vec![(GuestAddress(0), 4096)]);
        assert_eq!(MemoryLayout::new(0), Err(LayoutError::NoMemory));
        assert_eq!(
            MemoryLayout::new(4095),
            Err(LayoutError::NotPageAligned(4095))
        );
        assert_eq!(
            MemoryLayout::new((1 << 20) + 512),
            Err(LayoutError::NotPageAligned((1 << 20) + 512))
        );
    }

    #[test]
    fn the_largest_layout_ends_at_the_address_space_limit() {
        let max = layout(MAX_RAM_SIZE);
        let (start, size) = max.ram_ranges()[1];
        assert_eq!(start.0 + size, max.pci_mmio64_start());
        assert_eq!(max.pci_mmio64_start() + PCI_MMIO64_SIZE, MAX_PHYS_ADDR);
        for size in [MAX_RAM_SIZE + 4096, !0xfff] {
            assert_eq!(MemoryLayout::new(size), Err(LayoutError::TooLarge { size }));
        }
    }

    #[test]
    fn pci_intx_lines_are_swizzled() {
        assert_eq!(irqs::pci_intx_gsi(0, 0), 16);
        assert_eq!(irqs::pci_intx_gsi(3, 3), 22);
        assert_eq!(irqs::pci_intx_gsi(7, 1), 16);
    }

    #[test]
    fn pit_irq_is_routed_to_pin_2_and_no_pin_is_shared() {
        let routes = irqs::ioapic_routes();
        assert!(routes.contains(&(0, 2)));
        assert!(routes.contains(&(irqs::COM1, irqs::COM1)));
        let mut pins: Vec<u32> = routes.iter().map(|r| r.1).collect();
        pins.sort();
        pins.dedup();
        assert_eq!(pins.len(), routes.len());
    }

    #[test]
    fn fixed_boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START.0, BOOT_GDT_MAX_SIZE as u64),
            (BOOT_IDT_START.0, 8),
            (PVH_INFO_START.0, 0x40),
            (PVH_MODLIST_START.0, 0x20),
            (PVH_MEMMAP_START.0, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_START.0, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_START.0, 0x1000),
            (PDPT_START.0, 0x1000),
            (PD_START.0, 0x4000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
            (ACPI_START.0, ACPI_SIZE as u64),
            (RESET_VECTOR.0, 16),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        let last = areas[areas.len() - 1];
        assert!(last.0 + last.1 <= HIGH_RAM_START.0);
        assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    }
}
