//! ACPI tables: RSDP, XSDT, FADT, MADT and DSDT, written into the BIOS area of guest memory.
//!
//! Ferro is a "hardware-reduced" ACPI platform (like other lean VMMs): no PM1 event/control
//! blocks, no SCI, no legacy 8259 in use. What the guest needs from ACPI:
//! - the MADT lists its CPUs (one local APIC per vCPU), the IOAPIC and the legacy IRQ override;
//! - the FADT's sleep control register (port 0x600) and `_S5` make `poweroff` work, and its
//!   reset register (port 0x602) makes `reboot` work;
//! - a Generic Event Device (ACPI0013, event register at port 0x604, GSI 9) whose `_EVT`
//!   notifies the power button device (PNP0C0C): how the host presses the power button;
//! - the DSDT describes the COM1 UART, the CMOS RTC and the PCI root bridge (its bus, I/O and
//!   memory windows and INTx routing); the MCFG announces the PCI ECAM.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    self, irqs, ports, MemoryLayout, ACPI_SIZE, ACPI_START, APIC_START, IOAPIC_START,
};

pub const OEM_ID: [u8; 6] = *b"FERRO ";
const OEM_REVISION: u32 = 1;
/// ACPI sleep type value for S5 (soft off), shared by `_S5` and the sleep control device.
pub const SLEEP_TYPE_S5: u8 = 5;
const TABLE_ALIGN: u64 = 8;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Errors while building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the ACPI area")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiConfig {
    pub cpus: u32,
    /// Guest RAM, which decides where the 64-bit PCI window starts.
    pub memory: MemoryLayout,
}

/// Builds all tables and writes them at [`ACPI_START`]; returns the RSDP's address.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter::new(mem);
    let rsdp_addr = writer.reserve(Rsdp::len() as u64)?;
    let dsdt_addr = writer.write(dsdt(config).as_slice())?;
    let fadt_addr = writer.write(&aml_bytes(&fadt(dsdt_addr)))?;
    let madt_addr = writer.write(madt(config.cpus).as_slice())?;
    let mut mcfg = MCFG::new(OEM_ID, *b"FERROMCF", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    let mcfg_addr = writer.write(&aml_bytes(&mcfg))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"FERROXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr.0);
    xsdt.add_entry(madt_addr.0);
    xsdt.add_entry(mcfg_addr.0);
    let xsdt_addr = writer.write(&aml_bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr.0);
    mem.write_slice(&aml_bytes(&rsdp), rsdp_addr)
        .map_err(AcpiError::GuestMemory)?;
    Ok(rsdp_addr)
}

fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    bytes
}

/// Places tables one after another in the ACPI area.
struct TableWriter<'a, M> {
    mem: &'a M,
    next: u64,
}

impl<'a, M: GuestMemoryBackend> TableWriter<'a, M> {
    fn new(mem: &'a M) -> Self {
        TableWriter {
            mem,
            next: ACPI_START.0,
        }
    }

    fn reserve(&mut self, len: u64) -> Result<GuestAddress, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + len;
        if end > ACPI_START.0 + ACPI_SIZE as u64 {
            return Err(AcpiError::TooLarge(end - ACPI_START.0));
        }
        self.next = end;
        Ok(GuestAddress(addr))
    }

    fn write(&mut self, table: &[u8]) -> Result<GuestAddress, AcpiError> {
        let addr = self.reserve(table.len() as u64)?;
        self.mem
            .write_slice(table, addr)
            .map_err(AcpiError::GuestMemory)?;
        Ok(addr)
    }
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt: GuestAddress) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"FERROFAC", OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.sleep_control_reg = io_register(ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(ports::ACPI_SLEEP_STATUS);
    fadt.reset_reg = io_register(ports::ACPI_RESET);
    fadt.reset_value = ports::ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERROVMM").into();
    fadt.finalize()
}

const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;

