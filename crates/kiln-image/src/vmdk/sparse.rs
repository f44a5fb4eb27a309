//! VMDK hosted sparse extents: the header (or streamOptimized footer), grain directory and
//! grain tables, plain and deflate-compressed grains.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::descriptor::resolve_extent;
use crate::util::{self, le16, le32, le64};
use crate::{BlockStatus, Format, ImageError};

/// Magic at the start of a sparse extent (and of a streamOptimized footer).
pub(super) const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// Grain directory offset meaning "see the footer" (streamOptimized).
const GD_AT_END: u64 = u64::MAX;
/// Largest grain directory we load (bounds memory for crafted headers).
const MAX_TABLE: u64 = 64 << 20;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;

/// A hosted sparse extent file (monolithicSparse, one extent of twoGbMaxExtentSparse, or
/// streamOptimized).
pub(super) struct SparseExtent {
    file: File,
    pub(super) path: PathBuf,
    /// Bytes of virtual disk this extent provides.
    pub(super) size: u64,
    pub(super) grain: u64,        // bytes
    gt_entries: u64,              // entries per grain table
    pub(super) gd: Vec<u32>,      // sector offsets of grain tables
    pub(super) zero_grains: bool, // GTE value 1 means "zero grain"
    pub(super) file_len: u64,
    cached_gt: Option<(usize, Vec<u32>)>,
    /// streamOptimized: grains are deflate-compressed behind a 12-byte marker.
    pub(super) compressed: bool,
    cached_grain: Option<(u64, Vec<u8>)>,
}

impl SparseExtent {
    /// Open the sparse extent `name` listed in `descriptor` with `bytes` of the disk.
    pub(super) fn open_listed(
        descriptor: &Path,
        name: &str,
        bytes: u64,
    ) -> Result<Self, ImageError> {
        let (p, f) = resolve_extent(descriptor, name)?;
        let mut s = SparseExtent::open(&p, f)?;
        if s.size < bytes {
            return Err(ImageError::corrupt(
                &p,
                Format::Vmdk,
                format!(
                    "sparse extent capacity {} is smaller than the descriptor's {bytes}",
                    s.size
                ),
            ));
        }
        s.size = bytes;
        Ok(s)
    }

