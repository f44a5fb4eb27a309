//! int 10h: video services.
//!
//! Text modes 00h/01h (40x25), 02h/03h (80x25) and 07h (80x25 monochrome, at 0xB0000) work
//! over the VGA text buffer in guest RAM; mode 13h (320x200, 256 colours) is plain RAM at
//! 0xA0000 that the guest draws into itself (the BIOS keeps its cursor but draws no glyphs).
//! Other modes are refused as SeaBIOS's VGA BIOS refuses them: the mode stays as it was.
//!
//! In text modes, with [`VideoOutput::Console`], what the BIOS writes is mirrored to the
//! console as a terminal would show it (see [`Mirror`]).

use std::io::Write;

use vm_memory::Bytes;

use super::{Ctx, Firmware, BDA_BASE};
use crate::vstate::memory::{GuestMem, VGA_GRAPHICS_START, VGA_MONO_TEXT_START, VGA_TEXT_START};
use crate::VideoOutput;

const ROWS: u64 = 25;
pub(crate) const BDA_MODE: u64 = BDA_BASE + 0x49;
const BDA_COLS: u64 = BDA_BASE + 0x4a;
const BDA_PAGE_SIZE: u64 = BDA_BASE + 0x4c;
const BDA_PAGE_START: u64 = BDA_BASE + 0x4e;
const CURSOR: u64 = BDA_BASE + 0x50;
const BDA_CURSOR_SHAPE: u64 = BDA_BASE + 0x60;
const BDA_PAGE: u64 = BDA_BASE + 0x62;
const BDA_ROWS_MINUS_1: u64 = BDA_BASE + 0x84;
const BDA_CHAR_HEIGHT: u64 = BDA_BASE + 0x85;
/// Bytes mode 13h uses at 0xA0000 (cleared by a mode set, like the 64 KiB SeaBIOS clears).
const MODE13_BYTES: usize = 0x1_0000;

/// A video mode the BIOS supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mode {
    /// Character columns (text cells; 40 in mode 13h).
    pub cols: u64,
    /// Text buffer base, or `None` in a graphics mode.
    pub text: Option<u64>,
}

/// The supported modes; `None` for any other number.
pub(crate) fn mode_info(mode: u8) -> Option<Mode> {
    let text = |cols, base| {
        Some(Mode {
            cols,
            text: Some(base),
        })
    };
    match mode {
        0x00 | 0x01 => text(40, VGA_TEXT_START),
        0x02 | 0x03 => text(80, VGA_TEXT_START),
        0x07 => text(80, VGA_MONO_TEXT_START),
        0x13 => Some(Mode {
            cols: 40,
            text: None,
        }),
        _ => None,
    }
}

/// The current mode, from the BDA (the guest can write it: anything unknown is mode 3).
pub(crate) fn current(mem: &GuestMem) -> Mode {
    let mode: u8 = mem.read_obj(vm_memory::GuestAddress(BDA_MODE)).unwrap_or(3);
    mode_info(mode & 0x7f).unwrap_or(Mode {
        cols: 80,
        text: Some(VGA_TEXT_START),
    })
}

fn cell(m: Mode, row: u64, col: u64) -> Option<u64> {
    m.text.map(|base| base + (row * m.cols + col) * 2)
}

fn cursor(ctx: &Ctx<'_>, m: Mode) -> (u64, u64) {
    let c = ctx.read_u16(CURSOR);
    (
        u64::from(c >> 8).min(ROWS - 1),
        u64::from(c & 0xff).min(m.cols - 1),
    )
}

fn set_cursor(ctx: &Ctx<'_>, row: u64, col: u64) {
    ctx.write_u16(CURSOR, ((row as u16) << 8) | col as u16);
}

