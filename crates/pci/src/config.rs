//! A PCI function's configuration space (type 0 header) with write masks, BARs and capabilities.

/// Size of the configuration space of a function reached through ECAM.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Offset of the first capability.
const FIRST_CAPABILITY: usize = 0x40;
/// Conventional configuration space, where capabilities live.
const CONVENTIONAL_SIZE: usize = 256;

pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const BAR0: usize = 0x10;
pub const CAPABILITY_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 1 << 3;
pub const NUM_BARS: usize = 6;

/// What a BAR maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    /// A 64-bit memory BAR; it also occupies the next BAR slot.
    Mem64 {
        prefetchable: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// Errors while building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already used")]
    BarUnavailable(usize),
    #[error(
        "BAR size {0:#x} is not a power of two of at least 16 bytes (4 GiB at most for 32-bit)"
    )]
    BarSize(u64),
    #[error("no room left for a capability of {0} bytes")]
    NoCapabilitySpace(usize),
}

/// The header and capabilities of one function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    bars: [Option<Bar>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfiguration {
    pub fn new(id: PciIdentity) -> Self {
        let mut config = PciConfiguration {
            regs: Box::new([0; NUM_REGS]),
            writable: Box::new([0; NUM_REGS]),
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        config.regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        config.regs[2] = u32::from(id.revision)
            | (u32::from(id.class.2) << 8)
            | (u32::from(id.class.1) << 16)
            | (u32::from(id.class.0) << 24);
        config.regs[0x2c / 4] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        config.writable[COMMAND / 4] = u32::from(COMMAND_WRITABLE);
        // Cache line size and latency timer are plain storage; so is the interrupt line.
        config.writable[0x0c / 4] = 0x0000_ffff;
        config.writable[INTERRUPT_LINE / 4] = 0x0000_00ff;
        config
    }

    /// Sets the legacy interrupt pin (1 = INTA .. 4 = INTD; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.write_byte_internal(INTERRUPT_PIN, pin);
    }

    /// Declares BAR `index` with `size` bytes at guest address `addr`.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
        addr: u64,
    ) -> Result<(), ConfigError> {
        let slots = match kind {
            BarKind::Mem32 => 1,
            BarKind::Mem64 { .. } => 2,
        };
        if index + slots > NUM_BARS || self.bars[index..index + slots].iter().any(Option::is_some) {
            return Err(ConfigError::BarUnavailable(index));
        }
        let too_big = matches!(kind, BarKind::Mem32) && size > 1 << 32;
        if !size.is_power_of_two() || size < 16 || too_big {
            return Err(ConfigError::BarSize(size));
        }
        let mask = !(size - 1);
        let reg = BAR0 / 4 + index;
        let flags = match kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => {
                BAR_MEM64 | if prefetchable { BAR_PREFETCHABLE } else { 0 }
            }
        };
        self.regs[reg] = (addr as u32 & mask as u32) | flags;
        self.writable[reg] = mask as u32 & !0xf;
        if slots == 2 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
            self.bars[index + 1] = Some(Bar { size, kind });
        }
        self.bars[index] = Some(Bar { size, kind });
        Ok(())
    }

    /// The guest address BAR `index` holds (None for a missing or upper-half slot).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        if index > 0 && self.is_upper_half(index) {
            return None;
        }
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & !0xf);
        Some(match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 { .. } => low | (u64::from(self.regs[reg + 1]) << 32),
        })
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && matches!(
                self.bars[index - 1],
                Some(Bar {
                    kind: BarKind::Mem64 { .. },
                    ..
                })
            )
            && !self.is_upper_half(index - 1)
    }

    /// Size of BAR `index` (None for a missing or upper-half slot).
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bar_address(index)?;
        self.bars[index].map(|b| b.size)
    }

    /// Indices of the BARs (lower halves only).
    pub fn bars(&self) -> impl Iterator<Item = usize> + '_ {
        (0..NUM_BARS).filter(|&i| self.bar_address(i).is_some())
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND / 4] as u16
    }

    pub fn memory_decoding(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Appends a capability with id `id` and `body` (the bytes after id and next pointer);
    /// `writable` masks the body bytes the guest may write (same length, or empty for none).
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_capability;
        if offset + len > CONVENTIONAL_SIZE {
            return Err(ConfigError::NoCapabilitySpace(len));
        }
        self.write_byte_internal(offset, id);
        self.write_byte_internal(offset + 1, 0);
        for (i, byte) in body.iter().enumerate() {
            self.write_byte_internal(offset + 2 + i, *byte);
            let mask = writable.get(i).copied().unwrap_or(0);
            self.set_writable_byte(offset + 2 + i, mask);
        }
        match self.last_capability {
            Some(last) => self.write_byte_internal(last + 1, offset as u8),
            None => {
                self.write_byte_internal(CAPABILITY_POINTER, offset as u8);
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
                self.write_u16_internal(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.writable[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned) at `offset`; anything else
    /// reads as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let aligned = matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len());
        if !aligned || offset + data.len() > CONFIG_SPACE_SIZE {
            data.fill(0xff);
            return;
        }
        let value = self.regs[offset / 4] >> ((offset % 4) * 8);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (value >> (i * 8)) as u8;
        }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A guest write: only the bits the write masks allow change. Misaligned or odd-sized
    /// writes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let aligned = matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len());
        if !aligned || offset + data.len() > CONFIG_SPACE_SIZE {
            return;
        }
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, byte) in data.iter().enumerate() {
            value |= u32::from(*byte) << (shift + i * 8);
            mask |= 0xff << (shift + i * 8);
        }
        let reg = offset / 4;
        let writable = self.writable[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !writable) | (value & writable);
    }

    /// Writes bytes regardless of the masks (for the device model itself).
    pub fn write_internal(&mut self, offset: usize, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.write_byte_internal(offset + i, *byte);
        }
    }

    fn write_byte_internal(&mut self, offset: usize, value: u8) {
        if offset >= CONFIG_SPACE_SIZE {
            return;
        }
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    fn write_u16_internal(&mut self, offset: usize, value: u16) {
        self.write_internal(offset, &value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (0x01, 0x00, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        })
    }

    #[test]
    fn identity_registers() {
        let c = config();
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0100_0001);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        let mut byte = [0u8];
        c.read(0x0e, &mut byte);
        assert_eq!(byte[0], 0, "header type 0");
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut c = config();
        c.write(0, &0xdead_beef_u32.to_le_bytes());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        c.write(COMMAND, &0xffff_u16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.write(INTERRUPT_LINE, &[11]);
        let mut b = [0u8];
        c.read(INTERRUPT_LINE, &mut b);
        assert_eq!(b[0], 11);
    }

    #[test]
    fn bar64_sizing_and_programming() {
        let mut c = config();
        c.add_bar(
            0,
            0x8000,
            BarKind::Mem64 {
                prefetchable: false,
            },
            0x10_0000_0000,
        )
        .unwrap();
        assert_eq!(c.bar_address(0), Some(0x10_0000_0000));
        assert_eq!(c.bar_address(1), None, "upper half");
        assert_eq!(c.bars().collect::<Vec<_>>(), vec![0]);
        // Sizing: write all ones, read the mask back.
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0), 0xffff_8004);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffff);
        // Programming a new address.
        c.write(BAR0, &0xe000_0000_u32.to_le_bytes());
        c.write(BAR0 + 4, &0x1_u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_e000_0000));
        assert_eq!(c.bar_size(0), Some(0x8000));
    }

    #[test]
    fn bar32_keeps_low_bits() {
        let mut c = config();
        c.add_bar(2, 0x1000, BarKind::Mem32, 0xc000_1000).unwrap();
        c.write(BAR0 + 8, &0xffff_ffff_u32.to_le_bytes());
        assert_eq!(c.read_u32(BAR0 + 8), 0xffff_f000);
        assert!(c.add_bar(2, 0x1000, BarKind::Mem32, 0).is_err());
        assert!(c
            .add_bar(5, 0x1000, BarKind::Mem64 { prefetchable: true }, 0)
            .is_err());
        assert_eq!(
            c.add_bar(3, 24, BarKind::Mem32, 0),
            Err(ConfigError::BarSize(24))
        );
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = config();
        let first = c.add_capability(0x11, &[0; 10], &[]).unwrap();
        let second = c
            .add_capability(0x09, &[14, 1, 2, 3], &[0, 0, 0xff, 0])
            .unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x4c);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        let mut b = [0u8];
        c.read(CAPABILITY_POINTER, &mut b);
        assert_eq!(b[0], 0x40);
        c.read(first + 1, &mut b);
        assert_eq!(b[0] as usize, second);
        c.read(second + 1, &mut b);
        assert_eq!(b[0], 0);
        // Only the masked byte of the second capability is writable.
        c.write(second + 4, &[0xaa]);
        c.write(second + 5, &[0xaa]);
        c.read(second + 4, &mut b);
        assert_eq!(b[0], 0xaa);
        c.read(second + 5, &mut b);
        assert_eq!(b[0], 3);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut c = config();
        let mut three = [0u8; 3];
        c.read(0, &mut three);
        assert_eq!(three, [0xff; 3]);
        let mut misaligned = [0u8; 4];
        c.read(2, &mut misaligned);
        assert_eq!(misaligned, [0xff; 4]);
        c.write(4095, &[1, 2]);
        c.write(CONFIG_SPACE_SIZE, &[1]);
        let mut beyond = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE, &mut beyond);
        assert_eq!(beyond, [0xff; 4]);
        assert!(c.add_capability(9, &[0; 300], &[]).is_err());
    }
}
