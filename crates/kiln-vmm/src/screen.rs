//! A picture of the guest's screen (`kiln screendump`): a text mode rendered cell by cell in
//! 8x16 glyphs (the public-domain 8x8 IBM font of the `font8x8` crate, each row doubled, as
//! a VGA shows its 8x16 font) in the 16 text colours; mode 13h as its 320x200 pixels through
//! the default VGA palette (kiln's VMM emulates no DAC, so a palette the guest programs is not
//! seen).

use font8x8::UnicodeFonts;
use vm_memory::{Bytes, GuestAddress};

use crate::firmware::cp437;
use crate::firmware::video::{self, BDA_MODE};
use crate::vstate::memory::{GuestMem, VGA_GRAPHICS_START};

/// Rows of a text screen.
const ROWS: u64 = 25;
/// Pixels per text cell.
const CELL_W: usize = 8;
const CELL_H: usize = 16;

/// An RGB picture: `width * height * 3` bytes, rows top to bottom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Screenshot {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// The 16 CGA/EGA text colours.
const TEXT_COLOURS: [[u8; 3]; 16] = [
    [0x00, 0x00, 0x00],
    [0x00, 0x00, 0xAA],
    [0x00, 0xAA, 0x00],
    [0x00, 0xAA, 0xAA],
    [0xAA, 0x00, 0x00],
    [0xAA, 0x00, 0xAA],
    [0xAA, 0x55, 0x00],
    [0xAA, 0xAA, 0xAA],
    [0x55, 0x55, 0x55],
    [0x55, 0x55, 0xFF],
    [0x55, 0xFF, 0x55],
    [0x55, 0xFF, 0xFF],
    [0xFF, 0x55, 0x55],
    [0xFF, 0x55, 0xFF],
    [0xFF, 0xFF, 0x55],
    [0xFF, 0xFF, 0xFF],
];

/// Mode 13h's default palette: the 16 text colours, a 16-step grey ramp, then colours
/// spread over the RGB cube (close to, not exactly, the VGA BIOS's hue wheel).
fn palette(index: u8) -> [u8; 3] {
    match index {
        0..=15 => TEXT_COLOURS[index as usize],
        16..=31 => {
            let v = (index - 16) * 17;
            [v, v, v]
        }
        _ => {
            let i = index - 32;
            let step = |n: u8| (n % 6) * 51;
            [step(i / 36), step(i / 6), step(i)]
        }
    }
}

/// The 8x8 glyph of `ch` (code page 437): Basic Latin, Latin-1, box drawing and block
/// elements from `font8x8`; anything else blank.
fn glyph(ch: u8) -> [u8; 8] {
    let c = cp437(ch);
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::BOX_FONTS.get(c))
        .or_else(|| font8x8::BLOCK_FONTS.get(c))
        .unwrap_or([0; 8])
}

/// The screen as it is now.
pub(crate) fn capture(mem: &GuestMem) -> Screenshot {
    let mode = video::current(mem);
    match mode.text {
        Some(base) => text(mem, base, mode.cols),
        None => graphics(mem),
    }
}

fn text(mem: &GuestMem, base: u64, cols: u64) -> Screenshot {
    let mut cells = vec![0u8; (cols * ROWS * 2) as usize];
    let _ = mem.read_slice(&mut cells, GuestAddress(base));
    let (w, h) = (cols as usize * CELL_W, ROWS as usize * CELL_H);
    let mut rgb = vec![0u8; w * h * 3];
    for (i, cell) in cells.chunks_exact(2).enumerate() {
        let (row, col) = (i / cols as usize, i % cols as usize);
        let (fg, bg) = (
            TEXT_COLOURS[(cell[1] & 0xf) as usize],
            TEXT_COLOURS[(cell[1] >> 4 & 0x7) as usize],
        );
        let g = glyph(cell[0]);
        for y in 0..CELL_H {
            let bits = g[y / 2];
            for x in 0..CELL_W {
                let px = ((row * CELL_H + y) * w + col * CELL_W + x) * 3;
                let on = bits >> x & 1 == 1;
                rgb[px..px + 3].copy_from_slice(if on { &fg } else { &bg });
            }
        }
    }
    Screenshot {
        width: w as u32,
        height: h as u32,
        rgb,
    }
}

fn graphics(mem: &GuestMem) -> Screenshot {
    let mode: u8 = mem.read_obj(GuestAddress(BDA_MODE)).unwrap_or(0x13);
    debug_assert_eq!(mode & 0x7f, 0x13, "the only graphics mode");
    let (w, h) = (320usize, 200usize);
    let mut pixels = vec![0u8; w * h];
    let _ = mem.read_slice(&mut pixels, GuestAddress(VGA_GRAPHICS_START));
    let rgb = pixels.iter().flat_map(|&p| palette(p)).collect();
    Screenshot {
        width: w as u32,
        height: h as u32,
        rgb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_and_palette() {
        assert_eq!(glyph(b' '), [0; 8]);
        assert_ne!(glyph(b'A'), [0; 8]);
        assert_ne!(glyph(0xDB), [0; 8], "full block from CP437");
        assert_eq!(palette(15), [0xFF; 3]);
        assert_eq!(palette(31), [0xFF; 3]);
        assert_eq!(palette(0), [0; 3]);
    }

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_text_screen_is_80x25_cells_of_8x16() {
        let mem = memory();
        mem.write_obj(3u8, GuestAddress(BDA_MODE)).unwrap();
        // 'A' in light grey on blue at row 0, column 1.
        mem.write_slice(&[b'A', 0x17], GuestAddress(0xB8002))
            .unwrap();
        let shot = capture(&mem);
        assert_eq!((shot.width, shot.height), (640, 400));
        let lit = |x: usize, y: usize| {
            let at = (y * 640 + x) * 3;
            shot.rgb[at..at + 3].to_vec()
        };
        let cell: Vec<Vec<u8>> = (0..16)
            .flat_map(|y| (8..16).map(move |x| (x, y)))
            .map(|(x, y)| lit(x, y))
            .collect();
        assert!(cell.contains(&vec![0xAA, 0xAA, 0xAA]), "the glyph's pixels");
        assert!(cell.contains(&vec![0x00, 0x00, 0xAA]), "the background");
        assert_eq!(lit(0, 0), vec![0, 0, 0], "cell 0 is blank");
    }

    #[test]
    fn mode_13h_is_320x200_through_the_palette() {
        let mem = memory();
        mem.write_obj(0x13u8, GuestAddress(BDA_MODE)).unwrap();
        mem.write_slice(&[15, 4], GuestAddress(VGA_GRAPHICS_START + 321))
            .unwrap();
        let shot = capture(&mem);
        assert_eq!((shot.width, shot.height), (320, 200));
        assert_eq!(
            &shot.rgb[321 * 3..323 * 3],
            &[0xFF, 0xFF, 0xFF, 0xAA, 0x00, 0x00]
        );
        assert_eq!(&shot.rgb[..3], &[0, 0, 0]);
    }
}
