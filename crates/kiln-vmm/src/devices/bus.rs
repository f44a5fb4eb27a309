//! Address-range bus used for both port I/O and MMIO.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// What the VMM must do after a device write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    /// Nothing; resume the guest.
    None,
    /// The guest asked to power off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 0xFE, port 0x92, port 0xCF9).
    Reset,
}

/// A device on a bus. `offset` is relative to the base it was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction;
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// Distinct unclaimed regions a bus logs before it stops logging them (a hostile guest
/// can touch millions of pages; the log and the set of logged regions stay bounded).
pub const MAX_LOGGED_REGIONS: usize = 64;

/// A bus: sorted, non-overlapping ranges of devices. Accesses nobody claims are ignored
/// (reads return all-ones) and logged once per region of `1 << region_shift` addresses
/// (16 ports, a 4 KiB MMIO page), for at most [`MAX_LOGGED_REGIONS`] regions.
pub struct Bus {
    name: &'static str,
    entries: Vec<Entry>,
    region_shift: u32,
    logged: HashSet<u64>,
    unknown_accesses: u64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus; `name` ("pio"/"mmio") appears in log lines. Unclaimed accesses are
    /// logged once per block of `1 << region_shift` addresses.
    pub fn new(name: &'static str, region_shift: u32) -> Bus {
        Bus {
            name,
            entries: Vec::new(),
            region_shift: region_shift.min(63),
            logged: HashSet::new(),
            unknown_accesses: 0,
        }
    }

    /// Unclaimed accesses so far, and how many regions were logged (one warning each).
    pub fn unknown_stats(&self) -> (u64, usize) {
        (self.unknown_accesses, self.logged.len())
    }

    /// Claims `[base, base + len)` for `dev`. Fails if the range overlaps another device.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), String> {
        if len == 0 {
            return Err(format!("{} device at {base:#x} has zero length", self.name));
        }
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(format!(
                "{} range {base:#x}+{len:#x} overlaps another device",
                self.name
            ));
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    fn log_unknown(&mut self, kind: &str, addr: u64, len: usize) {
        self.unknown_accesses = self.unknown_accesses.saturating_add(1);
        if self.logged.len() >= MAX_LOGGED_REGIONS {
            return;
        }
        let region = addr >> self.region_shift;
        if !self.logged.insert(region) {
            return;
        }
        let start = region << self.region_shift;
        let end = start.saturating_add((1u64 << self.region_shift) - 1);
        if self.logged.len() == MAX_LOGGED_REGIONS {
            tracing::warn!(
                "unhandled {} {kind} at {addr:#x} ({len} bytes); ignored; {MAX_LOGGED_REGIONS} regions logged, further unhandled {} accesses are not logged",
                self.name,
                self.name
            );
        } else {
            tracing::warn!(
                "unhandled {} {kind} at {addr:#x} ({len} bytes); ignored (logged once for {start:#x}-{end:#x})",
                self.name
            );
        }
    }

    /// Dispatches a read; unclaimed addresses read as all-ones.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some((e, off)) = self.find(addr) {
            let mut dev = e.dev.lock().unwrap_or_else(|p| p.into_inner());
            dev.read(off, data);
            return;
        }
        data.fill(0xff);
        self.log_unknown("read", addr, data.len());
    }

    /// Dispatches a write; unclaimed addresses are ignored.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> DeviceAction {
        if let Some((e, off)) = self.find(addr) {
            let mut dev = e.dev.lock().unwrap_or_else(|p| p.into_inner());
            return dev.write(off, data);
        }
        self.log_unknown("write", addr, data.len());
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, off: u64, data: &mut [u8]) {
            data.fill(self.0 + off as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
            self.0 = data[0];
            DeviceAction::None
        }
    }

    #[test]
    fn dispatch_and_unknown() {
        let mut bus = Bus::new("pio", 4);
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x20, 1, Arc::new(Mutex::new(Reg(7)))).unwrap();
        assert!(bus.insert(0x12, 8, Arc::new(Mutex::new(Reg(0)))).is_err());
        let mut b = [0u8; 1];
        bus.read(0x13, &mut b);
        assert_eq!(b, [4]);
        bus.read(0x20, &mut b);
        assert_eq!(b, [7]);
        bus.read(0x14, &mut b);
        assert_eq!(b, [0xff]);
        bus.read(0x0f, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(bus.write(0x10, &[9]), DeviceAction::None);
        bus.read(0x10, &mut b);
        assert_eq!(b, [9]);
    }

    #[test]
    fn unknown_accesses_are_logged_once_per_region_and_bounded() {
        let mut bus = Bus::new("pio", 4);
        let mut b = [0u8; 2];
        for port in 0x100..0x200 {
            bus.read(port, &mut b);
            bus.write(port, &b);
        }
        assert_eq!(bus.unknown_stats(), (512, 16));
        let mut mmio = Bus::new("mmio", 12);
        for page in 0..100_000u64 {
            mmio.write(0xe000_0000 + page * 0x800, &[0]);
        }
        assert_eq!(mmio.unknown_stats(), (100_000, MAX_LOGGED_REGIONS));
    }
}
