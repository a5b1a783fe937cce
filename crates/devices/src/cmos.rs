//! The MC146818 real-time clock and CMOS memory (ports 0x70 index, 0x71 data).
//!
//! The clock follows the host's UTC clock plus an offset; when the guest sets the time (with
//! the SET bit in register B, as Linux does), the offset changes so that the guest's time then
//! keeps running from what it wrote. Registers are encoded in BCD or binary and in 12- or
//! 24-hour form as register B asks. The RAM size fields firmware would fill are filled too.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::ByteRegisters;

const INDEX_PORT: u64 = 0;
const DATA_PORT: u64 = 1;
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
const TIME_REGISTERS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

const REG_A_UPDATE_IN_PROGRESS: u8 = 1 << 7;
const REG_A_DEFAULT: u8 = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
const REG_B_SET: u8 = 1 << 7;
const REG_B_BINARY: u8 = 1 << 2;
const REG_B_24_HOUR: u8 = 1 << 1;
const REG_D_VALID_RAM_AND_TIME: u8 = 1 << 7;
const HOUR_PM: u8 = 1 << 7;

/// Where the guest's clock comes from: seconds since the Unix epoch.
pub type ClockSource = Box<dyn Fn() -> i64 + Send>;

fn host_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The RTC/CMOS device.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: ClockSource,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32, // 1 = Sunday
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            weekday: (days + 4).rem_euclid(7) as u32 + 1,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    fn is_valid(&self) -> bool {
        (1..=12).contains(&self.month)
            && (1..=31).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
    }
}