/// Scrolls the window rows r0..=r1, cols c0..=c1 by `n` lines (0 = clear), up or down.
fn scroll(
    ctx: &Ctx<'_>,
    m: Mode,
    n: u64,
    attr: u8,
    (r0, c0): (u64, u64),
    (r1, c1): (u64, u64),
    up: bool,
) {
    let Some(base) = m.text else { return };
    let (r1, c1) = (r1.min(ROWS - 1), c1.min(m.cols - 1));
    if r0 > r1 || c0 > c1 {
        return;
    }
    let at = |row: u64, col: u64| base + (row * m.cols + col) * 2;
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
            .read_slice(&mut line, vm_memory::GuestAddress(at(src, c0)))
            .is_ok()
        {
            ctx.write_bytes(at(dst, c0), &line);
        }
    }
    let blank: Vec<u8> = [b' ', attr].repeat(width / 2);
    for i in 0..n {
        let row = if up { r1 - i } else { r0 + i };
        ctx.write_bytes(at(row, c0), &blank);
    }
}

/// Code page 437 (the VGA font) to Unicode, as SeaBIOS's serial console translates it.
pub fn cp437(ch: u8) -> char {
    const LOW: [char; 32] = [
        '\0', '☺', '☻', '♥', '♦', '♣', '♠', '•', '◘', '○', '◙', '♂', '♀', '♪', '♫', '☼', '►', '◄',
        '↕', '‼', '¶', '§', '▬', '↨', '↑', '↓', '→', '←', '∟', '↔', '▲', '▼',
    ];
    const HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»\
        ░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀\
        αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";
    match ch {
        0x00..=0x1f => LOW[usize::from(ch)],
        0x7f => '⌂',
        0x80..=0xff => HIGH.chars().nth(usize::from(ch - 0x80)).unwrap_or('?'),
        _ => char::from(ch),
    }
}

/// Where the console's terminal cursor is, in BIOS screen coordinates, and the bytes that
/// move it and draw on it.
///
/// The console is a terminal the VM does not own (a shell's, a log, a socket client), so
/// the mirror never positions the cursor absolutely: BIOS row 0 is wherever the terminal
/// was when the screen was last cleared, and every move is relative (CR, LF, BS,
/// `ESC[nA/C/D`). Downward moves use CR LF so the terminal scrolls as the BIOS screen
/// does. Before every character the terminal cursor is brought to the BIOS cursor, and
/// after every BIOS call that writes it is brought back there: a call that does not move
/// the BIOS cursor (AH=09h/0Ah, or AH=13h with AL bit 0 clear) leaves the terminal cursor
/// where it was too. Cursor moves alone (AH=02h) send nothing until something is written
/// or the guest waits for a key.
#[derive(Debug, Default)]
pub(crate) struct Mirror {
    /// Row of the terminal cursor; negative once the BIOS screen scrolled past it.
    row: i64,
    /// Column; `cols` right after writing the last column (a terminal's pending wrap).
    col: u64,
    out: Vec<u8>,
}

impl Mirror {
    fn esc(&mut self, n: u64, code: u8) {
        let _ = write!(self.out, "\x1b[{n}{}", char::from(code));
    }

    /// Moves the terminal cursor to BIOS (row, col).
    fn goto(&mut self, row: u64, col: u64, cols: u64) {
        let row = row as i64;
        if (self.row, self.col) == (row, col) {
            return;
        }
        if self.col >= cols {
            // Just wrote the last column: a terminal that is `cols` wide waits to wrap,
            // a wider one does not; CR leaves both at column 0.
            self.out.push(b'\r');
            self.col = 0;
        }
        if row > self.row {
            if self.col != 0 {
                self.out.push(b'\r');
                self.col = 0;
            }
            // At most 2 * ROWS: `scrolled` bounds how far above the screen the row is.
            for _ in self.row..row {
                self.out.push(b'\n');
            }
        } else if row < self.row {
            self.esc((self.row - row) as u64, b'A');
        }
        self.row = row;
        if col == 0 && self.col != 0 {
            self.out.push(b'\r');
        } else if col > self.col {
            self.esc(col - self.col, b'C');
        } else if col + 1 == self.col {
            self.out.push(0x08);
        } else if col < self.col {
            self.esc(self.col - col, b'D');
        }
        self.col = col;
    }

    /// Draws one character at the terminal cursor (NUL draws nothing).
    fn put(&mut self, ch: u8) {
        if ch == 0 {
            return;
        }
        let mut buf = [0u8; 4];
        self.out
            .extend_from_slice(cp437(ch).encode_utf8(&mut buf).as_bytes());
        self.col += 1;
    }

