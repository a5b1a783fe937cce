//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and the capability
//! that enables and masks them.
//!
//! Each vector owns a GSI and an eventfd registered as an irqfd for it; programming a table
//! entry points the GSI's route at the entry's message. Triggering a masked vector only sets
//! its pending bit; unmasking delivers it.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// MSI-X capability id.
pub const CAPABILITY_ID: u8 = 0x11;
const TABLE_ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Most vectors a device may have (spec limit 2048).
pub const MAX_VECTORS: u16 = 2048;

/// An MSI message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where MSI-X vectors go: the VMM's interrupt routing (KVM GSI routing and irqfds).
pub trait MsiInterrupts: Send + Sync {
    /// A GSI with an eventfd that raises it.
    fn allocate(&self) -> std::io::Result<(u32, EventFd)>;
    /// Points `gsi` at `message`, or at nothing.
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()>;
    /// Gives back a GSI from [`MsiInterrupts::allocate`].
    fn release(&self, gsi: u32, event: &EventFd);
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TableEntry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl TableEntry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_low) | (u64::from(self.address_high) << 32),
            data: self.data,
        }
    }
}

struct Vector {
    gsi: u32,
    event: EventFd,
    /// The message currently routed (None: not routed).
    routed: Option<MsiMessage>,
}

/// The MSI-X state of one function.
pub struct MsixConfig {
    table: Vec<TableEntry>,
    pending: Vec<u64>,
    vectors: Vec<Vector>,
    control: u16,
    interrupts: Arc<dyn MsiInterrupts>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for vector in &self.vectors {
            let _ = self.interrupts.route(vector.gsi, None);
            self.interrupts.release(vector.gsi, &vector.event);
        }
    }
}

impl MsixConfig {
    /// `count` vectors (1 to [`MAX_VECTORS`]), all masked as after reset.
    pub fn new(count: u16, interrupts: Arc<dyn MsiInterrupts>) -> std::io::Result<Self> {
        let count = count.clamp(1, MAX_VECTORS);
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (gsi, event) = interrupts.allocate()?;
            vectors.push(Vector {
                gsi,
                event,
                routed: None,
            });
        }
        Ok(MsixConfig {
            table: vec![
                TableEntry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            pending: vec![0; usize::from(count).div_ceil(64)],
            vectors,
            control: 0,
            interrupts,
        })
    }

    pub fn vector_count(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * TABLE_ENTRY_SIZE
    }

    /// Size of the pending-bit array in bytes.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body (after id and next pointer) for a table at `table_offset` and a PBA
    /// at `pba_offset`, both in BAR `bar`; and its write mask.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(self.vector_count() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut mask = vec![0u8; body.len()];
        mask[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn function_masked(&self) -> bool {
        self.control & CONTROL_FUNCTION_MASK != 0
    }

    /// The guest wrote the message control register.
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        self.deliver_unmasked_pending();
    }

    /// A guest read of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.table[entry];
        let words = [e.address_low, e.address_high, e.data, e.control];
        write_le(data, words, field);
    }

    /// A guest write to the table: 32-bit fields (or a 64-bit pair) of one entry.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &mut self.table[entry];
        let mut words = [e.address_low, e.address_high, e.data, e.control];
        read_le(data, &mut words, field);
        [e.address_low, e.address_high, e.data, e.control] = words;
        self.update_route(entry);
        self.deliver_unmasked_pending();
    }

    /// Entry index and field (dword within the entry) of an aligned 4- or 8-byte access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let entry = usize::try_from(offset / TABLE_ENTRY_SIZE).ok()?;
        let field = (offset % TABLE_ENTRY_SIZE / 4) as usize;
        (entry < self.table.len()).then_some((entry, field))
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let Some(qword) = self.pending.get((offset / 8) as usize) else {
            return;
        };
        let bytes = qword.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    fn update_route(&mut self, entry: usize) {
        let message = self.table[entry].message();
        let vector = &mut self.vectors[entry];
        if vector.routed == Some(message) {
            return;
        }
        match self.interrupts.route(vector.gsi, Some(message)) {
            Ok(()) => vector.routed = Some(message),
            Err(e) => guest_log::guest_warn!("cannot route MSI-X vector {entry}: {e}"),
        }
    }

    fn is_pending(&self, vector: usize) -> bool {
        self.pending[vector / 64] & (1 << (vector % 64)) != 0
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        let bit = 1 << (vector % 64);
        if pending {
            self.pending[vector / 64] |= bit;
        } else {
            self.pending[vector / 64] &= !bit;
        }
    }

    fn deliver_unmasked_pending(&mut self) {
        if !self.enabled() || self.function_masked() {
            return;
        }
        for vector in 0..self.table.len() {
            if self.is_pending(vector) && !self.table[vector].masked() {
                self.set_pending(vector, false);
                self.signal(vector);
            }
        }
    }

    fn signal(&self, vector: usize) {
        if let Err(e) = self.vectors[vector].event.write(1) {
            guest_log::guest_warn!("cannot signal MSI-X vector {vector}: {e}");
        }
    }

    /// Raises `vector`. Returns false when MSI-X is disabled (the device should use INTx) or
    /// the vector does not exist.
    pub fn trigger(&mut self, vector: u16) -> bool {
        let vector = usize::from(vector);
        if !self.enabled() || vector >= self.table.len() {
            return false;
        }
        if self.function_masked() || self.table[vector].masked() {
            self.set_pending(vector, true);
        } else {
            self.signal(vector);
        }
        true
    }

    /// Back to the state after reset: disabled, every vector masked, nothing pending.
    pub fn reset(&mut self) {
        self.control = 0;
        for (entry, vector) in self.table.iter_mut().zip(&mut self.vectors) {
            *entry = TableEntry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
            if vector.routed.take().is_some() {
                let _ = self.interrupts.route(vector.gsi, None);
            }
        }
        self.pending.fill(0);
    }
}

