//! int 13h disk services and boot loading (MBR/VBR, floppy, El Torito no-emulation).

use super::{Ctx, Firmware, BDA_BASE, BIOS_SEGMENT};
use crate::firmware::bios::DPT_OFFSET;
use crate::vstate::memory::GuestMem;
use crate::{BootDevice, VmmError};
use vm_memory::{Bytes, GuestAddress};

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

/// El Torito boot entry, kept for int 13h AX=4B01h.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CdBoot {
    lba: u32,
    load_segment: u16,
    sector_count: u16,
}

fn read_disk(fw: &mut Firmware, off: u64, len: usize, what: &str) -> Result<Vec<u8>, VmmError> {
    let mut buf = vec![0u8; len];
    fw.disk
        .read_at(&mut buf, off)
        .map_err(|source| VmmError::Disk {
            what: what.to_string(),
            source,
        })?;
    Ok(buf)
}

/// Loads the boot code; returns CS:IP to start at.
pub(super) fn load_boot(fw: &mut Firmware, mem: &GuestMem) -> Result<(u16, u16), VmmError> {
    let size = fw.disk.size();
    let (code, cs, ip) = match fw.boot {
        BootDevice::HardDisk | BootDevice::Floppy => {
            if size < 512 {
                return Err(VmmError::NotBootable(format!(
                    "disk is {size} bytes, smaller than one 512-byte sector"
                )));
            }
            let sector = read_disk(fw, 0, 512, "reading boot sector 0")?;
            if sector[510..512] != [0x55, 0xaa] {
                return Err(VmmError::NotBootable(format!(
                    "sector 0 ends in {:02x} {:02x}, not the 55 AA boot signature",
                    sector[510], sector[511]
                )));
            }
            (sector, 0u16, 0x7c00u16)
        }
        BootDevice::Cdrom => {
            let cd = el_torito(fw)?;
            let bytes = usize::from(cd.sector_count) * 512;
            let mut image = read_disk(
                fw,
                u64::from(cd.lba) * 2048,
                bytes
                    .max(512)
                    .min((size.saturating_sub(u64::from(cd.lba) * 2048)) as usize),
                "reading El Torito boot image",
            )?;
            image.resize(bytes, 0);
            let dest = u64::from(cd.load_segment) << 4;
            if dest < 0x500 || dest + bytes as u64 > u64::from(super::EBDA_SEGMENT) << 4 {
                return Err(VmmError::NotBootable(format!(
                    "El Torito image ({bytes} bytes at segment {:#06x}) does not fit in conventional memory",
                    cd.load_segment
                )));
            }
            fw.cd_boot = Some(cd);
            (image, cd.load_segment, 0)
        }
    };
    let dest = (u64::from(cs) << 4) + u64::from(ip);
    mem.write_slice(&code, GuestAddress(dest))
        .map_err(|e| VmmError::Memory(format!("loading boot code at {dest:#x}: {e}")))?;
    Ok((cs, ip))
}

/// Parses the El Torito boot record (ISO sector 17) and boot catalog.
fn el_torito(fw: &mut Firmware) -> Result<CdBoot, VmmError> {
    if fw.disk.size() < 18 * 2048 {
        return Err(VmmError::NotBootable(
            "CD image is too small to hold an El Torito boot record (sector 17)".into(),
        ));
    }
    let brvd = read_disk(fw, 17 * 2048, 2048, "reading ISO sector 17 (boot record)")?;
    if brvd[0] != 0 || &brvd[1..6] != b"CD001" || !brvd[7..].starts_with(b"EL TORITO SPECIFICATION")
    {
        return Err(VmmError::NotBootable(
            "ISO sector 17 is not an El Torito boot record volume descriptor".into(),
        ));
    }
    let catalog = u32::from_le_bytes([brvd[0x47], brvd[0x48], brvd[0x49], brvd[0x4a]]);
    if (u64::from(catalog) + 1) * 2048 > fw.disk.size() {
        return Err(VmmError::NotBootable(format!(
            "El Torito boot catalog sector {catalog} is beyond the end of the image"
        )));
    }
    let cat = read_disk(
        fw,
        u64::from(catalog) * 2048,
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
    if entry[1] & 0x0f != 0 {
        return Err(VmmError::NotBootable(format!(
            "El Torito media type {} (disk emulation) is not supported; only no-emulation",
            entry[1] & 0x0f
        )));
    }
    let seg = u16::from_le_bytes([entry[2], entry[3]]);
    Ok(CdBoot {
        load_segment: if seg == 0 { 0x07c0 } else { seg },
        sector_count: u16::from_le_bytes([entry[6], entry[7]]).max(1),
        lba: u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]),
    })
}

