//! Small legacy PC ports: i8042 (reset), system control ports, reset control, POST code
//! port and the Bochs/QEMU debug console port.

use std::io::Write;

use super::{BusDevice, ConsoleOut, DeviceAction};

/// i8042 keyboard controller at 0x60-0x64 (also covers port 0x61, system control B).
///
/// Only what boot code touches: status reads, the 0xFE pulse-reset command, and a
/// refresh bit in port 0x61 that toggles so delay loops finish.
#[derive(Debug, Default)]
pub struct I8042 {
    port61: u8,
}

impl I8042 {
    /// Port 61h as the guest last set it.
    pub(crate) fn port61(&self) -> u8 {
        self.port61
    }

    pub(crate) fn set_port61(&mut self, v: u8) {
        self.port61 = v;
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            // Status: output buffer empty, input buffer empty, system flag set.
            4 => 0x1c,
            1 => {
                self.port61 ^= 0x10;
                self.port61
            }
            _ => 0,
        };
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        match (offset, data.first()) {
            (4, Some(0xfe)) => DeviceAction::Reset,
            (1, Some(&v)) => {
                self.port61 = v & 0x0f;
                DeviceAction::None
            }
            _ => DeviceAction::None,
        }
    }
}

/// System control port A (0x92): fast A20 (always on) and bit 0 fast reset.
#[derive(Debug, Default)]
pub struct Port92;

impl BusDevice for Port92 {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0x02);
    }
    fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
        match data.first() {
            Some(v) if v & 1 != 0 => DeviceAction::Reset,
            _ => DeviceAction::None,
        }
    }
}

/// Reset control register (0xCF9): writing 0x06 or 0x0E resets.
#[derive(Debug, Default)]
pub struct ResetControl;

impl BusDevice for ResetControl {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
        match data.first() {
            Some(v) if v & 0x04 != 0 => DeviceAction::Reset,
            _ => DeviceAction::None,
        }
    }
}

/// Quietly ignored ports (POST code 0x80, I/O delay 0xED): reads 0, writes dropped.
#[derive(Debug, Default)]
pub struct Quiet;

impl BusDevice for Quiet {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) -> DeviceAction {
        DeviceAction::None
    }
}

/// Bochs/QEMU debug console (0xE9): bytes written go to the console; reads 0xE9.
pub struct DebugCon(pub ConsoleOut);

impl BusDevice for DebugCon {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xe9);
    }
    fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
        let _ = self.0.write_all(data).and_then(|_| self.0.flush());
        DeviceAction::None
    }
}