fn madt(cpus: u32) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"FERROMAD", OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    // Flags stay 0: no PC-AT 8259 for the guest to disable (hardware-reduced platform).
    for id in 0..cpus {
        let id = id as u8;
        madt.append_slice(&[MADT_LOCAL_APIC, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    // ISA IRQ 0 (PIT) arrives on GSI 2, as on every PC.
    let mut iso = vec![MADT_INTERRUPT_OVERRIDE, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);
    // NMI on LINT1 of every processor (UID 0xff = all).
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt
}

/// Slots whose INTx lines the _PRT describes (slot 0 is the host bridge).
const PCI_SLOTS: std::ops::Range<u32> = 1..32;

/// The PCI root bridge: PCIe host bridge on segment 0, bus 0, with its windows and routing.
fn pci_root(memory: &MemoryLayout) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = aml::IO::new(
        ports::PCI_CONFIG,
        ports::PCI_CONFIG,
        1,
        ports::PCI_CONFIG_SIZE as u8,
    );
    let io_window = aml::AddressSpace::<u16>::new_io(0x1000, 0xffff, None);
    let mmio32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64_start = memory.pci_mmio64_start();
    let mmio64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + layout::PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &config_ports, &io_window, &mmio32, &mmio64]),
    );
    // INTA..INTD of each slot go to GSIs 16..23, swizzled by slot.
    let routes: Vec<(u32, u8, u32)> = PCI_SLOTS
        .flat_map(|slot| (0..4).map(move |pin| (slot, pin as u8, irqs::pci_intx_gsi(slot, pin))))
        .map(|(slot, pin, gsi)| ((slot << 16) | 0xffff, pin, gsi))
        .collect();
    let entries: Vec<aml::Package> = routes
        .iter()
        .map(|(address, pin, gsi)| aml::Package::new(vec![address, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Name::new(
        "_PRT".into(),
        &aml::Package::new(entries.iter().map(|p| p as &dyn Aml).collect()),
    );
    // The OS may take every PCIe feature it asks for.
    let capabilities = aml::Arg(3);
    let return_capabilities = aml::Return::new(&capabilities);
    let osc = aml::Method::new("_OSC".into(), 4, false, vec![&return_capabilities]);
    let device = aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt, &osc],
    );
    aml_bytes(&device)
}

/// Motherboard resources: the ECAM window, so guests trust the MCFG.
fn motherboard_resources() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(
        false,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_SIZE as u32,
    );
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam]));
    aml_bytes(&aml::Device::new("MRES".into(), vec![&hid, &uid, &crs]))
}

/// Bits of the GED's event register; `_EVT` handles each.
pub mod ged_events {
    pub const POWER_BUTTON: u8 = 1 << 0;
}

/// The power button (PNP0C0C) and the Generic Event Device whose `_EVT` reads the event
/// register and notifies the button (0x80: "pressed").
fn power_button_and_ged() -> Vec<u8> {
    let button_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let button_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let button = aml::Device::new("PWRB".into(), vec![&button_hid, &button_uid]);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, irqs::GED);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let port = u64::from(ports::ACPI_GED);
    let size = u64::from(ports::ACPI_GED_SIZE);
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &size);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = aml::Local(0);
    let pressed = aml::Local(1);
    let register = aml::Path::new("GDAT");
    let button_path = aml::Path::new("PWRB");
    let read_events = aml::Store::new(&events, &register);
    let button_bit = aml::And::new(&pressed, &events, &ged_events::POWER_BUTTON);
    let notify = aml::Notify::new(&button_path, &0x80u8);
    let is_pressed = aml::Equal::new(&pressed, &ged_events::POWER_BUTTON);
    let if_pressed = aml::If::new(&is_pressed, vec![&notify]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_events, &button_bit, &if_pressed],
    );
    let ged = aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt]);
    [aml_bytes(&button), aml_bytes(&ged)].concat()
}

