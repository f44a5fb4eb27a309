//! Minimal MC146818 CMOS/RTC at ports 0x70/0x71: wall-clock time (UTC, BCD), status
//! registers and the memory-size bytes a BIOS would have filled in.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{BusDevice, DeviceAction};

/// UTC date and time broken down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DateTime {
    /// Full year, e.g. 2025.
    pub year: u32,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    /// 0-23.
    pub hour: u32,
    /// 0-59.
    pub minute: u32,
    /// 0-59.
    pub second: u32,
    /// Seconds since midnight, with fraction.
    pub day_seconds: f64,
}

/// Current UTC time.
pub fn utc_now() -> DateTime {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    DateTime {
        year,
        month,
        day,
        hour: (sod / 3600) as u32,
        minute: (sod / 60 % 60) as u32,
        second: (sod % 60) as u32,
        day_seconds: sod as f64 + f64::from(now.subsec_nanos()) / 1e9,
    }
}

/// Binary to packed BCD.
pub fn bcd(v: u32) -> u8 {
    let v = v % 100;
    ((v / 10) << 4 | (v % 10)) as u8
}

/// The CMOS device (index port at offset 0, data port at offset 1).
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Cmos {
    /// The index register and the 128 bytes.
    pub(crate) fn state(&self) -> (u8, Vec<u8>) {
        (self.index, self.ram.to_vec())
    }

    /// Puts them back (`ram` is 128 bytes; the clock registers are read live anyway).
    pub(crate) fn restore(&mut self, index: u8, ram: &[u8]) {
        self.index = index & 0x7f;
        let n = ram.len().min(self.ram.len());
        self.ram[..n].copy_from_slice(&ram[..n]);
    }

    /// CMOS contents for a machine with `ram_bytes` of RAM and a floppy drive if `floppy`.
    pub fn new(ram_bytes: u64, floppy: bool) -> Cmos {
        let mut ram = [0u8; 128];
        ram[0x0a] = 0x26; // 32.768 kHz base, 1024 Hz rate
        ram[0x0b] = 0x02; // 24-hour, BCD
        ram[0x0d] = 0x80; // RTC power good
        ram[0x10] = if floppy { 0x40 } else { 0 }; // drive A: 1.44 MB
        ram[0x14] = if floppy { 0x07 } else { 0x06 }; // display: VGA, FPU, floppy
        ram[0x15] = 0x80; // base memory 640 KiB
        ram[0x16] = 0x02;
        let ext_kib = ((ram_bytes.saturating_sub(1 << 20)) >> 10).min(0xfc00) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        let above16 = ((ram_bytes.saturating_sub(16 << 20)) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        Cmos { index: 0, ram }
    }

    fn read_reg(&self, idx: u8) -> u8 {
        let t = utc_now();
        match idx {
            0x00 => bcd(t.second),
            0x02 => bcd(t.minute),
            0x04 => bcd(t.hour),
            0x06 => bcd((t.day + 3) % 7 + 1),
            0x07 => bcd(t.day),
            0x08 => bcd(t.month),
            0x09 => bcd(t.year % 100),
            0x32 => bcd(t.year / 100),
            _ => self.ram[usize::from(idx & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = if offset == 0 {
                self.index
            } else {
                self.read_reg(self.index)
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if let Some(&b) = data.first() {
            if offset == 0 {
                // Bit 7 is the NMI mask; ignore it.
                self.index = b & 0x7f;
            } else if self.index >= 0x0e {
                // Clock registers are read-only here; keep the rest writable.
                self.ram[usize::from(self.index)] = b;
            }
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_and_date() {
        assert_eq!(bcd(59), 0x59);
        let t = utc_now();
        assert!(t.year >= 2024 && (1..=12).contains(&t.month) && (1..=31).contains(&t.day));
    }

    #[test]
    fn memory_bytes() {
        let mut c = Cmos::new(16 << 20, false);
        c.write(0, &[0x30]);
        let mut lo = [0u8];
        c.read(1, &mut lo);
        c.write(0, &[0x31]);
        let mut hi = [0u8];
        c.read(1, &mut hi);
        assert_eq!(u16::from_le_bytes([lo[0], hi[0]]), 15 * 1024);
    }
}
