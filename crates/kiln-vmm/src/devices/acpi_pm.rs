//! ACPI fixed-hardware PM1a event/control block and PM timer, as on QEMU's PIIX4
//! (relocated to 0x600 like QEMU's `pm_io_base`).
//!
//! ```text
//! 0x600  PM1a_STS  (W1C)  bit 8 PWRBTN_STS, bit 0 TMR_STS, bit 15 WAK_STS
//! 0x602  PM1a_EN          bit 8 PWRBTN_EN
//! 0x604  PM1a_CNT         bit 0 SCI_EN, bits 10-12 SLP_TYP, bit 13 SLP_EN (write-only)
//! 0x608  PM_TMR           24-bit counter at 3.579545 MHz
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{BusDevice, DeviceAction};
use crate::shared::Shared;

/// I/O base of the PM1a event block.
pub const PM_BASE: u16 = 0x600;
/// Length of the claimed range (event 4 + control 2 + pad 2 + timer 4).
pub const PM_LEN: u16 = 12;
/// SMI command port (FADT SMI_CMD), as on PIIX4.
pub const SMI_CMD_PORT: u16 = 0xb2;
/// Value written to SMI_CMD to enable ACPI (sets SCI_EN).
pub const ACPI_ENABLE: u8 = 0xf1;
/// Value written to SMI_CMD to disable ACPI.
pub const ACPI_DISABLE: u8 = 0xf0;
/// PWRBTN_STS / PWRBTN_EN bit.
pub const PWRBTN: u16 = 1 << 8;
/// SLP_EN bit of PM1_CNT.
pub const SLP_EN: u16 = 1 << 13;
/// SCI_EN bit of PM1_CNT.
pub const SCI_EN: u16 = 1;
/// PM timer frequency in Hz.
pub const PM_TIMER_HZ: u128 = 3_579_545;
/// SLP_TYP value our DSDT's `_S5_` package announces.
pub const S5_SLP_TYP: u16 = 0;

/// PM1a registers.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    start: Instant,
    shared: Arc<Shared>,
}

impl AcpiPm {
    pub(crate) fn new(shared: Arc<Shared>) -> AcpiPm {
        AcpiPm {
            sts: 0,
            en: 0,
            cnt: 0,
            start: Instant::now(),
            shared,
        }
    }

    /// Latches a pending power-button press into PWRBTN_STS.
    fn latch_button(&mut self) {
        let mut inner = self.shared.lock();
        if inner.power_button {
            inner.power_button = false;
            self.sts |= PWRBTN;
        }
    }

    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks & 0xff_ffff) as u32
    }

    /// Reads one byte of the register file.
    fn read_byte(&mut self, off: u64) -> u8 {
        match off {
            0 | 1 => {
                self.latch_button();
                (self.sts >> (8 * off)) as u8
            }
            2 | 3 => (self.en >> (8 * (off - 2))) as u8,
            // SLP_EN is write-only and reads as 0.
            4 | 5 => ((self.cnt & !SLP_EN) >> (8 * (off - 4))) as u8,
            8..=11 => (self.timer() >> (8 * (off - 8))) as u8,
            _ => 0,
        }
    }

    /// PM1a status, enable and control.
    pub(crate) fn state(&self) -> [u16; 3] {
        [self.sts, self.en, self.cnt]
    }

    /// Puts the registers back (SLP_EN never stays set).
    pub(crate) fn restore(&mut self, [sts, en, cnt]: [u16; 3]) {
        (self.sts, self.en, self.cnt) = (sts, en, cnt & !SLP_EN);
    }

    /// SCI_EN as the guest last set it (through SMI_CMD or PM1_CNT).
    pub fn sci_enabled(&self) -> bool {
        self.cnt & SCI_EN != 0
    }

    fn set_sci_en(&mut self, on: bool) {
        if on {
            self.cnt |= SCI_EN;
        } else {
            self.cnt &= !SCI_EN;
        }
    }
}

fn merge(reg: u16, byte_index: u64, value: u8) -> u16 {
    let shift = 8 * byte_index;
    (reg & !(0xff << shift)) | (u16::from(value) << shift)
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset + i as u64);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let mut sleep = false;
        for (i, &b) in data.iter().enumerate() {
            match offset + i as u64 {
                // Write-1-to-clear; latch first so a press is not lost by the clear.
                o @ (0 | 1) => {
                    self.latch_button();
                    self.sts &= !(u16::from(b) << (8 * o));
                }
                o @ (2 | 3) => self.en = merge(self.en, o - 2, b),
                o @ (4 | 5) => {
                    self.cnt = merge(self.cnt, o - 4, b);
                    sleep |= self.cnt & SLP_EN != 0;
                }
                _ => {}
            }
        }
        if sleep {
            self.cnt &= !SLP_EN;
            let typ = (self.cnt >> 10) & 7;
            if typ == S5_SLP_TYP {
                tracing::info!("guest entered ACPI S5 (PM1_CNT SLP_EN, SLP_TYP {typ})");
                return DeviceAction::PowerOff;
            }
            tracing::warn!("guest asked for sleep type {typ}, only S5 (0) is supported; ignored");
        }
        DeviceAction::None
    }
}

/// SMI_CMD port (0xB2): ACPI enable/disable handshake.
pub struct SmiCmd(pub Arc<Mutex<AcpiPm>>);

impl BusDevice for SmiCmd {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
        let mut pm = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match data.first() {
            Some(&ACPI_ENABLE) => pm.set_sci_en(true),
            Some(&ACPI_DISABLE) => pm.set_sci_en(false),
            _ => {}
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd16(pm: &mut AcpiPm, off: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn power_button_and_s5() {
        let shared = Arc::new(Shared::default());
        let mut pm = AcpiPm::new(shared.clone());
        assert_eq!(pm.write(2, &PWRBTN.to_le_bytes()), DeviceAction::None);
        assert_eq!(rd16(&mut pm, 2), PWRBTN);
        assert_eq!(rd16(&mut pm, 0), 0);
        shared.lock().power_button = true;
        assert_eq!(rd16(&mut pm, 0) & PWRBTN, PWRBTN);
        // Writing 0 does not clear; writing 1 does.
        pm.write(0, &[0, 0]);
        assert_eq!(rd16(&mut pm, 0) & PWRBTN, PWRBTN);
        pm.write(0, &PWRBTN.to_le_bytes());
        assert_eq!(rd16(&mut pm, 0), 0);
        // Other sleep types are ignored, S5 powers off.
        assert_eq!(
            pm.write(4, &(SLP_EN | (5 << 10)).to_le_bytes()),
            DeviceAction::None
        );
        assert_eq!(pm.write(4, &SLP_EN.to_le_bytes()), DeviceAction::PowerOff);
    }

    #[test]
    fn timer_runs() {
        let mut pm = AcpiPm::new(Arc::new(Shared::default()));
        let mut a = [0u8; 4];
        pm.read(8, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut b = [0u8; 4];
        pm.read(8, &mut b);
        let d = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a)) & 0xff_ffff;
        assert!(d >= 7000, "timer advanced only {d} ticks in 2 ms");
    }
}