fn dsdt(config: &AcpiConfig) -> Sdt {
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_io = aml::IO::new(ports::COM1, ports::COM1, 1, ports::COM_SIZE as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, irqs::COM1);
    let com1_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let rtc_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let rtc_io = aml::IO::new(ports::CMOS, ports::CMOS, 1, ports::CMOS_SIZE as u8);
    let rtc_crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&rtc_io]));
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    let system_bus = aml::Scope::raw(
        "\\_SB_".into(),
        [
            aml_bytes(&com1),
            aml_bytes(&rtc),
            power_button_and_ged(),
            pci_root(&config.memory),
            motherboard_resources(),
        ]
        .concat(),
    );
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &SLEEP_TYPE_S5, &aml::ZERO, &aml::ZERO]),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"FERRODSD", OEM_REVISION);
    dsdt.append_slice(&system_bus);
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x)) == 0
    }

    /// Reads a whole table at `addr`, checking its signature, length and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[0..4], signature);
        let bytes = read(mem, addr, u32_at(&header, 4) as usize);
        assert!(
            checksum_ok(&bytes),
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&bytes[10..16], &OEM_ID);
        bytes
    }

    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        mcfg: Vec<u8>,
    }

    fn build(cpus: u32) -> Tables {
        let mem = mem();
        let rsdp_addr = write_acpi_tables(
            &mem,
            &AcpiConfig {
                cpus,
                memory: MemoryLayout::new(1 << 30).unwrap(),
            },
        )
        .unwrap();
        assert_eq!(rsdp_addr, ACPI_START);
        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]));
        assert!(checksum_ok(&rsdp));
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 24);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
        let mcfg = table(&mem, u64_at(&xsdt, 52), b"MCFG");
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        Tables {
            fadt,
            madt,
            dsdt,
            mcfg,
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = build(1);
        let flags = u32_at(&t.fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // RESET_REG: system I/O, 8 bits, at the ACPI reset port; then RESET_VALUE.
        assert_eq!(t.fadt[116], 1);
        assert_eq!(u64_at(&t.fadt, 120), u64::from(ports::ACPI_RESET));
        assert_eq!(t.fadt[128], ports::ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG (offsets 244 and 256).
        assert_eq!(t.fadt[244], 1);
        assert_eq!(u64_at(&t.fadt, 248), u64::from(ports::ACPI_SLEEP_CONTROL));
        assert_eq!(u64_at(&t.fadt, 260), u64::from(ports::ACPI_SLEEP_STATUS));
        assert_eq!(&t.fadt[268..276], b"FERROVMM");
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_overrides() {
        let t = build(4);
        assert_eq!(u32_at(&t.madt, 36), APIC_START as u32);
        let mut apic_ids = Vec::new();
        let (mut ioapics, mut isos, mut nmis) = (0, 0, 0);
        let mut off = 44;
        while off < t.madt.len() {
            let (kind, len) = (t.madt[off], t.madt[off + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => {
                    assert_eq!(u32_at(&t.madt, off + 4), 1, "enabled");
                    apic_ids.push(t.madt[off + 3]);
                }
                MADT_IO_APIC => {
                    assert_eq!(u32_at(&t.madt, off + 4), IOAPIC_START as u32);
                    ioapics += 1;
                }
                MADT_INTERRUPT_OVERRIDE => {
                    assert_eq!((t.madt[off + 3], u32_at(&t.madt, off + 4)), (0, 2));
                    isos += 1;
                }
                MADT_LOCAL_APIC_NMI => {
                    assert_eq!(t.madt[off + 5], 1, "LINT1");
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(off, t.madt.len());
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
        assert_eq!((ioapics, isos, nmis), (1, 1, 1));
    }

    #[test]
    fn mcfg_announces_the_ecam_of_bus_0() {
        let t = build(1);
        assert_eq!(t.mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&t.mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!(&t.mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0..0");
    }

    #[test]
    fn dsdt_has_a_power_button_behind_a_generic_event_device() {
        let t = build(1);
        let contains = |needle: &[u8]| t.dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"PWRB") && contains(b"GED_") && contains(b"_EVT") && contains(b"GDAT"));
        assert!(contains(b"ACPI0013\0"));
        // EISAID("PNP0C0C").
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, GSI 9.
        assert!(contains(&[0x89, 0x06, 0x00, 0x03, 0x01, 9, 0, 0, 0]));
        // OperationRegion(GDST, SystemIO, 0x604, 1).
        assert!(contains(&[
            0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, 0x04, 0x06, 0x01
        ]));
    }

    #[test]
    fn dsdt_describes_the_pci_root() {
        let t = build(1);
        let contains = |needle: &[u8]| t.dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"PCI0") && contains(b"_PRT") && contains(b"_OSC") && contains(b"MRES"));
        // EISAID("PNP0A08"), EISAID("PNP0A03"), EISAID("PNP0C02").
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // DWordMemory window min/max: 0xc0000000..0xdfffffff.
        assert!(contains(&[0x00, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xff, 0xdf]));
        // QWordMemory window starts at 4 GiB for 1 GiB of RAM.
        assert!(contains(&(4u64 << 30).to_le_bytes()));
        // _PRT entry for slot 3, INTB -> GSI 20: Package(4){0x3ffff, 1, 0, 20}.
        assert!(contains(&[
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 20
        ]));
    }

    #[test]
    fn sixty_four_cpus_fit() {
        let t = build(64);
        assert_eq!(t.madt.len(), 44 + 64 * 8 + 12 + 10 + 6);
    }

    #[test]
    fn dsdt_declares_s5_serial_and_rtc() {
        let t = build(1);
        let contains = |needle: &[u8]| t.dsdt.windows(needle.len()).any(|w| w == needle);
        // Name(_S5_, Package(4) {5, 5, 0, 0})
        assert!(contains(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0
        ]));
        assert!(contains(b"COM1"));
        assert!(contains(b"RTC_"));
        // EISAID("PNP0501") and EISAID("PNP0B00") encodings.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8)
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // Extended interrupt descriptor for IRQ 4, edge, active high, exclusive, consumer.
        assert!(contains(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]));
    }
}