    /// The BIOS screen scrolled up `n` lines: so did the terminal's picture of it.
    fn scrolled(&mut self, n: u64) {
        self.row = (self.row - n.min(ROWS) as i64).max(-(ROWS as i64));
    }

    /// Where the terminal's cursor is, in BIOS coordinates (row, column).
    pub(crate) fn position(&self) -> (i64, u64) {
        (self.row, self.col)
    }

    /// Sets it (from a saved machine), within the screen.
    pub(crate) fn set_position(&mut self, (row, col): (i64, u64)) {
        self.row = row.clamp(-(ROWS as i64), ROWS as i64);
        self.col = col.min(80);
    }

    /// The BIOS screen was cleared: its row 0 starts at the terminal's next fresh line.
    pub(crate) fn new_origin(&mut self) {
        if self.col != 0 {
            self.out.extend_from_slice(b"\r\n");
        }
        self.row = 0;
        self.col = 0;
    }
}

impl Firmware {
    /// True when int 10h text goes to the console (console video output, text mode).
    fn mirroring(&self, m: Mode) -> bool {
        self.video == VideoOutput::Console && m.text.is_some()
    }

    /// Sends what the mirror has queued to the console.
    pub(crate) fn flush_mirror(&mut self) {
        if self.mirror.out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.mirror.out);
        if self.video == VideoOutput::Console {
            let _ = self.console.video(&out);
        }
    }

    /// Brings the terminal cursor to the BIOS cursor (before the guest waits for a key).
    pub(crate) fn sync_terminal_cursor(&mut self, ctx: &Ctx<'_>) {
        let m = current(ctx.mem);
        if self.mirroring(m) {
            let (row, col) = cursor(ctx, m);
            self.mirror.goto(row, col, m.cols);
            self.flush_mirror();
        }
        // The guest waits: nothing it printed may stay held.
        self.console.idle();
    }
}

/// Teletype output of one character at the cursor, with scrolling.
fn teletype(fw: &mut Firmware, ctx: &Ctx<'_>, m: Mode, ch: u8, attr: Option<u8>) {
    let mirror = fw.mirroring(m);
    let (mut row, mut col) = cursor(ctx, m);
    match ch {
        0x07 => {}
        0x08 => col = col.saturating_sub(1),
        b'\n' => row += 1,
        b'\r' => col = 0,
        _ => {
            if let Some(addr) = cell(m, row, col) {
                ctx.write_bytes(addr, &[ch]);
                if let Some(a) = attr {
                    ctx.write_bytes(addr + 1, &[a]);
                }
            }
            if mirror {
                fw.mirror.goto(row, col, m.cols);
                fw.mirror.put(ch);
            }
            col += 1;
            if col == m.cols {
                col = 0;
                row += 1;
            }
        }
    }
    if row == ROWS {
        scroll(ctx, m, 1, 0x07, (0, 0), (ROWS - 1, m.cols - 1), true);
        row = ROWS - 1;
        if mirror {
            fw.mirror.scrolled(1);
        }
    }
    set_cursor(ctx, row, col);
    if mirror {
        fw.mirror.goto(row, col, m.cols);
    }
}

/// AH=00h. Returns AL as SeaBIOS's VGA BIOS does (30h for modes 0-5 and 7, 3Fh for 6, 20h
/// above 7) whether or not the mode exists; an unsupported mode changes nothing.
fn set_mode(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let al = ctx.r.al();
    let number = al & 0x7f;
    ctx.r.set_al(match number {
        0x06 => 0x3f,
        0x00..=0x07 => 0x30,
        _ => 0x20,
    });
    let Some(m) = mode_info(number) else {
        fw.warn_once(
            0x0100_0000 | u32::from(number),
            format_args!(
                "int 10h AH=00h: video mode {number:02x}h is not supported; mode left unchanged"
            ),
        );
        return;
    };
    let clear = al & 0x80 == 0;
    let page_size: u16 = match m.text {
        Some(_) => (m.cols * ROWS * 2).next_power_of_two() as u16,
        None => 0xfa00,
    };
    ctx.write_bytes(BDA_MODE, &[number]);
    ctx.write_u16(BDA_COLS, m.cols as u16);
    ctx.write_u16(BDA_PAGE_SIZE, page_size);
    ctx.write_u16(BDA_PAGE_START, 0);
    ctx.write_bytes(CURSOR, &[0; 16]);
    ctx.write_bytes(BDA_PAGE, &[0]);
    ctx.write_bytes(BDA_ROWS_MINUS_1, &[(ROWS - 1) as u8]);
    ctx.write_u16(BDA_CHAR_HEIGHT, if m.text.is_some() { 16 } else { 8 });
    if m.text.is_some() {
        ctx.write_u16(BDA_CURSOR_SHAPE, 0x0607);
    }
    if clear {
        match m.text {
            Some(_) => scroll(ctx, m, 0, 0x07, (0, 0), (ROWS - 1, m.cols - 1), true),
            None => {
                ctx.write_bytes(VGA_GRAPHICS_START, &vec![0u8; MODE13_BYTES]);
            }
        }
        fw.mirror.new_origin();
    }
}