    /// Parse the header (or a streamOptimized footer) of `file` and load its grain directory.
    pub(super) fn open(path: &Path, file: File) -> Result<Self, ImageError> {
        let bad = |m: String| ImageError::corrupt(path, Format::Vmdk, m);
        let len = util::file_len(&file, path)?;
        let mut h = [0u8; 512];
        if len < 512 {
            return Err(bad(format!(
                "file is {len} bytes, too short for a sparse header"
            )));
        }
        util::read_exact_at(&file, path, &mut h, 0, Format::Vmdk)?;
        if &h[0..4] != SPARSE_MAGIC {
            return Err(bad("sparse extent magic \"KDMV\" not found".into()));
        }
        let stream = le64(&h, 56) == GD_AT_END;
        if stream {
            // streamOptimized: the real header is the footer, 1024 bytes before the end.
            if len < 1536 {
                return Err(bad(
                    "stream-optimized image is too short for its footer".into()
                ));
            }
            util::read_exact_at(&file, path, &mut h, len - 1024, Format::Vmdk)?;
            if &h[0..4] != SPARSE_MAGIC {
                return Err(bad(
                    "stream-optimized footer magic \"KDMV\" not found".into()
                ));
            }
        }
        let version = le32(&h, 4);
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12);
        let grain_sectors = le64(&h, 20);
        let gt_entries = le32(&h, 44) as u64;
        let gd_offset = le64(&h, 56);
        if !(1..=3).contains(&version) {
            return Err(ImageError::unsupported(
                path,
                format!("VMDK sparse extent version {version}"),
            ));
        }
        let compressed = flags & FLAG_COMPRESSED != 0;
        if compressed && le16(&h, 77) != 1 {
            return Err(ImageError::unsupported(
                path,
                format!("VMDK compression algorithm {}", le16(&h, 77)),
            ));
        }
        if gd_offset == GD_AT_END {
            return Err(bad("grain directory offset missing in footer".into()));
        }
        if !grain_sectors.is_power_of_two() || !(1..=2048).contains(&grain_sectors) {
            return Err(bad(format!("invalid grain size {grain_sectors} sectors")));
        }
        if !(1..=8192).contains(&gt_entries) {
            return Err(bad(format!("invalid grain table size {gt_entries}")));
        }
        let size = capacity
            .checked_mul(512)
            .filter(|s| *s <= 1 << 50)
            .ok_or_else(|| bad(format!("capacity {capacity} sectors is too large")))?;
        let grain = grain_sectors * 512;
        let gd_entries = size.div_ceil(grain * gt_entries);
        let gd_bytes = gd_entries * 4;
        if gd_bytes > MAX_TABLE {
            return Err(bad(format!(
                "grain directory of {gd_entries} entries is too large"
            )));
        }
        if gd_offset
            .checked_mul(512)
            .and_then(|o| o.checked_add(gd_bytes))
            .is_none_or(|end| end > len)
        {
            return Err(bad(format!(
                "grain directory ({gd_entries} entries at sector {gd_offset}) lies outside the file ({len} bytes)"
            )));
        }
        let mut raw = vec![0u8; gd_bytes as usize];
        util::read_exact_at(&file, path, &mut raw, gd_offset * 512, Format::Vmdk)?;
        let gd = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let mut claims = util::Claims::new(path, Format::Vmdk, len);
        claims.claim(0, 512, "header", 0)?;
        if stream {
            // streamOptimized: the footer (and the end-of-stream marker after it).
            claims.claim(len - 1024, 1024, "footer", 0)?;
        }
        claims.claim(gd_offset * 512, gd_bytes, "grain directory", 0)?;
        let (desc_sector, desc_sectors) = (le64(&h, 28), le64(&h, 36));
        if desc_sector != 0 || desc_sectors != 0 {
            let start = desc_sector.checked_mul(512);
            let bytes = desc_sectors.checked_mul(512);
            let (Some(start), Some(bytes)) = (start, bytes) else {
                return Err(bad("embedded descriptor offset overflows".into()));
            };
            claims.claim(start, bytes, "embedded descriptor", 0)?;
            embedded_descriptor(path, &file, start, bytes, capacity)?;
        }
        let mut s = SparseExtent {
            file,
            path: path.to_path_buf(),
            size,
            grain,
            gt_entries,
            gd,
            zero_grains: flags & FLAG_ZERO_GRAIN != 0,
            file_len: len,
            cached_gt: None,
            compressed,
            cached_grain: None,
        };
        s.claim_tables(&mut claims)?;
        claims.finish()?;
        Ok(s)
    }

    /// Claim every grain table and every allocated grain (see [`util::Claims`]): none may lie
    /// outside the file or overlap anything else, so walking the tables and copying the grains
    /// costs no more than the file's size. A compressed grain claims its marker and stream.
    fn claim_tables(&mut self, claims: &mut util::Claims<'_>) -> Result<(), ImageError> {
        let gt_bytes = self.gt_entries * 4;
        for (i, &sector) in self.gd.iter().enumerate() {
            if sector != 0 {
                claims.claim(sector as u64 * 512, gt_bytes, "grain table", i as u64)?;
            }
        }
        claims.check()?;
        let mut marker = [0u8; 12];
        self.for_each_grain(|s, gt_idx, j, off| {
            let index = gt_idx as u64 * s.gt_entries + j as u64;
            let bytes = if s.compressed {
                if off + 12 > s.file_len {
                    claims.claim(off, 12, "compressed grain", index)?;
                }
                util::read_exact_at(&s.file, &s.path, &mut marker, off, Format::Vmdk)?;
                12 + s.compressed_size(off, &marker)?
            } else {
                s.grain
            };
            claims.claim(off, bytes, "grain", index)?;
            Ok(true)
        })
    }

    /// Calls `f(self, table, entry, file offset)` for every allocated grain, table by table,
    /// until it returns `false`: the one walk of the grain tables that opening and checking
    /// share (unallocated and zero grains are skipped).
    pub(super) fn for_each_grain(
        &mut self,
        mut f: impl FnMut(&Self, usize, usize, u64) -> Result<bool, ImageError>,
    ) -> Result<(), ImageError> {
        for gt_idx in 0..self.gd.len() {
            let Some(gt) = self.load_gt(gt_idx)? else {
                continue;
            };
            let gt = gt.to_vec();
            for (j, &g) in gt.iter().enumerate() {
                if g == 0 || (g == 1 && self.zero_grains) {
                    continue;
                }
                if !f(self, gt_idx, j, g as u64 * 512)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The stream size a compressed grain's `marker` (at file offset `at`) gives, checked.
    fn compressed_size(&self, at: u64, marker: &[u8; 12]) -> Result<u64, ImageError> {
        let size = le32(marker, 8) as u64;
        // Deflate never expands much; anything bigger is corrupt (and bounds the allocation).
        if size == 0 || size > self.grain * 2 + 4096 || at + 12 + size > self.file_len {
            return Err(ImageError::corrupt(
                &self.path,
                Format::Vmdk,
                format!("compressed grain at offset {at} has invalid size {size}"),
            ));
        }
        Ok(size)
    }

    /// The extent's open file.
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Grain table `gt_idx` (cached), or None when the directory has none for it.
    pub(super) fn load_gt(&mut self, gt_idx: usize) -> Result<Option<&[u32]>, ImageError> {
        let sector = match self.gd.get(gt_idx) {
            Some(&0) | None => return Ok(None),
            Some(&s) => s as u64,
        };
        if self.cached_gt.as_ref().map(|c| c.0) != Some(gt_idx) {
            let bytes = self.gt_entries * 4;
            if sector * 512 + bytes > self.file_len {
                return Err(ImageError::corrupt(
                    &self.path,
                    Format::Vmdk,
                    format!("grain table {gt_idx} at sector {sector} lies outside the file"),
                ));
            }
            let mut raw = vec![0u8; bytes as usize];
            util::read_exact_at(&self.file, &self.path, &mut raw, sector * 512, Format::Vmdk)?;
            self.cached_gt = Some((gt_idx, raw.chunks_exact(4).map(|c| le32(c, 0)).collect()));
        }
        Ok(self.cached_gt.as_ref().map(|c| c.1.as_slice()))
    }

    /// Grain-table entry for the grain holding `offset`: None = unallocated/zero.
    fn grain_offset(&mut self, offset: u64) -> Result<Option<u64>, ImageError> {
        let grain_idx = offset / self.grain;
        let gt_idx = (grain_idx / self.gt_entries) as usize;
        let entry = (grain_idx % self.gt_entries) as usize;
        let zero_grains = self.zero_grains;
        let Some(gt) = self.load_gt(gt_idx)? else {
            return Ok(None);
        };
        Ok(match gt.get(entry).copied().unwrap_or(0) {
            0 => None,
            1 if zero_grains => None,
            s => Some(s as u64 * 512),
        })
    }

    pub(super) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % self.grain;
            let n = ((self.grain - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match self.grain_offset(pos)? {
                Some(g) if self.compressed => {
                    let grain_idx = pos / self.grain;
                    if self.cached_grain.as_ref().map(|c| c.0) != Some(grain_idx) {
                        let data = self.inflate_grain(g)?;
                        self.cached_grain = Some((grain_idx, data));
                    }
                    if let Some((_, data)) = &self.cached_grain {
                        piece.copy_from_slice(&data[within as usize..within as usize + n]);
                    }
                }
                Some(g) => {
                    util::read_exact_at(&self.file, &self.path, piece, g + within, Format::Vmdk)?
                }
                None => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Read and decompress the grain whose marker is at file offset `at` (a full grain, zero
    /// padded when the compressed stream is shorter).
    pub(super) fn inflate_grain(&self, at: u64) -> Result<Vec<u8>, ImageError> {
        let bad = |m: String| ImageError::corrupt(&self.path, Format::Vmdk, m);
        let mut marker = [0u8; 12];
        util::read_exact_at(&self.file, &self.path, &mut marker, at, Format::Vmdk)?;
        let size = self.compressed_size(at, &marker)?;
        let mut comp = vec![0u8; size as usize];
        util::read_exact_at(&self.file, &self.path, &mut comp, at + 12, Format::Vmdk)?;
        let mut data =
            miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&comp, self.grain as usize)
                .map_err(|e| {
                    bad(format!(
                        "compressed grain at offset {at} does not decompress: {:?}",
                        e.status
                    ))
                })?;
        data.resize(self.grain as usize, 0);
        Ok(data)
    }

    /// How the grain holding `offset` is stored: GTE 0 or no grain table is unallocated, GTE 1
    /// with the zero-grain flag is zero.
    fn grain_status(&mut self, offset: u64) -> Result<BlockStatus, ImageError> {
        let grain_idx = offset / self.grain;
        let gt_idx = (grain_idx / self.gt_entries) as usize;
        let entry = (grain_idx % self.gt_entries) as usize;
        let zero_grains = self.zero_grains;
        let Some(gt) = self.load_gt(gt_idx)? else {
            return Ok(BlockStatus::Unallocated);
        };
        Ok(match gt.get(entry).copied().unwrap_or(0) {
            0 => BlockStatus::Unallocated,
            1 if zero_grains => BlockStatus::Zero,
            _ => BlockStatus::Data,
        })
    }

    /// Runs of grains with one status; unallocated grain tables are skipped whole.
    pub(super) fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        let end = self.size.min(offset.saturating_add(max_len));
        let first = self.grain_status(offset)?;
        let gt_span = self.grain * self.gt_entries;
        let mut pos = offset;
        while pos < end {
            // A missing grain table covers gt_span unallocated bytes: skip it in one step, so
            // huge empty disks don't cost one iteration per grain.
            let gt_idx = (pos / gt_span) as usize;
            if matches!(self.gd.get(gt_idx), Some(&0) | None) {
                if first != BlockStatus::Unallocated {
                    break;
                }
                pos = (gt_idx as u64 + 1) * gt_span;
                continue;
            }
            if self.grain_status(pos)? != first {
                break;
            }
            pos = (pos / self.grain + 1) * self.grain;
        }
        Ok((first, (pos.min(end) - offset).max(1)))
    }
}

/// The descriptor embedded in a monolithicSparse file (`bytes` at `start`): parsed strictly,
/// like a separate one, and it must describe exactly this file: one `SPARSE` extent of the
/// header's `capacity` sectors (a parent or any other extent is refused).
fn embedded_descriptor(
    path: &Path,
    file: &File,
    start: u64,
    bytes: u64,
    capacity: u64,
) -> Result<(), ImageError> {
    let Some(desc) = super::descriptor::read_at(path, file, start, bytes)? else {
        // qemu-img leaves the descriptor area of each extent of a split image empty.
        return Ok(());
    };
    match desc.extents.as_slice() {
        [e] if e.kind == "SPARSE" && e.sectors == capacity => Ok(()),
        _ => Err(ImageError::corrupt(
            path,
            Format::Vmdk,
            format!(
                "the embedded descriptor does not describe this file (one SPARSE extent of {capacity} sectors)"
            ),
        )),
    }
}
