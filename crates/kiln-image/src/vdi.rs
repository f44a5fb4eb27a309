//! VDI (VirtualBox Disk Image): dynamic read/write, fixed read.
//!
//! Layout written: 512-byte header, block map at 0x200 (u32 LE per 1 MiB block,
//! 0xFFFFFFFF = unallocated), data area aligned to 1 MiB, blocks appended in the order first
//! written. Block contents that were never written stay holes in the file.

use std::path::{Path, PathBuf};

use crate::copy::{check_range, copy, Sink};
use crate::driver::{self, Check, Driver};
use crate::util::{self, le32, le64, TempOut};
use crate::{BlockStatus, Format, ImageError, ImageReader, WriteOptions};

const SIGNATURE: u32 = 0xBEDA_107F;
const VERSION: u32 = 0x0001_0001;
const TEXT: &[u8] = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
const HEADER_SIZE_V1_1: u32 = 0x190;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
const BLOCK: u64 = 1 << 20;
const UNALLOCATED: u32 = u32::MAX;
const ZEROED: u32 = u32::MAX - 1;
const BMAP_OFFSET: u64 = 0x200;
/// Most blocks we accept: 16 Mi blocks (16 TiB with 1 MiB blocks), so the in-memory block
/// map stays ≤ 64 MiB whatever the header claims.
const MAX_BLOCKS: u64 = 1 << 24;

/// VDI: dynamic (read, written) and fixed (read); never written in place.
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Vdi,
    // The signature `0xBEDA107F` at 0x40, after the header's text line.
    probe_magic: |head| head.len() >= 0x44 && head[0x40..0x44] == SIGNATURE.to_le_bytes(),
    probe_hint: driver::no_hint,
    open: |path| Ok(Box::new(VdiReader::open(path)?)),
    in_place: None,
    check,
    write,
};

struct Header {
    image_type: u32,
    offset_bmap: u64,
    offset_data: u64,
    disk_size: u64,
    block_size: u64,
    block_extra: u64,
    blocks_in_image: u64,
    blocks_allocated: u64,
}