/// int 13h status codes.
const ST_OK: u8 = 0x00;
const ST_BAD_CMD: u8 = 0x01;
const ST_WRITE_PROTECTED: u8 = 0x03;
const ST_NOT_FOUND: u8 = 0x04;
const ST_DMA_BOUNDARY: u8 = 0x09;

impl Firmware {
    /// Transfers `count` sectors at `lba` to/from guest linear address `addr`.
    /// Returns the number transferred and the status.
    fn transfer(
        &mut self,
        ctx: &Ctx<'_>,
        lba: u64,
        count: u64,
        addr: u64,
        write: bool,
    ) -> (u64, u8) {
        let ss = u64::from(self.geometry.sector_size);
        let total = self.disk.size() / ss;
        let mut done = 0;
        let mut buf = vec![0u8; ss as usize];
        while done < count {
            let l = lba + done;
            if l >= total {
                return (done, ST_NOT_FOUND);
            }
            let a = GuestAddress(addr + done * ss);
            if write {
                if ctx.mem.read_slice(&mut buf, a).is_err() {
                    return (done, ST_DMA_BOUNDARY);
                }
                if let Err(e) = self.disk.write_at(&buf, l * ss) {
                    tracing::warn!("int 13h write of sector {l} failed: {e}");
                    return (done, ST_WRITE_PROTECTED);
                }
            } else {
                if let Err(e) = self.disk.read_at(&mut buf, l * ss) {
                    tracing::warn!("int 13h read of sector {l} failed: {e}");
                    return (done, ST_NOT_FOUND);
                }
                if ctx.mem.write_slice(&buf, a).is_err() {
                    return (done, ST_DMA_BOUNDARY);
                }
            }
            done += 1;
        }
        (done, ST_OK)
    }
}

fn finish(fw: &mut Firmware, ctx: &mut Ctx<'_>, status: u8) {
    fw.disk_status = status;
    ctx.r.set_ah(status);
    ctx.set_cf(status != ST_OK);
    if fw.boot == BootDevice::HardDisk {
        ctx.write_bytes(BDA_BASE + 0x74, &[status]);
    } else if fw.boot == BootDevice::Floppy {
        ctx.write_bytes(BDA_BASE + 0x41, &[status]);
    }
}

