//! VHD (Microsoft Virtual Hard Disk): fixed read/write, dynamic read.
//!
//! Written images are "fixed": the raw disk followed by a 512-byte footer. Azure requires the
//! virtual size to be a whole number of MiB, so the size is rounded up to 1 MiB. The footer's
//! creator application is "win " so that readers (QEMU included) take the size from the footer
//! rather than from the CHS geometry, which cannot express every size.

use std::path::Path;

use crate::copy::check_range;
use crate::driver::{Check, Driver};
use crate::raw::{write_plain, FileRange, RawDevice};
use crate::util::{self, be32, be64, TempOut};
use crate::{BlockStatus, Format, ImageError, ImageReader, WriteOptions};

const FOOTER: usize = 512;
const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFF: u32 = 4;
const MIB: u64 = 1 << 20;
/// Seconds between the Unix epoch and 2000-01-01 00:00:00 UTC (VHD timestamps).
const VHD_EPOCH: u64 = 946_684_800;

/// VHD: fixed (read, written in place, written) and dynamic (read).
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Vhd,
    // `conectix` at 0: a dynamic disk's footer copy.
    probe_magic: |head| head.starts_with(COOKIE),
    // `conectix` in the footer, the file's last 512 bytes.
    probe_hint: |file| {
        Ok(file.len >= FOOTER as u64 && file.has_at(file.len - FOOTER as u64, COOKIE)?)
    },
    open: |path| Ok(Box::new(VhdReader::open(path)?)),
    in_place: Some(|path| Ok(Box::new(open_fixed_rw(path)?))),
    check,
    write: write_fixed,
};

/// Ones' complement of the byte sum, skipping the checksum field itself.
fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(b as u32));
    !sum
}

/// CHS geometry exactly as in the VHD specification's appendix.
pub(crate) fn chs(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    total = cth / heads;
    (total as u16, heads as u8, spt as u8)
}

