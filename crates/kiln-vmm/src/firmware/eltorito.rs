//! El Torito CD boot: boot catalog parsing, floppy/hard-disk emulation, int 13h AH=4Bh.
//!
//! With an emulation boot entry (media types 1-4) the image inside the ISO becomes BIOS
//! drive 0x00 (floppy) or 0x80 (hard disk) with 512-byte sectors, as SeaBIOS does; the CD
//! itself stays reachable as drive 0xE0. The emulated drive is read-only: writes fail
//! with status 03h (write protected), like SeaBIOS, because the CD medium cannot change
//! and silently dropping writes would hide the failure from the guest.

use super::drive::{read_disk, Geometry, ST_BAD_CMD, ST_OK};
use super::{Ctx, Firmware, BDA_BASE};
use crate::vstate::memory::GuestMem;
use crate::{BootDevice, VmmError};
use vm_memory::{Bytes, GuestAddress};

/// CD sector size.
const CD_SECTOR: u64 = 2048;

/// The initial/default entry of the boot catalog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CdBoot {
    /// CD sector (2048 bytes) where the boot image starts.
    pub lba: u32,
    /// Real-mode segment the first `sector_count` 512-byte sectors are loaded at.
    pub load_segment: u16,
    /// 512-byte virtual sectors to load.
    pub sector_count: u16,
    /// 0 = no emulation, 1/2/3 = 1.2M/1.44M/2.88M floppy, 4 = hard disk.
    pub media: u8,
}

/// An emulated drive backed by the boot image inside the ISO.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Emulation {
    /// BIOS drive number (0x00 or 0x80).
    pub drive: u8,
    /// How int 13h presents it (Floppy or HardDisk).
    pub kind: BootDevice,
    /// Byte offset of the image in the ISO.
    pub base: u64,
    /// CHS geometry and size in 512-byte sectors.
    pub geometry: Geometry,
}