pub(super) fn int10(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    let m = current(ctx.mem);
    match r.ah() {
        0x00 => set_mode(fw, ctx),
        0x01 => {
            ctx.write_u16(BDA_CURSOR_SHAPE, r.cx());
        }
        0x02 => set_cursor(
            ctx,
            u64::from(r.dh()).min(ROWS - 1),
            u64::from(r.dl()).min(m.cols - 1),
        ),
        0x03 => {
            let (row, col) = cursor(ctx, m);
            ctx.r.set_dx(((row as u16) << 8) | col as u16);
            ctx.r.set_cx(ctx.read_u16(BDA_CURSOR_SHAPE));
        }
        0x05 => {
            ctx.write_bytes(BDA_PAGE, &[r.al()]);
        }
        0x06 | 0x07 => {
            let (top, bottom) = (
                (u64::from(r.ch()), u64::from(r.cl())),
                (u64::from(r.dh()), u64::from(r.dl())),
            );
            scroll(
                ctx,
                m,
                u64::from(r.al()),
                r.bh(),
                top,
                bottom,
                r.ah() == 0x06,
            );
            // A whole-screen scroll up or clear moves the terminal's picture too.
            let whole = top == (0, 0) && bottom.0 >= ROWS - 1 && bottom.1 >= m.cols - 1;
            if r.ah() == 0x06 && whole && fw.mirroring(m) {
                match r.al() {
                    0 => fw.mirror.new_origin(),
                    n => fw.mirror.scrolled(u64::from(n)),
                }
            }
        }
        0x08 => {
            let (row, col) = cursor(ctx, m);
            match cell(m, row, col) {
                Some(addr) => ctx.r.set_ax(ctx.read_u16(addr)),
                None => ctx.r.set_ax(0),
            }
        }
        0x09 | 0x0a => {
            // CX copies from the cursor on (clipped at the end of the screen); the BIOS
            // cursor does not move, nor does the terminal's.
            let (row, col) = cursor(ctx, m);
            let start = row * m.cols + col;
            let end = start + u64::from(r.cx()).min(m.cols * ROWS - start);
            if let Some(base) = m.text {
                for pos in start..end {
                    let addr = base + pos * 2;
                    ctx.write_bytes(addr, &[r.al()]);
                    if r.ah() == 0x09 {
                        ctx.write_bytes(addr + 1, &[r.bl()]);
                    }
                }
            }
            if fw.mirroring(m) {
                let mut pos = start;
                while pos < end {
                    let (prow, pcol) = (pos / m.cols, pos % m.cols);
                    let run = (end - pos).min(m.cols - pcol);
                    fw.mirror.goto(prow, pcol, m.cols);
                    for _ in 0..run {
                        fw.mirror.put(r.al());
                    }
                    pos += run;
                }
                fw.mirror.goto(row, col, m.cols);
            }
        }
        0x0e => teletype(fw, ctx, m, r.al(), None),
        0x0f => {
            ctx.r.set_al(ctx.read_u8(BDA_MODE));
            ctx.r.set_ah(m.cols as u8);
            ctx.r.set_bh(ctx.read_u8(BDA_PAGE));
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
                u64::from(r.dl()).min(m.cols - 1),
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
                teletype(fw, ctx, m, ch, Some(attr));
            }
            if r.al() & 1 == 0 {
                ctx.write_u16(CURSOR, saved);
                fw.sync_terminal_cursor(ctx);
            }
        }
        0x1a if r.al() == 0 => {
            ctx.r.set_al(0x1a);
            ctx.r.set_bx(0x0008);
        }
        // Palette, font and similar calls: accepted, no effect.
        0x0b | 0x10 | 0x11 => {}
        _ => fw.unsupported(0x10, r.ax()),
    }
    fw.flush_mirror();
}