fn header_bytes(disk_size: u64, blocks: u64, allocated: u64, offset_data: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..TEXT.len()].copy_from_slice(TEXT);
    h[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
    h[0x44..0x48].copy_from_slice(&VERSION.to_le_bytes());
    h[0x48..0x4c].copy_from_slice(&HEADER_SIZE_V1_1.to_le_bytes());
    h[0x4c..0x50].copy_from_slice(&TYPE_DYNAMIC.to_le_bytes());
    // 0x50 flags = 0, 0x54..0x154 description = empty
    h[0x154..0x158].copy_from_slice(&(BMAP_OFFSET as u32).to_le_bytes());
    h[0x158..0x15c].copy_from_slice(&(offset_data as u32).to_le_bytes());
    // Legacy geometry left 0 (= let VirtualBox decide); sector size must be 512.
    h[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
    h[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
    h[0x178..0x17c].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[0x180..0x184].copy_from_slice(&(blocks as u32).to_le_bytes());
    h[0x184..0x188].copy_from_slice(&(allocated as u32).to_le_bytes());
    h[0x188..0x198].copy_from_slice(&util::pseudo_uuid()); // image UUID
    h[0x198..0x1a8].copy_from_slice(&util::pseudo_uuid()); // last snapshot UUID
                                                           // LCHS geometry sector size (0 geometry otherwise).
    h[0x1d4..0x1d8].copy_from_slice(&512u32.to_le_bytes());
    h
}

struct VdiSink<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    map: Vec<u32>,
    allocated: u32,
    offset_data: u64,
}

impl Sink for VdiSink<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = (pos / BLOCK) as usize;
            let within = pos % BLOCK;
            let n = ((BLOCK - within) as usize).min(data.len() - done);
            let slot = self
                .map
                .get_mut(idx)
                .ok_or_else(|| ImageError::unsupported(self.path, "write beyond disk size"))?;
            if *slot == UNALLOCATED {
                *slot = self.allocated;
                self.allocated += 1;
            }
            let at = self.offset_data + *slot as u64 * BLOCK + within;
            util::write_all_at(self.file, self.path, &data[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }
}

/// Write `source` as a dynamic VDI with 1 MiB blocks.
fn write(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = util::round_up(source.virtual_size(), 512)
        .ok_or_else(|| ImageError::unsupported(output, "virtual size too large for VDI"))?;
    let blocks = size.div_ceil(BLOCK);
    if blocks > MAX_BLOCKS {
        return Err(ImageError::unsupported(
            output,
            format!("virtual size {size} is too large for VDI"),
        ));
    }
    let offset_data = util::round_up(BMAP_OFFSET + blocks * 4, BLOCK).unwrap_or(BLOCK);
    let out = TempOut::create(output)?;
    let file = out.file()?;
    let mut sink = VdiSink {
        file,
        path: output,
        map: vec![UNALLOCATED; blocks as usize],
        allocated: 0,
        offset_data,
    };
    let src_size = source.virtual_size();
    copy(
        source,
        src_size,
        &mut sink,
        opts.fsync.then_some(file),
        progress,
    )?;
    let allocated = sink.allocated as u64;
    let map: Vec<u8> = sink.map.iter().flat_map(|e| e.to_le_bytes()).collect();
    util::write_all_at(file, output, &map, BMAP_OFFSET)?;
    util::write_all_at(
        file,
        output,
        &header_bytes(size, blocks, allocated, offset_data),
        0,
    )?;
    // Every allocated block is fully inside the file (its unwritten parts are holes).
    util::set_len(file, output, offset_data + allocated * BLOCK)?;
    util::commit(vec![out], opts.fsync)
}

fn parse_header(path: &Path, file: &std::fs::File, len: u64) -> Result<Header, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Vdi, m);
    let mut h = [0u8; 512];
    if len < 512 {
        return Err(bad(format!(
            "file is {len} bytes, too short for a VDI header"
        )));
    }
    util::read_exact_at(file, path, &mut h, 0, Format::Vdi)?;
    if le32(&h, 0x40) != SIGNATURE {
        return Err(bad("signature 0xBEDA107F not found".into()));
    }
    let version = le32(&h, 0x44);
    if version != VERSION {
        return Err(ImageError::unsupported(
            path,
            format!("VDI version {version:#x} (only 1.1 is supported)"),
        ));
    }
    let hdr = Header {
        image_type: le32(&h, 0x4c),
        offset_bmap: le32(&h, 0x154) as u64,
        offset_data: le32(&h, 0x158) as u64,
        disk_size: le64(&h, 0x170),
        block_size: le32(&h, 0x178) as u64,
        block_extra: le32(&h, 0x17c) as u64,
        blocks_in_image: le32(&h, 0x180) as u64,
        blocks_allocated: le32(&h, 0x184) as u64,
    };
    if hdr.image_type != TYPE_DYNAMIC && hdr.image_type != TYPE_FIXED {
        return Err(ImageError::unsupported(
            path,
            format!("VDI image type {} (only dynamic and fixed)", hdr.image_type),
        ));
    }
    if le32(&h, 0x168) != 512 {
        return Err(bad(format!("sector size {} is not 512", le32(&h, 0x168))));
    }
    if h[0x1a8..0x1c8].iter().any(|&b| b != 0) {
        return Err(ImageError::unsupported(
            path,
            "differencing VDI images (with a parent) are not supported",
        ));
    }
    if !hdr.block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&hdr.block_size) {
        return Err(bad(format!("invalid block size {}", hdr.block_size)));
    }
    if hdr.block_extra > (1 << 20) {
        return Err(bad(format!("invalid block extra size {}", hdr.block_extra)));
    }
    if hdr.blocks_in_image > MAX_BLOCKS {
        return Err(bad(format!(
            "block map of {} entries is too large",
            hdr.blocks_in_image
        )));
    }
    if hdr.blocks_in_image * hdr.block_size < hdr.disk_size {
        return Err(bad(format!(
            "{} blocks of {} bytes cannot hold the disk size {}",
            hdr.blocks_in_image, hdr.block_size, hdr.disk_size
        )));
    }
    if hdr.offset_bmap < 0x190 || hdr.offset_bmap + hdr.blocks_in_image * 4 > len {
        return Err(bad(format!(
            "block map ({} entries at offset {}) lies outside the file ({len} bytes)",
            hdr.blocks_in_image, hdr.offset_bmap
        )));
    }
    if hdr.offset_data < hdr.offset_bmap + hdr.blocks_in_image * 4 {
        return Err(bad(format!(
            "data offset {} overlaps the block map",
            hdr.offset_data
        )));
    }
    if hdr.blocks_allocated > hdr.blocks_in_image {
        return Err(bad(format!(
            "{} blocks allocated but the image has only {}",
            hdr.blocks_allocated, hdr.blocks_in_image
        )));
    }
    Ok(hdr)
}

pub(crate) struct VdiReader {
    file: std::fs::File,
    path: PathBuf,
    hdr: Header,
    map: Vec<u32>,
    file_len: u64,
}

