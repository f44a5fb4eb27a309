//! int 14h: serial port services for COM1 (DX=0), through the same emulated 16550 the
//! guest's port I/O reaches, so the console and logs see int 14h output exactly as if the
//! guest had written the THR itself. There is no COM2-COM4.

use std::sync::atomic::Ordering;

use super::{Ctx, Firmware, ServiceOutcome};
use crate::devices::BusDevice;
use crate::ExitReason;

const THR: u64 = 0;
const DLM: u64 = 1;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const LCR_DLAB: u8 = 0x80;
const LSR_DATA_READY: u8 = 0x01;
const MCR_LOOPBACK: u8 = 0x10;
/// AH bit 7: the port timed out (or does not exist).
const TIMEOUT: u8 = 0x80;

/// Divisor of the 1.8432 MHz clock for AL bits 7-5 of AH=00h (110 ... 9600 baud), as the
/// IBM BIOS and SeaBIOS program it.
pub(crate) fn divisor(al: u8) -> u16 {
    match al >> 5 {
        0 => 0x0417,
        n => 0x0600 >> n,
    }
}

impl Firmware {
    fn uart_read(&self, reg: u64) -> u8 {
        let mut b = [0u8];
        self.com1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(reg, &mut b);
        b[0]
    }

    fn uart_write(&self, reg: u64, v: u8) {
        let _ = self
            .com1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(reg, &[v]);
    }
}

pub(super) fn int14(fw: &mut Firmware, ctx: &mut Ctx<'_>) -> ServiceOutcome {
    let r = ctx.r;
    if r.dx() != 0 {
        // No such port: report a timeout, like a BIOS whose BDA has no address for it.
        if r.ah() <= 0x03 {
            ctx.r.set_ah(TIMEOUT);
        }
        ctx.set_cf(true);
        return ServiceOutcome::Resume;
    }
    match r.ah() {
        0x00 => {
            // AL: bits 7-5 baud, 4-3 parity, 2 stop bits, 1-0 word length (= LCR bits 4-0).
            let d = divisor(r.al());
            let lcr = fw.uart_read(LCR);
            fw.uart_write(LCR, lcr | LCR_DLAB);
            fw.uart_write(THR, d as u8);
            fw.uart_write(DLM, (d >> 8) as u8);
            fw.uart_write(LCR, r.al() & 0x1f);
            ctx.r.set_ah(fw.uart_read(LSR));
            ctx.r.set_al(fw.uart_read(MSR));
        }
        0x01 => {
            // The emulated UART transmits at once, so THR is always empty: no waiting.
            let lsr = fw.uart_read(LSR);
            fw.uart_write(THR, r.al());
            ctx.r.set_ah(lsr & !TIMEOUT);
        }
        0x02 => loop {
            fw.console.idle();
            // Block (no polling) until a byte arrives or the VM is killed.
            if fw.shared.killed.load(Ordering::SeqCst) {
                return ServiceOutcome::Exit(ExitReason::Killed);
            }
            let lsr = fw.uart_read(LSR);
            if lsr & LSR_DATA_READY != 0 {
                ctx.r.set_al(fw.uart_read(THR));
                ctx.r.set_ah(lsr & !TIMEOUT);
                break;
            }
            if fw.uart_read(MCR) & MCR_LOOPBACK != 0 {
                // In loopback only the guest itself could send a byte: it never comes.
                ctx.r.set_ah(lsr | TIMEOUT);
                break;
            }
            if fw.shared.paused() {
                return ServiceOutcome::Retry;
            }
            fw.shared.wait_input();
        },
        0x03 => {
            ctx.r.set_ah(fw.uart_read(LSR));
            ctx.r.set_al(fw.uart_read(MSR));
        }
        _ => {
            fw.unsupported(0x14, r.ax());
            ctx.set_cf(true);
            return ServiceOutcome::Resume;
        }
    }
    ctx.set_cf(false);
    ServiceOutcome::Resume
}

#[cfg(test)]
mod tests {
    use super::divisor;

    #[test]
    fn divisors() {
        assert_eq!(divisor(0x03), 1047); // 110 baud
        assert_eq!(divisor(0x23), 768); // 150
        assert_eq!(divisor(0x83), 96); // 1200
        assert_eq!(divisor(0xe3), 12); // 9600
    }
}
