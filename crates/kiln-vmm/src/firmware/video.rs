//! int 10h: text-mode video services over the VGA text buffer at 0xB8000.

use std::io::Write;

use vm_memory::Bytes;

use super::{Ctx, Firmware, BDA_BASE};
use crate::vstate::memory::VGA_TEXT_START;
use crate::VideoOutput;

const COLS: u64 = 80;
const ROWS: u64 = 25;
const CURSOR: u64 = BDA_BASE + 0x50;

fn cell(row: u64, col: u64) -> u64 {
    VGA_TEXT_START + (row * COLS + col) * 2
}

fn cursor(ctx: &Ctx<'_>) -> (u64, u64) {
    let c = ctx.read_u16(CURSOR);
    (
        u64::from(c >> 8).min(ROWS - 1),
        u64::from(c & 0xff).min(COLS - 1),
    )
}

fn set_cursor(ctx: &Ctx<'_>, row: u64, col: u64) {
    ctx.write_u16(CURSOR, ((row as u16) << 8) | col as u16);
}

/// Scrolls the window rows r0..=r1, cols c0..=c1 by `n` lines (0 = clear), up or down.
fn scroll(ctx: &Ctx<'_>, n: u64, attr: u8, (r0, c0): (u64, u64), (r1, c1): (u64, u64), up: bool) {
    let (r1, c1) = (r1.min(ROWS - 1), c1.min(COLS - 1));
    if r0 > r1 || c0 > c1 {
        return;
    }
    let height = r1 - r0 + 1;
    let n = if n == 0 || n > height { height } else { n };
    let width = ((c1 - c0 + 1) * 2) as usize;
    let mut line = vec![0u8; width];
    let moved = height - n;
    for i in 0..moved {
        let (dst, src) = if up {
            (r0 + i, r0 + i + n)
        } else {
            (r1 - i, r1 - i - n)
        };
        if ctx
            .mem
            .read_slice(&mut line, vm_memory::GuestAddress(cell(src, c0)))
            .is_ok()
        {
            ctx.write_bytes(cell(dst, c0), &line);
        }
    }
    let blank: Vec<u8> = [b' ', attr].repeat(width / 2);
    for i in 0..n {
        let row = if up { r1 - i } else { r0 + i };
        ctx.write_bytes(cell(row, c0), &blank);
    }
}

impl Firmware {
    fn echo(&mut self, bytes: &[u8]) {
        if self.video == VideoOutput::Console {
            let _ = self
                .console
                .write_all(bytes)
                .and_then(|_| self.console.flush());
        }
    }
}

/// Teletype output of one character at the cursor, with scrolling.
fn teletype(fw: &mut Firmware, ctx: &Ctx<'_>, ch: u8, attr: Option<u8>) {
    let (mut row, mut col) = cursor(ctx);
    match ch {
        0x07 => {}
        0x08 => col = col.saturating_sub(1),
        b'\n' => row += 1,
        b'\r' => col = 0,
        _ => {
            ctx.write_bytes(cell(row, col), &[ch]);
            if let Some(a) = attr {
                ctx.write_bytes(cell(row, col) + 1, &[a]);
            }
            col += 1;
            if col == COLS {
                col = 0;
                row += 1;
            }
        }
    }
    if row == ROWS {
        scroll(ctx, 1, 0x07, (0, 0), (ROWS - 1, COLS - 1), true);
        row = ROWS - 1;
    }
    set_cursor(ctx, row, col);
    if ch != 0x07 {
        fw.echo(&[ch]);
    }
}

pub(super) fn int10(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    match r.ah() {
        0x00 => {
            // Set mode: only 80x25 text is real; any mode clears the screen.
            if r.al() & 0x7f != 0x03 {
                fw.unsupported(0x10, r.ax());
            }
            ctx.write_bytes(BDA_BASE + 0x49, &[0x03]);
            if r.al() & 0x80 == 0 {
                scroll(ctx, 0, 0x07, (0, 0), (ROWS - 1, COLS - 1), true);
            }
            set_cursor(ctx, 0, 0);
            ctx.r.set_al(0x30);
        }
        0x01 => {
            ctx.write_u16(BDA_BASE + 0x60, r.cx());
        }
        0x02 => set_cursor(
            ctx,
            u64::from(r.dh()).min(ROWS - 1),
            u64::from(r.dl()).min(COLS - 1),
        ),
        0x03 => {
            let (row, col) = cursor(ctx);
            ctx.r.set_dx(((row as u16) << 8) | col as u16);
            ctx.r.set_cx(ctx.read_u16(BDA_BASE + 0x60));
        }
        0x05 => {
            ctx.write_bytes(BDA_BASE + 0x62, &[r.al()]);
        }
        0x06 | 0x07 => scroll(
            ctx,
            u64::from(r.al()),
            r.bh(),
            (u64::from(r.ch()), u64::from(r.cl())),
            (u64::from(r.dh()), u64::from(r.dl())),
            r.ah() == 0x06,
        ),
        0x08 => {
            let (row, col) = cursor(ctx);
            ctx.r.set_ax(ctx.read_u16(cell(row, col)));
        }
        0x09 | 0x0a => {
            let (row, col) = cursor(ctx);
            let start = row * COLS + col;
            let count = u64::from(r.cx()).min(COLS * ROWS - start);
            for i in 0..count {
                let addr = VGA_TEXT_START + (start + i) * 2;
                ctx.write_bytes(addr, &[r.al()]);
                if r.ah() == 0x09 {
                    ctx.write_bytes(addr + 1, &[r.bl()]);
                }
            }
            // Boot code often prints with AH=09h + cursor moves; mirror single characters.
            if r.cx() == 1 && (0x20..0x7f).contains(&r.al()) {
                fw.echo(&[r.al()]);
            }
        }
        0x0e => teletype(fw, ctx, r.al(), None),
        0x0f => {
            ctx.r.set_al(ctx.read_u8(BDA_BASE + 0x49));
            ctx.r.set_ah(COLS as u8);
            ctx.r.set_bh(ctx.read_u8(BDA_BASE + 0x62));
        }
        0x12 if r.bl() == 0x10 => {
            // EGA/VGA info: colour, 256 KiB.
            ctx.r.set_bx(0x0003);
            ctx.r.set_cx(0x0009);
        }
        0x13 => {
            // Write string ES:BP, CX chars, at DH:DL; AL bit 0 = move cursor, bit 1 = attrs.
            let saved = ctx.read_u16(CURSOR);
            set_cursor(
                ctx,
                u64::from(r.dh()).min(ROWS - 1),
                u64::from(r.dl()).min(COLS - 1),
            );
            let with_attr = r.al() & 2 != 0;
            let step = if with_attr { 2 } else { 1 };
            for i in 0..u64::from(r.cx()) {
                let addr = ctx.es_lin(u64::from(r.bp()) + i * step);
                let ch = ctx.read_u8(addr);
                let attr = if with_attr {
                    ctx.read_u8(addr + 1)
                } else {
                    r.bl()
                };
                teletype(fw, ctx, ch, Some(attr));
            }
            if r.al() & 1 == 0 {
                ctx.write_u16(CURSOR, saved);
            }
        }
        0x1a if r.al() == 0 => {
            ctx.r.set_al(0x1a);
            ctx.r.set_bx(0x0008);
        }
        // Palette, font and similar calls: accepted, no effect in text mode.
        0x0b | 0x10 | 0x11 => {}
        _ => fw.unsupported(0x10, r.ax()),
    }
}
