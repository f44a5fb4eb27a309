//! What the firmware's disk services share: BIOS geometry, reading the boot disk, and the
//! int 13h status codes. The boot loader and int 13h (`disk`) and El Torito (`eltorito`) both
//! build on this module, and neither on the other's internals.

use super::Firmware;
use crate::{BootDevice, VmmError};

// int 13h status codes (AH on return).
pub(crate) const ST_OK: u8 = 0x00;
pub(crate) const ST_BAD_CMD: u8 = 0x01;
pub(crate) const ST_WRITE_PROTECTED: u8 = 0x03;
pub(crate) const ST_NOT_FOUND: u8 = 0x04;
pub(crate) const ST_DMA_BOUNDARY: u8 = 0x09;

/// BIOS CHS geometry of the boot disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders (at most 1024 for CHS calls).
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector (512, or 2048 for CD).
    pub sector_size: u32,
    /// Total sectors.
    pub total: u64,
}

impl Geometry {
    /// The geometry a BIOS would report for a disk of `size` bytes.
    pub fn for_disk(kind: BootDevice, size: u64) -> Geometry {
        match kind {
            BootDevice::Cdrom => Geometry {
                cylinders: 0,
                heads: 0,
                sectors: 0,
                sector_size: 2048,
                total: size / 2048,
            },
            BootDevice::Floppy => {
                let (c, h, s) = match size / 1024 {
                    0..=160 => (40, 1, 8),
                    161..=180 => (40, 1, 9),
                    181..=320 => (40, 2, 8),
                    321..=360 => (40, 2, 9),
                    361..=720 => (80, 2, 9),
                    721..=1200 => (80, 2, 15),
                    1201..=1440 => (80, 2, 18),
                    _ => (80, 2, 36),
                };
                Geometry {
                    cylinders: c,
                    heads: h,
                    sectors: s,
                    sector_size: 512,
                    total: size / 512,
                }
            }
            BootDevice::HardDisk => {
                let total = size / 512;
                // LBA-assisted translation like SeaBIOS: 63 sectors, 16..255 heads.
                let mut heads = 16u64;
                while heads < 255 && total / (heads * 63) > 1024 {
                    heads = if heads == 128 { 255 } else { heads * 2 };
                }
                let cylinders = (total / (heads * 63)).clamp(1, 1024);
                Geometry {
                    cylinders: cylinders as u32,
                    heads: heads as u32,
                    sectors: 63,
                    sector_size: 512,
                    total,
                }
            }
        }
    }
}

/// Reads `len` bytes at `off` of the boot disk; `what` names the read in errors.
pub(crate) fn read_disk(
    fw: &mut Firmware,
    off: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, VmmError> {
    let mut buf = vec![0u8; len];
    fw.disk
        .read_at(&mut buf, off)
        .map_err(|source| VmmError::Disk {
            what: what.to_string(),
            source,
        })?;
    Ok(buf)
}
