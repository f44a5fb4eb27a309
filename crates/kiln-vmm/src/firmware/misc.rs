//! int 15h (system/memory), int 16h (keyboard) and int 1Ah (time).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Ctx, Firmware, ServiceOutcome, BDA_BASE};
use crate::devices::cmos::{bcd, utc_now};
use crate::firmware::bios::BASE_MEM_KIB;
use crate::vstate::memory::HIGH_START;
use crate::ExitReason;

const SMAP: u32 = 0x534d_4150;

/// The E820 map: (base, length, type).
pub(crate) fn e820_map(ram_bytes: u64) -> [(u64, u64, u32); 4] {
    let base = u64::from(BASE_MEM_KIB) * 1024;
    [
        (0, base, 1),
        (base, 0xa_0000 - base, 2),
        (0xe_0000, 0x2_0000, 2),
        (HIGH_START, ram_bytes - HIGH_START, 1),
    ]
}

pub(super) fn int15(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    let ext_kib = (fw.ram_bytes - HIGH_START) >> 10;
    match r.ax() {
        0xe820 if r.edx() == SMAP => {
            let map = e820_map(fw.ram_bytes);
            let idx = r.ebx() as usize;
            let Some(&(base, len, typ)) = map.get(idx) else {
                ctx.r.set_ah(0x86);
                ctx.set_cf(true);
                return;
            };
            let mut e = Vec::with_capacity(24);
            e.extend_from_slice(&base.to_le_bytes());
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&typ.to_le_bytes());
            let size = if r.ecx() >= 24 { 24 } else { 20 };
            if size == 24 {
                e.extend_from_slice(&1u32.to_le_bytes());
            }
            ctx.write_bytes(ctx.es_lin(u64::from(r.di())), &e);
            ctx.r.set_eax(SMAP);
            ctx.r.set_ecx(size);
            ctx.r.set_ebx(if idx + 1 < map.len() {
                idx as u32 + 1
            } else {
                0
            });
            ctx.set_cf(false);
            return;
        }
        0xe801 => {
            let below16 = ext_kib.min(15 * 1024) as u16;
            let above16 = (fw.ram_bytes.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
            ctx.r.set_ax(below16);
            ctx.r.set_cx(below16);
            ctx.r.set_bx(above16);
            ctx.r.set_dx(above16);
            ctx.set_cf(false);
            return;
        }
        0x2400 | 0x2401 => {
            ctx.r.set_ah(0);
            ctx.set_cf(false);
            return;
        }
        0x2402 => {
            ctx.r.set_ax(0x0001);
            ctx.set_cf(false);
            return;
        }
        0x2403 => {
            ctx.r.set_ax(0);
            ctx.r.set_bx(0x0003);
            ctx.set_cf(false);
            return;
        }
        _ => {}
    }
    match r.ah() {
        0x88 => {
            ctx.r.set_ax(ext_kib.min(0xfc00) as u16);
            ctx.set_cf(false);
        }
        0x86 => {
            // Wait CX:DX microseconds (bounded, and cut short by a kill).
            let us = (u64::from(r.cx()) << 16) | u64::from(r.dx());
            let deadline = Instant::now() + Duration::from_micros(us.min(10_000_000));
            while !fw.shared.killed.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
            }
            ctx.r.set_ah(0);
            ctx.set_cf(false);
        }
        0x4f => ctx.set_cf(true),
        0x90 | 0x91 => {
            ctx.r.set_ah(0);
            ctx.set_cf(false);
        }
        _ => {
            fw.unsupported(0x15, r.ax());
            ctx.r.set_ah(0x86);
            ctx.set_cf(true);
        }
    }
}