/// The text screen as text: one line per row, CP437 as Unicode, trailing blanks trimmed;
/// empty in a graphics mode.
pub(crate) fn screen_text(mem: &GuestMem) -> String {
    let m = current(mem);
    let Some(base) = m.text else {
        return String::new();
    };
    let mut buf = vec![0u8; (m.cols * ROWS * 2) as usize];
    let _ = mem.read_slice(&mut buf, vm_memory::GuestAddress(base));
    buf.chunks(m.cols as usize * 2)
        .map(|row| {
            let line: String = row
                .chunks(2)
                .map(|c| if c[0] == 0 { ' ' } else { cp437(c[0]) })
                .collect();
            line.trim_end_matches(' ').to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp437_table() {
        assert_eq!(cp437(b'A'), 'A');
        assert_eq!(cp437(0x01), '☺');
        assert_eq!(cp437(0x7f), '⌂');
        assert_eq!(cp437(0x80), 'Ç');
        assert_eq!(cp437(0x82), 'é');
        assert_eq!(cp437(0xb1), '▒');
        assert_eq!(cp437(0xc9), '╔');
        assert_eq!(cp437(0xdb), '█');
        assert_eq!(cp437(0xe1), 'ß');
        assert_eq!(cp437(0xfe), '■');
        assert_eq!(cp437(0xff), '\u{a0}');
    }

    #[test]
    fn cp437_high_half_is_complete() {
        let all: String = (0x80..=0xffu8).map(cp437).collect();
        assert_eq!(all.chars().count(), 128);
        assert!(!all.contains('?'));
    }

    fn moves(f: impl FnOnce(&mut Mirror)) -> String {
        let mut m = Mirror::default();
        f(&mut m);
        String::from_utf8(m.out).unwrap()
    }

    #[test]
    fn mirror_moves_are_relative() {
        // Write in place: char, then back one column (column 0 is always CR).
        assert_eq!(
            moves(|m| {
                m.put(b'x');
                m.goto(0, 0, 80);
                m.goto(0, 3, 80);
                m.put(b'x');
                m.goto(0, 3, 80);
            }),
            "x\r\x1b[3Cx\x08"
        );
        // Five copies, then back five.
        assert_eq!(
            moves(|m| {
                m.goto(0, 1, 80);
                for _ in 0..5 {
                    m.put(b'y');
                }
                m.goto(0, 1, 80);
            }),
            "\x1b[1Cyyyyy\x1b[5D"
        );
        // After the last column: CR first, whatever the terminal's width.
        assert_eq!(
            moves(|m| {
                m.goto(0, 79, 80);
                m.put(0xdb);
                m.goto(0, 79, 80);
            }),
            "\x1b[79C█\r\x1b[79C"
        );
        // Down and up, and column 0 by CR.
        assert_eq!(
            moves(|m| {
                m.goto(2, 3, 80);
                m.goto(0, 0, 80);
            }),
            "\n\n\x1b[3C\x1b[2A\r"
        );
        // A scrolled screen needs one more line feed; NUL draws nothing.
        assert_eq!(
            moves(|m| {
                m.goto(24, 0, 80);
                m.put(0);
                m.scrolled(1);
                m.goto(24, 1, 80);
            }),
            format!("{}\n\x1b[1C", "\n".repeat(24))
        );
        // Scrolling far away never costs more than two screens of line feeds.
        let s = moves(|m| {
            for _ in 0..1000 {
                m.scrolled(25);
            }
            m.goto(24, 0, 80);
        });
        assert_eq!(s, "\n".repeat(49));
        // A clear starts a fresh line.
        assert_eq!(
            moves(|m| {
                m.put(b'a');
                m.new_origin();
                m.put(b'b');
            }),
            "a\r\nb"
        );
    }
}