impl Cmos {
    /// A CMOS for a guest with `below_4g` bytes of RAM under 4 GiB and `above_4g` above it.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        Self::with_clock(below_4g, above_4g, Box::new(host_clock))
    }

    /// Like [`Cmos::new`] with a custom clock (tests).
    pub fn with_clock(below_4g: u64, above_4g: u64, clock: ClockSource) -> Self {
        let mut cmos = Cmos {
            index: 0,
            ram: [0; 128],
            offset: 0,
            clock,
        };
        cmos.ram[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos.ram[usize::from(REG_B)] = REG_B_24_HOUR;
        cmos.ram[usize::from(REG_D)] = REG_D_VALID_RAM_AND_TIME;
        cmos.store_memory_size(below_4g, above_4g);
        cmos
    }

    fn store_memory_size(&mut self, below_4g: u64, above_4g: u64) {
        let mut put16 = |reg: usize, value: u64| {
            let value = value.min(0xffff) as u16;
            self.ram[reg..reg + 2].copy_from_slice(&value.to_le_bytes());
        };
        put16(0x15, 640); // base memory in KiB
        let extended_kib = below_4g.saturating_sub(1 << 20) >> 10;
        put16(0x17, extended_kib);
        put16(0x30, extended_kib);
        put16(0x34, below_4g.saturating_sub(16 << 20) >> 16);
        let above_64k = above_4g >> 16;
        self.ram[0x5b..0x5e].copy_from_slice(&above_64k.to_le_bytes()[..3]);
    }

    fn reg_b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    fn encode(&self, value: u32) -> u8 {
        let value = value as u8;
        if self.reg_b() & REG_B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, raw: u8) -> u32 {
        if self.reg_b() & REG_B_BINARY != 0 {
            u32::from(raw)
        } else {
            u32::from(raw >> 4) * 10 + u32::from(raw & 0xf)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.reg_b() & REG_B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, raw: u8) -> u32 {
        if self.reg_b() & REG_B_24_HOUR != 0 {
            return self.decode(raw);
        }
        let hour = self.decode(raw & !HOUR_PM) % 12;
        if raw & HOUR_PM != 0 {
            hour + 12
        } else {
            hour
        }
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)() + self.offset)
    }

    /// Encodes the current guest time into the time registers of `ram`.
    fn latch_time(&mut self) {
        let t = self.now();
        let fields = [
            (REG_SECONDS, self.encode(t.second)),
            (REG_MINUTES, self.encode(t.minute)),
            (REG_HOURS, self.encode_hour(t.hour)),
            (REG_WEEKDAY, self.encode(t.weekday)),
            (REG_DAY, self.encode(t.day)),
            (REG_MONTH, self.encode(t.month)),
            (REG_YEAR, self.encode(t.year.rem_euclid(100) as u32)),
            (REG_CENTURY, self.encode(t.year.div_euclid(100) as u32)),
        ];
        for (reg, value) in fields {
            self.ram[usize::from(reg)] = value;
        }
    }

    /// Makes the time in the registers the guest's current time.
    fn adopt_time(&mut self) {
        let reg = |r: u8| self.ram[usize::from(r)];
        let t = DateTime {
            year: i64::from(self.decode(reg(REG_CENTURY))) * 100
                + i64::from(self.decode(reg(REG_YEAR))),
            month: self.decode(reg(REG_MONTH)),
            day: self.decode(reg(REG_DAY)),
            hour: self.decode_hour(reg(REG_HOURS)),
            minute: self.decode(reg(REG_MINUTES)),
            second: self.decode(reg(REG_SECONDS)),
            weekday: 0,
        };
        if t.is_valid() {
            self.offset = t.to_unix() - (self.clock)();
        } else {
            guest_log::guest_warn!("guest wrote an invalid RTC time {t:?}; clock unchanged");
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let setting = self.reg_b() & REG_B_SET != 0;
        match reg {
            r if TIME_REGISTERS.contains(&r) && !setting => {
                self.latch_time();
                self.ram[usize::from(r)]
            }
            // No update cycle is ever in progress: the value is computed on each read.
            REG_A => self.ram[usize::from(REG_A)] & !REG_A_UPDATE_IN_PROGRESS,
            REG_C => 0, // no interrupt flags: this RTC raises no interrupts
            REG_D => REG_D_VALID_RAM_AND_TIME,
            r => self.ram[usize::from(r)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let setting = self.reg_b() & REG_B_SET != 0;
        match reg {
            REG_B => {
                if value & REG_B_SET != 0 && !setting {
                    self.latch_time(); // freeze the clock in the registers
                }
                self.ram[usize::from(REG_B)] = value;
                if value & REG_B_SET == 0 && setting {
                    self.adopt_time();
                }
            }
            REG_C | REG_D => {} // read-only
            r if TIME_REGISTERS.contains(&r) => {
                if !setting {
                    self.latch_time();
                }
                self.ram[usize::from(r)] = value;
                if !setting {
                    self.adopt_time();
                }
            }
            r => self.ram[usize::from(r)] = value,
        }
    }
}

impl ByteRegisters for Cmos {
    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_PORT => self.read_register(self.index),
            _ => 0xff, // the index register is write-only
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            // Bit 7 of the index port gates NMIs on real hardware; it is not part of the index.
            INDEX_PORT => self.index = value & INDEX_MASK,
            DATA_PORT => self.write_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    // 2026-11-23 12:34:56 UTC, a Monday.
    const NOW: i64 = 1_795_437_296;

    fn cmos_at(now: Arc<AtomicI64>) -> Cmos {
        Cmos::with_clock(512 << 20, 0, Box::new(move || now.load(Ordering::SeqCst)))
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(INDEX_PORT, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(DATA_PORT, &mut b);
        b[0]
    }

    fn write(c: &mut Cmos, reg: u8, value: u8) {
        c.write(INDEX_PORT, &[reg]);
        c.write(DATA_PORT, &[value]);
    }

    #[test]
    fn date_conversion_round_trips() {
        for secs in [0, 951_782_400, NOW, 4_102_444_800, -86_400] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        let t = DateTime::from_unix(NOW);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 23));
        assert_eq!((t.hour, t.minute, t.second), (12, 34, 56));
        assert_eq!(t.weekday, 2, "Monday");
        assert_eq!(
            DateTime::from_unix(0).weekday,
            5,
            "1970-01-01 was a Thursday"
        );
        // Leap day.
        let leap = DateTime::from_unix(951_782_400);
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn reads_host_time_in_bcd_24_hour() {
        let mut c = cmos_at(Arc::new(AtomicI64::new(NOW)));
        assert_eq!(read(&mut c, REG_SECONDS), 0x56);
        assert_eq!(read(&mut c, REG_MINUTES), 0x34);
        assert_eq!(read(&mut c, REG_HOURS), 0x12);
        assert_eq!(read(&mut c, REG_DAY), 0x23);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_A) & REG_A_UPDATE_IN_PROGRESS, 0);
        assert_eq!(read(&mut c, REG_D), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = cmos_at(Arc::new(AtomicI64::new(NOW + 3600))); // 13:34:56
        write(&mut c, REG_B, REG_B_BINARY);
        assert_eq!(read(&mut c, REG_MINUTES), 34);
        assert_eq!(read(&mut c, REG_HOURS), 1 | HOUR_PM);
        write(&mut c, REG_B, REG_B_BINARY | REG_B_24_HOUR);
        assert_eq!(read(&mut c, REG_HOURS), 13);
    }

    #[test]
    fn guest_set_time_keeps_running() {
        let now = Arc::new(AtomicI64::new(NOW));
        let mut c = cmos_at(now.clone());
        // Linux's sequence: set SET, write fields, clear SET.
        write(&mut c, REG_B, REG_B_24_HOUR | REG_B_SET);
        for (reg, value) in [
            (REG_YEAR, 0x99),
            (REG_CENTURY, 0x19),
            (REG_MONTH, 0x12),
            (REG_DAY, 0x31),
            (REG_HOURS, 0x23),
            (REG_MINUTES, 0x59),
            (REG_SECONDS, 0x50),
        ] {
            write(&mut c, reg, value);
        }
        assert_eq!(read(&mut c, REG_SECONDS), 0x50, "frozen while SET");
        write(&mut c, REG_B, REG_B_24_HOUR);
        now.fetch_add(15, Ordering::SeqCst);
        assert_eq!(read(&mut c, REG_SECONDS), 0x05);
        assert_eq!(read(&mut c, REG_MINUTES), 0x00);
        assert_eq!(read(&mut c, REG_YEAR), 0x00);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_MONTH), 0x01);
    }

    #[test]
    fn invalid_guest_time_is_ignored() {
        let mut c = cmos_at(Arc::new(AtomicI64::new(NOW)));
        write(&mut c, REG_B, REG_B_24_HOUR | REG_B_SET);
        write(&mut c, REG_MONTH, 0x13);
        write(&mut c, REG_B, REG_B_24_HOUR);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
    }

    #[test]
    fn nvram_and_memory_size() {
        let mut c = cmos_at(Arc::new(AtomicI64::new(NOW)));
        write(&mut c, 0x40, 0xab);
        assert_eq!(read(&mut c, 0x40), 0xab);
        assert_eq!(
            read(&mut c, 0xc0),
            0xab,
            "bit 7 of the index is the NMI gate"
        );
        // (512 MiB - 16 MiB) / 64 KiB = 7936 = 0x1f00
        assert_eq!((read(&mut c, 0x34), read(&mut c, 0x35)), (0x00, 0x1f));
        write(&mut c, REG_C, 0xff);
        assert_eq!(read(&mut c, REG_C), 0);
    }
}