fn write_le(data: &mut [u8], words: [u32; 4], first: usize) {
    for (i, chunk) in data.chunks_mut(4).enumerate() {
        if let Some(word) = words.get(first + i) {
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn read_le(data: &[u8], words: &mut [u32; 4], first: usize) {
    for (i, chunk) in data.chunks(4).enumerate() {
        if let (Some(word), Ok(bytes)) = (words.get_mut(first + i), <[u8; 4]>::try_from(chunk)) {
            *word = u32::from_le_bytes(bytes);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records routes; GSIs count up from 24.
    #[derive(Default)]
    pub struct FakeInterrupts {
        pub routes: Mutex<std::collections::BTreeMap<u32, Option<MsiMessage>>>,
        pub next: Mutex<u32>,
        pub released: Mutex<Vec<u32>>,
    }

    impl MsiInterrupts for FakeInterrupts {
        fn allocate(&self) -> std::io::Result<(u32, EventFd)> {
            let mut next = self.next.lock().unwrap();
            let gsi = 24 + *next;
            *next += 1;
            Ok((gsi, EventFd::new(libc::EFD_NONBLOCK)?))
        }
        fn route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, message);
            Ok(())
        }
        fn release(&self, gsi: u32, _event: &EventFd) {
            self.released.lock().unwrap().push(gsi);
        }
    }

    fn msix(count: u16) -> (MsixConfig, Arc<FakeInterrupts>) {
        let fake = Arc::new(FakeInterrupts::default());
        (MsixConfig::new(count, fake.clone()).unwrap(), fake)
    }

    fn fired(m: &MsixConfig, vector: usize) -> bool {
        m.vectors[vector].event.read().is_ok()
    }

    fn program(m: &mut MsixConfig, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * 16;
        m.write_table(base, &(address as u32).to_le_bytes());
        m.write_table(base + 4, &((address >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn table_entries_route_their_gsi() {
        let (mut m, fake) = msix(3);
        program(&mut m, 1, 0xfee0_1000, 0x4041, false);
        let routes = fake.routes.lock().unwrap();
        assert_eq!(
            routes.get(&25),
            Some(&Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            }))
        );
        let mut back = [0u8; 4];
        m.read_table(16 + 8, &mut back);
        assert_eq!(u32::from_le_bytes(back), 0x4041);
    }

    #[test]
    fn disabled_msix_does_not_deliver() {
        let (mut m, _fake) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        assert!(!m.trigger(0));
        assert!(!fired(&m, 0));
        m.set_control(CONTROL_ENABLE);
        assert!(m.trigger(0));
        assert!(fired(&m, 0));
    }

    #[test]
    fn masked_vectors_become_pending_and_fire_when_unmasked() {
        let (mut m, _fake) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x31, true);
        assert!(m.trigger(1));
        assert!(!fired(&m, 1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&m, 1));
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, _fake) = msix(1);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        m.trigger(0);
        assert!(!fired(&m, 0));
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&m, 0));
    }

    #[test]
    fn odd_accesses_and_reset() {
        let (mut m, fake) = msix(2);
        m.write_table(2, &[1, 2]);
        m.write_table(1000, &[0; 4]);
        let mut out = [0u8; 4];
        m.read_table(2000, &mut out);
        assert_eq!(out, [0xff; 4]);
        m.read_pba(4096, &mut [0u8; 8]);
        assert!(!m.trigger(7));
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        m.reset();
        assert_eq!(fake.routes.lock().unwrap().get(&24), Some(&None));
        let mut control = [0u8; 4];
        m.read_table(12, &mut control);
        assert_eq!(u32::from_le_bytes(control), 1, "masked after reset");
        drop(m);
        assert_eq!(*fake.released.lock().unwrap(), vec![24, 25]);
    }

    #[test]
    fn capability_layout() {
        let (m, _fake) = msix(4);
        let (body, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body, vec![3, 0, 0x00, 0x40, 0, 0, 0x00, 0x50, 0, 0]);
        assert_eq!(mask[1], 0xc0);
        assert_eq!(m.table_size(), 64);
        assert_eq!(m.pba_size(), 8);
    }
}