/// Build a fixed-disk footer for a disk of `size` bytes.
pub(crate) fn footer(size: u64) -> [u8; FOOTER] {
    let mut f = [0u8; FOOTER];
    f[0..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none for fixed disks
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    f[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes()); // creator version 10.0
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    let (c, h, s) = chs(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&TYPE_FIXED.to_be_bytes());
    f[68..84].copy_from_slice(&util::pseudo_uuid());
    let sum = checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Write `source` as a fixed VHD, its size rounded up to 1 MiB.
fn write_fixed(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = util::round_up(source.virtual_size().max(1), MIB)
        .ok_or_else(|| ImageError::unsupported(output, "virtual size too large for VHD"))?;
    if size > 2040 * (1u64 << 30) {
        // The VHD format's practical limit (and Azure's) is just under 2 TiB.
        return Err(ImageError::unsupported(
            output,
            format!("virtual size {size} exceeds the VHD limit of 2040 GiB"),
        ));
    }
    let out = TempOut::create(output)?;
    let file = out.file()?;
    write_plain(source, file, output, size, opts.fsync, progress)?;
    util::write_all_at(file, output, &footer(size), size)?;
    util::commit(vec![out], opts.fsync)
}

struct Footer {
    disk_type: u32,
    current_size: u64,
    data_offset: u64,
}

fn parse_footer(path: &Path, f: &[u8]) -> Result<Footer, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Vhd, m);
    if &f[0..8] != COOKIE {
        return Err(bad("footer cookie \"conectix\" not found".into()));
    }
    let stored = be32(f, 64);
    let computed = checksum(f, 64);
    if stored != computed {
        return Err(bad(format!(
            "footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    Ok(Footer {
        disk_type: be32(f, 60),
        current_size: be64(f, 48),
        data_offset: be64(f, 16),
    })
}

/// Reads fixed or dynamic VHDs.
pub(crate) enum VhdReader {
    Fixed(FileRange),
    Dynamic(Box<Dynamic>),
}

pub(crate) struct Dynamic {
    range: FileRange, // file + path; base/size unused except size = virtual size
    bat: Vec<u32>,
    block_size: u64,
    bitmap_bytes: u64,
}

impl VhdReader {
    pub(crate) fn open(path: &Path) -> Result<Self, ImageError> {
        let file = util::open_ro(path)?;
        let len = util::file_len(&file, path)?;
        if len < FOOTER as u64 {
            return Err(ImageError::corrupt(
                path,
                Format::Vhd,
                format!("file is {len} bytes, too short for a VHD footer"),
            ));
        }
        let mut f = [0u8; FOOTER];
        util::read_exact_at(&file, path, &mut f, len - FOOTER as u64, Format::Vhd)?;
        let tail_footer = &f[0..8] == COOKIE;
        if !tail_footer {
            // Dynamic disks keep a footer copy at offset 0; use it if the tail is damaged.
            util::read_exact_at(&file, path, &mut f, 0, Format::Vhd)?;
        }
        let ft = parse_footer(path, &f)?;
        let bad = |m: String| ImageError::corrupt(path, Format::Vhd, m);
        match ft.disk_type {
            TYPE_FIXED => {
                if ft.current_size > len - FOOTER as u64 {
                    return Err(bad(format!(
                        "footer says {} bytes of disk but the file holds only {}",
                        ft.current_size,
                        len - FOOTER as u64
                    )));
                }
                Ok(VhdReader::Fixed(FileRange {
                    file,
                    path: path.to_path_buf(),
                    base: 0,
                    size: ft.current_size,
                    format: Format::Vhd,
                }))
            }
            TYPE_DYNAMIC => {
                let mut h = [0u8; 1024];
                if ft.data_offset > len.saturating_sub(1024) {
                    return Err(bad(format!(
                        "dynamic header offset {} is beyond the end of the file ({len} bytes)",
                        ft.data_offset
                    )));
                }
                util::read_exact_at(&file, path, &mut h, ft.data_offset, Format::Vhd)?;
                if &h[0..8] != DYN_COOKIE {
                    return Err(bad("dynamic header cookie \"cxsparse\" not found".into()));
                }
                let stored = be32(&h, 36);
                if stored != checksum(&h, 36) {
                    return Err(bad("dynamic header checksum mismatch".into()));
                }
                let table = be64(&h, 16);
                let entries = be32(&h, 28) as u64;
                let block_size = be32(&h, 32) as u64;
                if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
                    return Err(bad(format!("invalid block size {block_size}")));
                }
                if entries
                    .checked_mul(block_size)
                    .is_none_or(|t| t < ft.current_size)
                {
                    return Err(bad(format!(
                        "{entries} blocks of {block_size} bytes cannot hold the disk size {}",
                        ft.current_size
                    )));
                }
                if table.checked_add(entries * 4).is_none_or(|end| end > len) {
                    return Err(bad(format!(
                        "block allocation table ({entries} entries at {table}) extends beyond the end of the file"
                    )));
                }
                let mut raw = vec![0u8; (entries * 4) as usize];
                util::read_exact_at(&file, path, &mut raw, table, Format::Vhd)?;
                let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
                let bitmap_bytes = util::round_up(block_size / 512 / 8, 512).unwrap_or(512);
                // Every allocated block (bitmap and data) inside the file, before the footer,
                // and used once: copying costs no more than the file's size.
                let mut claims = util::Claims::new(path, Format::Vhd, len);
                claims.claim(0, FOOTER as u64, "footer copy", 0)?;
                if tail_footer {
                    claims.claim(len - FOOTER as u64, FOOTER as u64, "footer", 0)?;
                }
                claims.claim(ft.data_offset, 1024, "dynamic header", 0)?;
                claims.claim(table, entries * 4, "block allocation table", 0)?;
                for (i, &e) in bat.iter().enumerate() {
                    if e != u32::MAX {
                        claims.claim(
                            e as u64 * 512,
                            bitmap_bytes + block_size,
                            "block",
                            i as u64,
                        )?;
                    }
                }
                claims.finish()?;
                Ok(VhdReader::Dynamic(Box::new(Dynamic {
                    range: FileRange {
                        file,
                        path: path.to_path_buf(),
                        base: 0,
                        size: ft.current_size,
                        format: Format::Vhd,
                    },
                    bat,
                    block_size,
                    bitmap_bytes,
                })))
            }
            TYPE_DIFF => Err(ImageError::unsupported(
                path,
                "differencing VHD images (with a parent) are not supported",
            )),
            t => Err(bad(format!("unknown disk type {t}"))),
        }
    }
}

impl Dynamic {
    /// File offset of the block holding `offset`, if allocated.
    fn block_offset(&self, idx: usize) -> Option<u64> {
        match self.bat.get(idx) {
            Some(&e) if e != u32::MAX => Some(e as u64 * 512 + self.bitmap_bytes),
            _ => None,
        }
    }
}

impl ImageReader for VhdReader {
    fn format(&self) -> Format {
        Format::Vhd
    }
    fn virtual_size(&self) -> u64 {
        match self {
            VhdReader::Fixed(r) => r.size,
            VhdReader::Dynamic(d) => d.range.size,
        }
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        match self {
            VhdReader::Fixed(r) => r.read_at(buf, offset),
            VhdReader::Dynamic(d) => {
                check_range(&d.range.path, offset, buf.len(), d.range.size)?;
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = offset + done as u64;
                    let idx = (pos / d.block_size) as usize;
                    let within = pos % d.block_size;
                    let n = ((d.block_size - within) as usize).min(buf.len() - done);
                    let piece = &mut buf[done..done + n];
                    match d.block_offset(idx) {
                        Some(b) => util::read_exact_at(
                            &d.range.file,
                            &d.range.path,
                            piece,
                            b + within,
                            Format::Vhd,
                        )?,
                        None => piece.fill(0),
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }
    /// Fixed: holes in the file are [`BlockStatus::Zero`]. Dynamic: blocks missing from the
    /// BAT are [`BlockStatus::Unallocated`], allocated blocks data.
    fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        match self {
            VhdReader::Fixed(r) => Ok(r.block_status(offset, max_len)),
            VhdReader::Dynamic(d) => {
                if let Some(past) = util::past_end(offset, d.range.size, max_len) {
                    return Ok(past);
                }
                let end = d.range.size.min(offset.saturating_add(max_len));
                let first = d.block_offset((offset / d.block_size) as usize).is_some();
                let mut pos = offset;
                while pos < end {
                    let idx = (pos / d.block_size) as usize;
                    if d.block_offset(idx).is_some() != first {
                        break;
                    }
                    pos = (idx as u64 + 1) * d.block_size;
                }
                let status = if first {
                    BlockStatus::Data
                } else {
                    BlockStatus::Unallocated
                };
                Ok((status, (pos.min(end) - offset).max(1)))
            }
        }
    }
}

/// Open a fixed VHD for in-place writing (dynamic VHDs are refused).
fn open_fixed_rw(path: &Path) -> Result<RawDevice, ImageError> {
    let size = match VhdReader::open(path)? {
        VhdReader::Fixed(r) => r.size,
        VhdReader::Dynamic(_) => {
            return Err(ImageError::unsupported(
                path,
                "writing dynamic VHD images in place is not supported",
            ))
        }
    };
    let file = util::open_rw(path)?;
    Ok(RawDevice {
        range: FileRange {
            file,
            path: path.to_path_buf(),
            base: 0,
            size,
            format: Format::Vhd,
        },
    })
}

/// Structural check of a VHD: footer, geometry, size alignment, BAT sanity.
fn check(path: &Path) -> Result<Check, ImageError> {
    let reader = VhdReader::open(path)?;
    let mut problems = Vec::new();
    let file = util::open_ro(path)?;
    let len = util::file_len(&file, path)?;
    let size = reader.virtual_size();
    if size % 512 != 0 {
        problems.push(format!("virtual size {size} is not a multiple of 512"));
    }
    match &reader {
        VhdReader::Fixed(_) => {
            if len != size + FOOTER as u64 {
                problems.push(format!(
                    "file length {len} differs from disk size {size} + 512-byte footer"
                ));
            }
        }
        // Opening already refused blocks that leave the file or share bytes.
        VhdReader::Dynamic(d) => {
            for (i, &e) in d.bat.iter().enumerate() {
                if e == u32::MAX {
                    continue;
                }
                if (i as u64) * d.block_size >= size {
                    problems.push(format!("BAT entry {i} is allocated beyond the disk size"));
                }
                let start = e as u64 * 512;
                if start + d.bitmap_bytes + d.block_size > len.saturating_sub(FOOTER as u64) {
                    problems.push(format!(
                        "block {i} at offset {start} extends beyond the end of the data area"
                    ));
                }
                if problems.len() > 50 {
                    problems.push("too many problems; stopping".into());
                    break;
                }
            }
        }
    }
    Ok(Check::single(path, size, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_spec_examples() {
        // 1 MiB: 2048 sectors → 17 spt, 4 heads, 30 cylinders
        assert_eq!(chs(1 << 20), (30, 4, 17));
        assert_eq!(chs(2 << 20), (60, 4, 17));
        // 4 GiB: falls through 17 and 31 sectors per track to 63.
        assert_eq!(chs(4 << 30), (8322, 16, 63));
        // Huge disks clamp to 65535/16/255.
        assert_eq!(chs(1 << 41), (65535, 16, 255));
    }

    #[test]
    fn footer_checksum_roundtrips() {
        let f = footer(64 << 20);
        let parsed = parse_footer(Path::new("x"), &f).unwrap();
        assert_eq!(parsed.current_size, 64 << 20);
        assert_eq!(parsed.disk_type, TYPE_FIXED);
    }
}