/// Parses the El Torito boot record (ISO sector 17) and the boot catalog's initial entry.
pub(super) fn boot_entry(fw: &mut Firmware) -> Result<CdBoot, VmmError> {
    let size = fw.disk.size();
    if size < 18 * CD_SECTOR {
        return Err(VmmError::NotBootable(
            "CD image is too small to hold an El Torito boot record (sector 17)".into(),
        ));
    }
    let brvd = read_disk(
        fw,
        17 * CD_SECTOR,
        2048,
        "reading ISO sector 17 (boot record)",
    )?;
    if brvd[0] != 0 || &brvd[1..6] != b"CD001" || !brvd[7..].starts_with(b"EL TORITO SPECIFICATION")
    {
        return Err(VmmError::NotBootable(
            "ISO sector 17 is not an El Torito boot record volume descriptor".into(),
        ));
    }
    let catalog = u32::from_le_bytes([brvd[0x47], brvd[0x48], brvd[0x49], brvd[0x4a]]);
    if (u64::from(catalog) + 1) * CD_SECTOR > size {
        return Err(VmmError::NotBootable(format!(
            "El Torito boot catalog sector {catalog} is beyond the end of the image"
        )));
    }
    let cat = read_disk(
        fw,
        u64::from(catalog) * CD_SECTOR,
        64,
        "reading El Torito boot catalog",
    )?;
    let sum = cat[..32].chunks(2).fold(0u16, |a, w| {
        a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    if cat[0] != 1 || cat[30..32] != [0x55, 0xaa] || sum != 0 {
        return Err(VmmError::NotBootable(format!(
            "El Torito boot catalog at sector {catalog} has a bad validation entry"
        )));
    }
    let entry = &cat[32..64];
    if entry[0] != 0x88 {
        return Err(VmmError::NotBootable(
            "El Torito initial entry is not marked bootable (0x88)".into(),
        ));
    }
    let media = entry[1] & 0x0f;
    if media > 4 {
        return Err(VmmError::NotBootable(format!(
            "El Torito initial entry has unknown media type {media} (expected 0-4)"
        )));
    }
    let lba = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
    if u64::from(lba) * CD_SECTOR + 512 > size {
        return Err(VmmError::NotBootable(format!(
            "El Torito boot image at sector {lba} is beyond the end of the image ({size} bytes)"
        )));
    }
    let seg = u16::from_le_bytes([entry[2], entry[3]]);
    Ok(CdBoot {
        load_segment: if seg == 0 { 0x07c0 } else { seg },
        sector_count: u16::from_le_bytes([entry[6], entry[7]]).max(1),
        lba,
        media,
    })
}

/// The emulated drive for `cd`, or `None` for a no-emulation entry. `first` is the
/// image's first 512-byte sector (the MBR for hard-disk emulation).
pub(super) fn emulation(fw: &Firmware, cd: &CdBoot, first: &[u8]) -> Option<Emulation> {
    let base = u64::from(cd.lba) * CD_SECTOR;
    let (drive, kind, geometry) = match cd.media {
        1..=3 => {
            let kib = [1200u64, 1440, 2880][usize::from(cd.media - 1)];
            let g = Geometry::for_disk(BootDevice::Floppy, kib * 1024);
            (0x00, BootDevice::Floppy, g)
        }
        4 => {
            let rest = fw.disk.size().saturating_sub(base);
            (0x80, BootDevice::HardDisk, mbr_geometry(first, rest))
        }
        _ => return None,
    };
    Some(Emulation {
        drive,
        kind,
        base,
        geometry,
    })
}

/// Geometry of an emulated hard disk: heads and sectors per track from the end CHS of the
/// first used partition (what the image's own MBR code will compute with), size from the
/// furthest partition end. Without a usable partition table, a translated geometry for
/// the rest of the ISO (`rest` bytes), so reads stay in bounds of the medium.
fn mbr_geometry(mbr: &[u8], rest: u64) -> Geometry {
    let fallback = Geometry::for_disk(BootDevice::HardDisk, rest);
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xaa] {
        return fallback;
    }
    let parts: Vec<&[u8]> = mbr[446..510]
        .chunks(16)
        .filter(|p| p[4] != 0 && p[12..16] != [0; 4])
        .collect();
    let Some(first) = parts.first() else {
        return fallback;
    };
    let heads = u32::from(first[5]) + 1;
    let sectors = u32::from(first[6] & 0x3f);
    let end_cyl = u32::from(first[7]) | (u32::from(first[6] & 0xc0) << 2);
    if sectors == 0 {
        return fallback;
    }
    let lba_end = parts
        .iter()
        .map(|p| {
            let start = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
            let len = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
            u64::from(start) + u64::from(len)
        })
        .max()
        .unwrap_or(0);
    let per_cyl = u64::from(heads * sectors);
    let cylinders = (u64::from(end_cyl) + 1).max(lba_end.div_ceil(per_cyl));
    Geometry {
        cylinders: cylinders.min(1024) as u32,
        heads,
        sectors,
        sector_size: 512,
        total: (cylinders * per_cyl).max(lba_end),
    }
}

/// Makes the BIOS data area list the emulated drive (floppy present / one hard disk).
pub(super) fn announce(emu: &Emulation, mem: &GuestMem) -> Result<(), VmmError> {
    let fail = |e| VmmError::Memory(format!("updating BDA for the emulated drive: {e}"));
    if emu.kind == BootDevice::Floppy {
        let equip: u16 = mem.read_obj(GuestAddress(BDA_BASE + 0x10)).map_err(fail)?;
        mem.write_obj(equip | 1, GuestAddress(BDA_BASE + 0x10))
            .map_err(fail)
    } else {
        mem.write_obj(1u8, GuestAddress(BDA_BASE + 0x75))
            .map_err(fail)
    }
}

/// int 13h AH=4Bh: AL=00h terminate disk emulation, AL=01h get status. Both fill the
/// 13h-byte specification packet at DS:SI. Answered for any DL, like SeaBIOS; AL=00h
/// ends the emulation when DL is the emulated drive or 7Fh (all).
pub(super) fn int13_4b(fw: &mut Firmware, ctx: &mut Ctx<'_>) -> u8 {
    let r = ctx.r;
    let (Some(cd), true) = (fw.cd_boot, r.al() <= 1) else {
        fw.unsupported(0x13, r.ax());
        return ST_BAD_CMD;
    };
    let mut p = [0u8; 0x13];
    p[0] = 0x13;
    p[1] = cd.media;
    p[2] = fw.emulation.map_or(0xe0, |e| e.drive);
    p[4..8].copy_from_slice(&cd.lba.to_le_bytes());
    p[0x0c..0x0e].copy_from_slice(&cd.load_segment.to_le_bytes());
    p[0x0e..0x10].copy_from_slice(&cd.sector_count.to_le_bytes());
    if let Some(e) = fw.emulation {
        // The values int 13h AH=08h returns in CH, CL and DH.
        let g = e.geometry;
        let maxc = g.cylinders.saturating_sub(1);
        p[0x10] = maxc as u8;
        p[0x11] = (g.sectors as u8 & 0x3f) | ((maxc >> 2) as u8 & 0xc0);
        p[0x12] = g.heads.saturating_sub(1) as u8;
        if r.al() == 0 && (r.dl() == e.drive || r.dl() == 0x7f) {
            fw.emulation = None;
        }
    }
    ctx.write_bytes(ctx.ds_lin(u64::from(r.si())), &p);
    ST_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entry: [u8; 16]) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        m[446..462].copy_from_slice(&entry);
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    #[test]
    fn hdd_geometry_from_partition_table() {
        // Partition 63..8192 on 16 heads x 63 sectors with end CHS 7/15/63 (the end of
        // cylinder 7): the LBA end (8192) needs a 9th cylinder.
        let mut e = [0u8; 16];
        e[0] = 0x80;
        e[1..4].copy_from_slice(&[1, 1, 0]);
        e[4] = 0x06;
        e[5..8].copy_from_slice(&[15, 63, 7]);
        e[8..12].copy_from_slice(&63u32.to_le_bytes());
        e[12..16].copy_from_slice(&(8192u32 - 63).to_le_bytes());
        let g = mbr_geometry(&mbr(e), 1 << 30);
        assert_eq!((g.cylinders, g.heads, g.sectors), (9, 16, 63));
        assert_eq!(g.total, 9 * 16 * 63);
    }

    #[test]
    fn hdd_geometry_fallbacks() {
        let rest = 4 << 20;
        let want = Geometry::for_disk(BootDevice::HardDisk, rest);
        assert_eq!(mbr_geometry(&[0u8; 512], rest), want, "no 55AA");
        assert_eq!(mbr_geometry(&mbr([0; 16]), rest), want, "no partition");
        let mut e = [0u8; 16];
        e[4] = 0x83;
        e[12] = 1;
        assert_eq!(mbr_geometry(&mbr(e), rest), want, "zero sectors per track");
        assert_eq!(mbr_geometry(&[0u8; 10], rest), want, "short sector");
    }
}
