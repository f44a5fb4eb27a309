//! int 13h disk services and boot loading (MBR/VBR, floppy, El Torito CD).

use super::drive::{
    read_disk, Geometry, ST_BAD_CMD, ST_DMA_BOUNDARY, ST_NOT_FOUND, ST_OK, ST_WRITE_PROTECTED,
};
use super::{eltorito, Ctx, Firmware, BDA_BASE, BIOS_SEGMENT};
use crate::firmware::bios::DPT_OFFSET;
use crate::vstate::memory::GuestMem;
use crate::{BootDevice, VmmError};
use vm_memory::{Bytes, GuestAddress};

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
            let cd = eltorito::boot_entry(fw)?;
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
            // A reboot (int 19h, reset) restarts any emulation the guest terminated.
            fw.emulation = eltorito::emulation(fw, &cd, &image[..512]);
            if let Some(emu) = &fw.emulation {
                eltorito::announce(emu, mem)?;
                tracing::debug!(
                    "El Torito media type {} emulated as drive {:#04x}: {:?}",
                    cd.media,
                    emu.drive,
                    emu.geometry
                );
            }
            (image, cd.load_segment, 0)
        }
    };
    let dest = (u64::from(cs) << 4) + u64::from(ip);
    mem.write_slice(&code, GuestAddress(dest))
        .map_err(|e| VmmError::Memory(format!("loading boot code at {dest:#x}: {e}")))?;
    Ok((cs, ip))
}

/// One int 13h drive as the guest addresses it: the boot disk itself, or an El Torito
/// emulated drive (a window of 512-byte sectors inside the CD image).
#[derive(Debug, Clone, Copy)]
struct Drive {
    kind: BootDevice,
    /// Byte offset of sector 0 in the backing disk.
    base: u64,
    geometry: Geometry,
    read_only: bool,
}

impl Firmware {
    /// The drive BIOS number `dl` names, if it exists.
    fn drive(&self, dl: u8) -> Option<Drive> {
        if let Some(e) = self.emulation.filter(|e| e.drive == dl) {
            return Some(Drive {
                kind: e.kind,
                base: e.base,
                geometry: e.geometry,
                read_only: true,
            });
        }
        (dl == self.boot.drive_number()).then_some(Drive {
            kind: self.boot,
            base: 0,
            geometry: self.geometry,
            read_only: self.boot == BootDevice::Cdrom,
        })
    }