pub(super) fn int13(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    let ah = r.ah();
    if r.dl() != fw.boot.drive_number() {
        // Only the boot drive exists. AH=08h on a missing hard disk still reports
        // the count of hard disks (0) in DL.
        ctx.r.set_ah(ST_BAD_CMD);
        ctx.set_cf(true);
        return;
    }
    let g = fw.geometry;
    let cd = fw.boot == BootDevice::Cdrom;
    match ah {
        0x00 => finish(fw, ctx, ST_OK),
        0x01 => {
            let last = fw.disk_status;
            ctx.r.set_ah(last);
            ctx.set_cf(last != ST_OK);
        }
        0x02..=0x04 if !cd => {
            let count = u64::from(r.al());
            let cyl = u64::from(r.ch()) | (u64::from(r.cl() & 0xc0) << 2);
            let sec = u64::from(r.cl() & 0x3f);
            let head = u64::from(r.dh());
            if count == 0 || sec == 0 || sec > u64::from(g.sectors) || head >= u64::from(g.heads) {
                ctx.r.set_al(0);
                return finish(fw, ctx, ST_BAD_CMD);
            }
            let lba = (cyl * u64::from(g.heads) + head) * u64::from(g.sectors) + sec - 1;
            let (done, st) = if ah == 0x04 {
                // Verify: nothing to compare against; just range-check.
                if lba + count <= g.total {
                    (count, ST_OK)
                } else {
                    (g.total.saturating_sub(lba), ST_NOT_FOUND)
                }
            } else {
                let addr = ctx.es_lin(u64::from(r.bx()));
                fw.transfer(ctx, lba, count, addr, ah == 0x03)
            };
            ctx.r.set_al(done as u8);
            finish(fw, ctx, st);
        }
        0x08 if !cd => {
            let maxc = g.cylinders.saturating_sub(1);
            ctx.r.set_ch(maxc as u8);
            ctx.r
                .set_cl((g.sectors as u8 & 0x3f) | ((maxc >> 2) as u8 & 0xc0));
            ctx.r.set_dh((g.heads - 1) as u8);
            ctx.r.set_dl(1);
            if fw.boot == BootDevice::Floppy {
                ctx.r.set_bx(0x0004);
                ctx.s.es.selector = BIOS_SEGMENT;
                ctx.s.es.base = u64::from(BIOS_SEGMENT) << 4;
                ctx.sregs_dirty = true;
                ctx.r.0.rdi = u64::from(DPT_OFFSET);
            }
            ctx.r.set_al(0);
            finish(fw, ctx, ST_OK);
        }
        0x15 if !cd => {
            if fw.boot == BootDevice::Floppy {
                ctx.r.set_ah(0x01);
            } else {
                ctx.r.set_ah(0x03);
                let n = g.total.min(u64::from(u32::MAX)) as u32;
                ctx.r.set_cx((n >> 16) as u16);
                ctx.r.set_dx(n as u16);
            }
            fw.disk_status = ST_OK;
            ctx.set_cf(false);
        }
        0x41 if r.bx() == 0x55aa && fw.boot != BootDevice::Floppy => {
            ctx.r.set_bx(0xaa55);
            ctx.r.set_ah(0x30);
            ctx.r.set_cx(0x0005);
            ctx.set_cf(false);
        }
        0x42..=0x44 if fw.boot != BootDevice::Floppy => {
            let dap = ctx.ds_lin(u64::from(r.si()));
            let size = ctx.read_u8(dap);
            let count = u64::from(ctx.read_u16(dap + 2));
            let off = ctx.read_u16(dap + 4);
            let seg = ctx.read_u16(dap + 6);
            let lba = ctx.read_u64(dap + 8);
            let addr = if seg == 0xffff && off == 0xffff && size >= 0x18 {
                ctx.read_u64(dap + 0x10)
            } else {
                (u64::from(seg) << 4) + u64::from(off)
            };
            if size < 0x10 {
                return finish(fw, ctx, ST_BAD_CMD);
            }
            let (done, st) = match ah {
                0x44 => (count, ST_OK),
                0x43 if cd => (0, ST_WRITE_PROTECTED),
                _ => fw.transfer(ctx, lba, count, addr, ah == 0x43),
            };
            ctx.write_u16(dap + 2, done as u16);
            finish(fw, ctx, st);
        }
        0x48 if fw.boot != BootDevice::Floppy => {
            let buf = ctx.ds_lin(u64::from(r.si()));
            if ctx.read_u16(buf) < 0x1a {
                return finish(fw, ctx, ST_BAD_CMD);
            }
            let mut p = Vec::with_capacity(0x1a);
            p.extend_from_slice(&0x1au16.to_le_bytes());
            let (flags, c, h, s) = if cd {
                (0x0074u16, u32::MAX, u32::MAX, u32::MAX)
            } else {
                (0x0002, g.cylinders, g.heads, g.sectors)
            };
            p.extend_from_slice(&flags.to_le_bytes());
            p.extend_from_slice(&c.to_le_bytes());
            p.extend_from_slice(&h.to_le_bytes());
            p.extend_from_slice(&s.to_le_bytes());
            p.extend_from_slice(&g.total.to_le_bytes());
            p.extend_from_slice(&(g.sector_size as u16).to_le_bytes());
            ctx.write_bytes(buf, &p);
            finish(fw, ctx, ST_OK);
        }
        0x4b if cd && r.al() <= 1 => {
            let cdb = fw.cd_boot;
            if let Some(b) = cdb {
                let mut p = [0u8; 0x13];
                p[0] = 0x13;
                p[2] = 0xe0;
                p[4..8].copy_from_slice(&b.lba.to_le_bytes());
                p[0x0c..0x0e].copy_from_slice(&b.load_segment.to_le_bytes());
                p[0x0e..0x10].copy_from_slice(&b.sector_count.to_le_bytes());
                ctx.write_bytes(ctx.ds_lin(u64::from(r.si())), &p);
                finish(fw, ctx, ST_OK);
            } else {
                finish(fw, ctx, ST_BAD_CMD);
            }
        }
        // Floppy change line / set media type / park heads etc.: nothing to do.
        0x09 | 0x0c | 0x0d | 0x10 | 0x11 | 0x16 | 0x17 | 0x18 if !cd => finish(fw, ctx, ST_OK),
        _ => {
            fw.unsupported(0x13, r.ax());
            finish(fw, ctx, ST_BAD_CMD);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries() {
        let g = Geometry::for_disk(BootDevice::HardDisk, 1 << 20);
        assert_eq!((g.heads, g.sectors, g.total), (16, 63, 2048));
        assert_eq!(g.cylinders, 2);
        let g = Geometry::for_disk(BootDevice::HardDisk, 4 << 30);
        assert_eq!((g.heads, g.sectors, g.cylinders), (255, 63, 522));
        let g = Geometry::for_disk(BootDevice::Floppy, 1_474_560);
        assert_eq!((g.cylinders, g.heads, g.sectors), (80, 2, 18));
        assert_eq!(
            Geometry::for_disk(BootDevice::Cdrom, 4096).sector_size,
            2048
        );
    }
}
