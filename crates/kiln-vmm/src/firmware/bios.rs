//! Static BIOS data: IVT, BIOS Data Area, EBDA, vector stubs, floppy parameter table.

use vm_memory::{Bytes, GuestAddress};

use super::{BIOS_SEGMENT, RESET_STUB, SERVICE_PORT, STUB_BASE, STUB_SIZE};
use crate::vstate::memory::{GuestMem, VGA_TEXT_START};
use crate::{BootDevice, VmmError};

/// Linear address of the BIOS Data Area.
pub const BDA_BASE: u64 = 0x400;
/// Segment of the Extended BIOS Data Area (1 KiB just below 640 KiB).
pub const EBDA_SEGMENT: u16 = 0x9fc0;
/// Conventional memory reported at 0x413 / int 12h (640 KiB minus the 1 KiB EBDA).
pub const BASE_MEM_KIB: u16 = 639;
/// Offset in the BIOS segment of the floppy Diskette Parameter Table (the IBM location).
pub const DPT_OFFSET: u16 = 0xefc7;

fn put(mem: &GuestMem, addr: u64, data: &[u8]) -> Result<(), VmmError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| VmmError::Memory(format!("writing BIOS data at {addr:#x}: {e}")))
}

fn put16(mem: &GuestMem, addr: u64, v: u16) -> Result<(), VmmError> {
    put(mem, addr, &v.to_le_bytes())
}

/// The BDA equipment word: 80x25 colour video, one serial port, floppy if booting one.
pub fn equipment_word(boot: BootDevice) -> u16 {
    let mut w = (0b10 << 4) | (1 << 9);
    if boot == BootDevice::Floppy {
        w |= 1;
    }
    w
}

/// Writes all static BIOS structures.
pub fn install(mem: &GuestMem, boot: BootDevice) -> Result<(), VmmError> {
    let bios = u64::from(BIOS_SEGMENT) << 4;

    // Stubs: out SERVICE_PORT, al; iret; nop.
    let mut stubs = Vec::with_capacity(256 * usize::from(STUB_SIZE));
    for _ in 0..256 {
        stubs.extend_from_slice(&[0xe6, SERVICE_PORT as u8, 0xcf, 0x90]);
    }
    put(mem, bios + u64::from(STUB_BASE), &stubs)?;
    // Reset vector: trap (reported as a reset), then halt if resumed anyway.
    put(
        mem,
        bios + u64::from(RESET_STUB),
        &[0xe6, SERVICE_PORT as u8, 0xfa, 0xf4],
    )?;
    put(mem, bios + 0xfff5, b"06/23/99")?;
    put(mem, bios + 0xfffe, &[0xfc])?;

    // IVT: every vector to its stub, except the ones that are data pointers.
    let mut ivt = [0u8; 1024];
    for v in 0..256u16 {
        let (seg, off) = match v {
            0x1e => (BIOS_SEGMENT, DPT_OFFSET),
            0x1d | 0x1f | 0x41 | 0x43 | 0x46 | 0x60..=0x67 => (0, 0),
            _ => (BIOS_SEGMENT, STUB_BASE + v * STUB_SIZE),
        };
        let i = usize::from(v) * 4;
        ivt[i..i + 2].copy_from_slice(&off.to_le_bytes());
        ivt[i + 2..i + 4].copy_from_slice(&seg.to_le_bytes());
    }
    put(mem, 0, &ivt)?;

    // Floppy DPT (1.44 MB values).
    put(
        mem,
        bios + u64::from(DPT_OFFSET),
        &[
            0xaf, 0x02, 0x25, 0x02, 0x12, 0x1b, 0xff, 0x6c, 0xf6, 0x0f, 0x08,
        ],
    )?;

    // BIOS Data Area.
    let mut bda = [0u8; 256];
    bda[0x00..0x02].copy_from_slice(&0x3f8u16.to_le_bytes()); // COM1
    bda[0x0e..0x10].copy_from_slice(&EBDA_SEGMENT.to_le_bytes());
    bda[0x10..0x12].copy_from_slice(&equipment_word(boot).to_le_bytes());
    bda[0x13..0x15].copy_from_slice(&BASE_MEM_KIB.to_le_bytes());
    bda[0x1a..0x1c].copy_from_slice(&0x1eu16.to_le_bytes()); // keyboard buffer head
    bda[0x1c..0x1e].copy_from_slice(&0x1eu16.to_le_bytes()); // keyboard buffer tail
    bda[0x49] = 0x03; // video mode 3
    bda[0x4a..0x4c].copy_from_slice(&80u16.to_le_bytes());
    bda[0x4c..0x4e].copy_from_slice(&4096u16.to_le_bytes()); // page size
    bda[0x60..0x62].copy_from_slice(&0x0607u16.to_le_bytes()); // cursor shape
    bda[0x63..0x65].copy_from_slice(&0x3d4u16.to_le_bytes()); // CRTC base
    bda[0x75] = u8::from(boot == BootDevice::HardDisk); // hard disks
    bda[0x7c] = 1; // COM1 timeout
    bda[0x80..0x82].copy_from_slice(&0x1eu16.to_le_bytes()); // kbd buffer start
    bda[0x82..0x84].copy_from_slice(&0x3eu16.to_le_bytes()); // kbd buffer end
    bda[0x84] = 24; // rows - 1
    bda[0x85..0x87].copy_from_slice(&16u16.to_le_bytes()); // char height
    bda[0x87] = 0x60;
    bda[0x88] = 0x09;
    bda[0x89] = 0x11;
    put(mem, BDA_BASE, &bda)?;

    // EBDA: first word is its size in KiB.
    let ebda = u64::from(EBDA_SEGMENT) << 4;
    put(mem, ebda, &[0u8; 1024])?;
    put16(mem, ebda, 1)?;

    // Blank 80x25 text screen, light grey on black.
    let blank: Vec<u8> = [0x20u8, 0x07].repeat(80 * 25);
    put(mem, VGA_TEXT_START, &blank)?;
    Ok(())
}