/// Scan code for an ASCII byte on a US keyboard (0 when there is no obvious key).
fn scancode(ascii: u8) -> u8 {
    const ROW: &[(&[u8], u8)] = &[
        (b"1234567890-=", 0x02),
        (b"qwertyuiop[]", 0x10),
        (b"asdfghjkl;'`", 0x1e),
        (b"zxcvbnm,./", 0x2c),
        (b"!@#$%^&*()_+", 0x02),
        (b"QWERTYUIOP{}", 0x10),
        (b"ASDFGHJKL:\"~", 0x1e),
        (b"ZXCVBNM<>?", 0x2c),
    ];
    match ascii {
        0x1b => 0x01,
        0x08 => 0x0e,
        b'\t' => 0x0f,
        b'\r' => 0x1c,
        b' ' => 0x39,
        b'\\' | b'|' => 0x2b,
        _ => ROW
            .iter()
            .find_map(|(keys, base)| {
                keys.iter()
                    .position(|&k| k == ascii)
                    .map(|i| base + i as u8)
            })
            .unwrap_or(0),
    }
}

fn key_word(byte: u8) -> u16 {
    // Console input uses LF for Enter; a keyboard produces CR.
    let ascii = if byte == b'\n' { b'\r' } else { byte };
    (u16::from(scancode(ascii)) << 8) | u16::from(ascii)
}

pub(super) fn int16(fw: &mut Firmware, ctx: &mut Ctx<'_>) -> ServiceOutcome {
    let r = ctx.r;
    if matches!(r.ah(), 0x00 | 0x01 | 0x10 | 0x11) {
        // The guest looks for a key: show the terminal's cursor where the BIOS has it.
        fw.sync_terminal_cursor(ctx);
    }
    match r.ah() {
        0x00 | 0x10 => loop {
            // Block (no polling) until a key arrives or the VM is killed.
            if fw.shared.killed.load(Ordering::SeqCst) {
                return ServiceOutcome::Exit(ExitReason::Killed);
            }
            let key = fw.shared.lock().input.pop_front();
            if let Some(b) = key {
                ctx.r.set_ax(key_word(b));
                break;
            }
            if fw.shared.paused() {
                return ServiceOutcome::Retry;
            }
            fw.shared.wait_input();
        },
        0x01 | 0x11 => {
            let key = fw.shared.lock().input.front().copied();
            match key {
                Some(b) => {
                    ctx.r.set_ax(key_word(b));
                    ctx.set_zf(false);
                }
                None => ctx.set_zf(true),
            }
        }
        0x02 => ctx.r.set_al(0),
        0x12 => ctx.r.set_ax(0),
        0x03 => {}
        0x05 => {
            fw.shared.lock().input.push_back(r.cl());
            ctx.r.set_al(0);
        }
        _ => fw.unsupported(0x16, r.ax()),
    }
    ServiceOutcome::Resume
}

pub(super) fn int1a(ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    let t = utc_now();
    match r.ah() {
        0x00 => {
            // 1193182 / 65536 = 18.2065 ticks per second since midnight.
            let ticks = (t.day_seconds * 1_193_182.0 / 65_536.0) as u32;
            ctx.r.set_cx((ticks >> 16) as u16);
            ctx.r.set_dx(ticks as u16);
            ctx.r.set_al(0);
            ctx.write_bytes(BDA_BASE + 0x6c, &ticks.to_le_bytes());
            ctx.set_cf(false);
        }
        0x02 => {
            ctx.r.set_ch(bcd(t.hour));
            ctx.r.set_cl(bcd(t.minute));
            ctx.r.set_dh(bcd(t.second));
            ctx.r.set_dl(0);
            ctx.set_cf(false);
        }
        0x04 => {
            ctx.r.set_ch(bcd(t.year / 100));
            ctx.r.set_cl(bcd(t.year % 100));
            ctx.r.set_dh(bcd(t.month));
            ctx.r.set_dl(bcd(t.day));
            ctx.set_cf(false);
        }
        // Setting the clock is accepted and ignored (the host clock rules).
        0x01 | 0x03 | 0x05 => ctx.set_cf(false),
        _ => ctx.set_cf(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(key_word(b'a'), 0x1e61);
        assert_eq!(key_word(b'\n'), 0x1c0d);
        assert_eq!(key_word(b'Z'), 0x2c5a);
        assert_eq!(key_word(b'1'), 0x0231);
    }

    #[test]
    fn e820_covers_ram() {
        let m = e820_map(16 << 20);
        assert_eq!(m[3], (0x10_0000, 15 << 20, 1));
        assert_eq!(m[0].1 + m[1].1, 0xa_0000);
    }
}