impl VdiReader {
    pub(crate) fn open(path: &Path) -> Result<Self, ImageError> {
        let file = util::open_ro(path)?;
        let len = util::file_len(&file, path)?;
        let hdr = parse_header(path, &file, len)?;
        let mut raw = vec![0u8; (hdr.blocks_in_image * 4) as usize];
        util::read_exact_at(&file, path, &mut raw, hdr.offset_bmap, Format::Vdi)?;
        let map: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        // Every allocated block inside the file and used once: copying costs no more than
        // the file's size (see util::Claims).
        let mut claims = util::Claims::new(path, Format::Vdi, len);
        claims.claim(0, 0x190, "header", 0)?;
        claims.claim(hdr.offset_bmap, hdr.blocks_in_image * 4, "block map", 0)?;
        let stride = hdr.block_size + hdr.block_extra;
        for (i, &e) in map.iter().enumerate() {
            if e >= ZEROED {
                continue;
            }
            if e as u64 >= hdr.blocks_allocated {
                return Err(ImageError::corrupt(
                    path,
                    Format::Vdi,
                    format!(
                        "block map entry {i} points to block {e}, but only {} are allocated",
                        hdr.blocks_allocated
                    ),
                ));
            }
            claims.claim(
                hdr.offset_data + e as u64 * stride,
                stride,
                "block",
                i as u64,
            )?;
        }
        claims.finish()?;
        Ok(VdiReader {
            file,
            path: path.to_path_buf(),
            hdr,
            map,
            file_len: len,
        })
    }

    /// How block `idx` is stored: an entry past the map is unallocated.
    fn block_state(&self, idx: usize) -> BlockStatus {
        match self.map.get(idx) {
            Some(&ZEROED) => BlockStatus::Zero,
            Some(&e) if e < ZEROED => BlockStatus::Data,
            _ => BlockStatus::Unallocated,
        }
    }

    /// File offset of block `idx`'s data, if allocated.
    fn block_offset(&self, idx: usize) -> Option<u64> {
        match self.map.get(idx) {
            Some(&e) if e < ZEROED => Some(
                self.hdr.offset_data
                    + e as u64 * (self.hdr.block_size + self.hdr.block_extra)
                    + self.hdr.block_extra,
            ),
            _ => None,
        }
    }
}

impl ImageReader for VdiReader {
    fn format(&self) -> Format {
        Format::Vdi
    }
    fn virtual_size(&self) -> u64 {
        self.hdr.disk_size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.hdr.disk_size)?;
        let bs = self.hdr.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = (pos / bs) as usize;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match self.block_offset(idx) {
                Some(b) => {
                    if b + within + n as u64 > self.file_len {
                        return Err(ImageError::corrupt(
                            &self.path,
                            Format::Vdi,
                            format!("block {idx} lies beyond the end of the file (truncated?)"),
                        ));
                    }
                    util::read_exact_at(&self.file, &self.path, piece, b + within, Format::Vdi)?;
                }
                None => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }
    /// Zeroed blocks are [`BlockStatus::Zero`], unallocated ones
    /// [`BlockStatus::Unallocated`].
    fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        if let Some(past) = util::past_end(offset, self.hdr.disk_size, max_len) {
            return Ok(past);
        }
        let bs = self.hdr.block_size;
        let end = self.hdr.disk_size.min(offset.saturating_add(max_len));
        let first = self.block_state((offset / bs) as usize);
        let mut pos = offset;
        while pos < end {
            let idx = (pos / bs) as usize;
            if self.block_state(idx) != first {
                break;
            }
            pos = (idx as u64 + 1) * bs;
        }
        Ok((first, (pos.min(end) - offset).max(1)))
    }
}

/// Structural check: counts consistent (opening already refused map entries that leave the
/// file or share a block).
fn check(path: &Path) -> Result<Check, ImageError> {
    let r = VdiReader::open(path)?;
    let mut problems = Vec::new();
    let count = r.map.iter().filter(|&&e| e < ZEROED).count() as u64;
    if count != r.hdr.blocks_allocated {
        problems.push(format!(
            "header says {} blocks allocated but the block map uses {count}",
            r.hdr.blocks_allocated
        ));
    }
    let need = r.hdr.offset_data + r.hdr.blocks_allocated * (r.hdr.block_size + r.hdr.block_extra);
    if r.file_len < need {
        problems.push(format!(
            "file is {} bytes but {} allocated blocks need {need}",
            r.file_len, r.hdr.blocks_allocated
        ));
    }
    Ok(Check::single(path, r.hdr.disk_size, problems))
}