    /// Transfers `count` sectors at `lba` of drive `d` to/from guest linear address
    /// `addr`. Returns the number transferred and the status.
    fn transfer(
        &mut self,
        ctx: &Ctx<'_>,
        d: &Drive,
        lba: u64,
        count: u64,
        addr: u64,
        write: bool,
    ) -> (u64, u8) {
        if write && d.read_only {
            return (0, ST_WRITE_PROTECTED);
        }
        let ss = u64::from(d.geometry.sector_size);
        let total = d.geometry.total;
        let mut done = 0;
        let mut buf = vec![0u8; ss as usize];
        while done < count {
            let l = lba + done;
            if l >= total {
                return (done, ST_NOT_FOUND);
            }
            let a = GuestAddress(addr + done * ss);
            let off = d.base + l * ss;
            if write {
                if ctx.mem.read_slice(&mut buf, a).is_err() {
                    return (done, ST_DMA_BOUNDARY);
                }
                if let Err(e) = self.disk.write_at(&buf, off) {
                    tracing::warn!("int 13h write of sector {l} failed: {e}");
                    return (done, ST_WRITE_PROTECTED);
                }
            } else {
                if let Err(e) = self.disk.read_at(&mut buf, off) {
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

fn finish(fw: &mut Firmware, ctx: &mut Ctx<'_>, kind: BootDevice, status: u8) {
    fw.disk_status = status;
    ctx.r.set_ah(status);
    ctx.set_cf(status != ST_OK);
    if kind == BootDevice::HardDisk {
        ctx.write_bytes(BDA_BASE + 0x74, &[status]);
    } else if kind == BootDevice::Floppy {
        ctx.write_bytes(BDA_BASE + 0x41, &[status]);
    }
}

/// Floppy drive type for int 13h AH=08h BL, from the media geometry.
fn floppy_type(g: &Geometry) -> u16 {
    match (g.cylinders, g.sectors) {
        (80, 9) => 3,
        (_, 8 | 9) => 1,
        (_, 15) => 2,
        (_, 36) => 5,
        _ => 4,
    }
}

pub(super) fn int13(fw: &mut Firmware, ctx: &mut Ctx<'_>) {
    let r = ctx.r;
    let ah = r.ah();
    if ah == 0x4b && fw.boot == BootDevice::Cdrom {
        let st = eltorito::int13_4b(fw, ctx);
        return finish(fw, ctx, BootDevice::Cdrom, st);
    }
    let Some(d) = fw.drive(r.dl()) else {
        // Only the boot drive (and an El Torito emulated drive) exists.
        ctx.r.set_ah(ST_BAD_CMD);
        ctx.set_cf(true);
        return;
    };
    let (g, kind) = (d.geometry, d.kind);
    let cd = kind == BootDevice::Cdrom;
    match ah {
        0x00 => finish(fw, ctx, kind, ST_OK),
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
                return finish(fw, ctx, kind, ST_BAD_CMD);
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
                fw.transfer(ctx, &d, lba, count, addr, ah == 0x03)
            };
            ctx.r.set_al(done as u8);
            finish(fw, ctx, kind, st);
        }
        0x08 if !cd => {
            let maxc = g.cylinders.saturating_sub(1);
            ctx.r.set_ch(maxc as u8);
            ctx.r
                .set_cl((g.sectors as u8 & 0x3f) | ((maxc >> 2) as u8 & 0xc0));
            ctx.r.set_dh((g.heads - 1) as u8);
            ctx.r.set_dl(1);
            if kind == BootDevice::Floppy {
                ctx.r.set_bx(floppy_type(&g));
                ctx.s.es.selector = BIOS_SEGMENT;
                ctx.s.es.base = u64::from(BIOS_SEGMENT) << 4;
                ctx.sregs_dirty = true;
                ctx.r.0.rdi = u64::from(DPT_OFFSET);
            }
            ctx.r.set_al(0);
            finish(fw, ctx, kind, ST_OK);
        }
        0x15 if !cd => {
            if kind == BootDevice::Floppy {
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
        0x41 if r.bx() == 0x55aa && kind != BootDevice::Floppy => {
            ctx.r.set_bx(0xaa55);
            ctx.r.set_ah(0x30);
            ctx.r.set_cx(0x0005);
            ctx.set_cf(false);
        }
        0x42..=0x44 if kind != BootDevice::Floppy => {
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
                return finish(fw, ctx, kind, ST_BAD_CMD);
            }
            let (done, st) = match ah {
                0x44 => (count, ST_OK),
                _ => fw.transfer(ctx, &d, lba, count, addr, ah == 0x43),
            };
            ctx.write_u16(dap + 2, done as u16);
            finish(fw, ctx, kind, st);
        }
        0x48 if kind != BootDevice::Floppy => {
            let buf = ctx.ds_lin(u64::from(r.si()));
            if ctx.read_u16(buf) < 0x1a {
                return finish(fw, ctx, kind, ST_BAD_CMD);
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
            finish(fw, ctx, kind, ST_OK);
        }
        // Floppy change line / set media type / park heads etc.: nothing to do.
        0x09 | 0x0c | 0x0d | 0x10 | 0x11 | 0x16 | 0x17 | 0x18 if !cd => {
            finish(fw, ctx, kind, ST_OK)
        }
        _ => {
            fw.unsupported(0x13, r.ax());
            finish(fw, ctx, kind, ST_BAD_CMD);
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
