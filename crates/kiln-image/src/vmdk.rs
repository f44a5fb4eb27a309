//! VMDK: monolithicFlat read/write (NAME.vmdk text descriptor + NAME-flat.vmdk extent),
//! hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse) read, ZERO extents read.
//!
//! Extent files named by a descriptor must resolve (after following symlinks) inside the
//! descriptor's own directory; anything else is refused so a crafted descriptor cannot make
//! kiln read arbitrary host files.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::copy::check_range;
use crate::raw::{write_plain, FileRange, RawDevice};
use crate::util::{self, le16, le32, le64, TempOut};
use crate::{Format, ImageError, ImageReader};

const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// Descriptors are small text files; refuse to parse anything bigger.
const MAX_DESCRIPTOR: u64 = 64 << 10;
const GD_AT_END: u64 = u64::MAX;
/// Largest grain directory we load (bounds memory for crafted headers).
const MAX_TABLE: u64 = 64 << 20;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;

/// Does this look like the start of a VMDK text descriptor?
pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start();
    t.starts_with("# Disk DescriptorFile") || (t.starts_with('#') && text.contains("createType="))
}

enum Extent {
    Flat(FileRange),
    Zero { size: u64 },
    Sparse(Box<SparseExtent>),
}

impl Extent {
    fn size(&self) -> u64 {
        match self {
            Extent::Flat(r) => r.size,
            Extent::Zero { size } => *size,
            Extent::Sparse(s) => s.size,
        }
    }
}

struct SparseExtent {
    file: File,
    path: PathBuf,
    size: u64,
    grain: u64,        // bytes
    gt_entries: u64,   // entries per grain table
    gd: Vec<u32>,      // sector offsets of grain tables
    zero_grains: bool, // GTE value 1 means "zero grain"
    file_len: u64,
    cached_gt: Option<(usize, Vec<u32>)>,
    /// streamOptimized: grains are deflate-compressed behind a 12-byte marker.
    compressed: bool,
    cached_grain: Option<(u64, Vec<u8>)>,
}

impl SparseExtent {
    fn open(path: &Path, file: File) -> Result<Self, ImageError> {
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
        if le64(&h, 56) == GD_AT_END {
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
        Ok(SparseExtent {
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
        })
    }

    fn load_gt(&mut self, gt_idx: usize) -> Result<Option<&[u32]>, ImageError> {
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

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
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
    fn inflate_grain(&self, at: u64) -> Result<Vec<u8>, ImageError> {
        let bad = |m: String| ImageError::corrupt(&self.path, Format::Vmdk, m);
        let mut marker = [0u8; 12];
        util::read_exact_at(&self.file, &self.path, &mut marker, at, Format::Vmdk)?;
        let size = le32(&marker, 8) as u64;
        // Deflate never expands much; anything bigger is corrupt (and bounds the allocation).
        if size == 0 || size > self.grain * 2 + 4096 || at + 12 + size > self.file_len {
            return Err(bad(format!(
                "compressed grain at offset {at} has invalid size {size}"
            )));
        }
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

    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError> {
        let end = self.size.min(offset.saturating_add(max_len));
        let first = self.grain_offset(offset)?.is_some();
        let gt_span = self.grain * self.gt_entries;
        let mut pos = offset;
        while pos < end {
            // A missing grain table covers gt_span bytes of zeros: skip it in one step, so
            // huge empty disks don't cost one iteration per grain.
            let gt_idx = (pos / gt_span) as usize;
            if matches!(self.gd.get(gt_idx), Some(&0) | None) {
                if first {
                    break;
                }
                pos = (gt_idx as u64 + 1) * gt_span;
                continue;
            }
            if self.grain_offset(pos)?.is_some() != first {
                break;
            }
            pos = (pos / self.grain + 1) * self.grain;
        }
        Ok((first, (pos.min(end) - offset).max(1)))
    }
}

/// Reader over the extents of a VMDK.
pub(crate) struct VmdkReader {
    path: PathBuf,
    extents: Vec<Extent>,
    size: u64,
    files: Vec<PathBuf>,
    create_type: String,
}

struct ExtentLine {
    sectors: u64,
    kind: String,
    file: String,
    offset: u64,
}

struct Descriptor {
    create_type: String,
    extents: Vec<ExtentLine>,
}

fn parse_descriptor(path: &Path, text: &str) -> Result<Descriptor, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Vmdk, m);
    let mut create_type = String::new();
    let mut extents = Vec::new();
    for (no, line) in text.lines().enumerate() {
        // qemu pads descriptors with NULs; treat them as whitespace.
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let k = k.trim();
            let v = v.trim().trim_matches('"');
            match k {
                "createType" => create_type = v.to_string(),
                "parentCID" if !v.eq_ignore_ascii_case("ffffffff") => {
                    return Err(ImageError::unsupported(
                        path,
                        "VMDK with a parent (differencing disk) is not supported",
                    ))
                }
                "parentFileNameHint" => {
                    return Err(ImageError::unsupported(
                        path,
                        "VMDK with a parent (differencing disk) is not supported",
                    ))
                }
                _ => {}
            }
            continue;
        }
        // ACCESS SECTORS TYPE ["FILE" [OFFSET]]
        let (before, rest) = match line.split_once('"') {
            Some((b, r)) => (b, Some(r)),
            None => (line, None),
        };
        let words: Vec<&str> = before.split_whitespace().collect();
        if words.len() != 3 || !["RW", "RDONLY", "NOACCESS"].contains(&words[0]) {
            return Err(bad(format!("line {}: cannot parse \"{line}\"", no + 1)));
        }
        let sectors: u64 = words[1]
            .parse()
            .map_err(|_| bad(format!("line {}: bad extent size \"{}\"", no + 1, words[1])))?;
        let kind = words[2].to_string();
        let (file, offset) = match rest {
            Some(r) => {
                let (name, tail) = r
                    .split_once('"')
                    .ok_or_else(|| bad(format!("line {}: unterminated file name", no + 1)))?;
                let tail = tail.trim();
                let offset = if tail.is_empty() {
                    0
                } else {
                    tail.parse().map_err(|_| {
                        bad(format!("line {}: bad extent offset \"{tail}\"", no + 1))
                    })?
                };
                (name.to_string(), offset)
            }
            None => (String::new(), 0),
        };
        if file.is_empty() && kind != "ZERO" {
            return Err(bad(format!("line {}: {kind} extent names no file", no + 1)));
        }
        extents.push(ExtentLine {
            sectors,
            kind,
            file,
            offset,
        });
        if extents.len() > 4096 {
            return Err(bad("too many extents".into()));
        }
    }
    if extents.is_empty() {
        return Err(bad("descriptor lists no extents".into()));
    }
    Ok(Descriptor {
        create_type,
        extents,
    })
}

/// Resolve an extent file name relative to the descriptor, refusing anything that escapes the
/// descriptor's directory (absolute paths, `..`, symlinks pointing elsewhere).
fn resolve_extent(descriptor: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let outside = || ImageError::ExtentOutsideDirectory {
        path: descriptor.to_path_buf(),
        extent: name.to_string(),
    };
    let rel = Path::new(name);
    if name.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(outside());
    }
    let dir = util::parent_dir(descriptor);
    let candidate = dir.join(rel);
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| ImageError::io(&dir, "cannot resolve directory", e))?;
    let canon = candidate.canonicalize().map_err(|e| {
        ImageError::io(
            &candidate,
            format!(
                "cannot open VMDK extent referenced by {}",
                descriptor.display()
            ),
            e,
        )
    })?;
    if !canon.starts_with(&canon_dir) {
        return Err(outside());
    }
    // Opening a FIFO or device would block or read endlessly; extents are regular files.
    let meta =
        std::fs::metadata(&canon).map_err(|e| ImageError::io(&candidate, "cannot stat", e))?;
    if !meta.is_file() {
        return Err(ImageError::corrupt(
            descriptor,
            Format::Vmdk,
            format!("extent \"{name}\" is not a regular file"),
        ));
    }
    Ok(candidate)
}

impl VmdkReader {
    pub(crate) fn open(path: &Path) -> Result<Self, ImageError> {
        let file = util::open_ro(path)?;
        let len = util::file_len(&file, path)?;
        let mut magic = [0u8; 4];
        let n = util::read_up_to(&file, path, &mut magic, 0)?;
        if n == 4 && &magic == SPARSE_MAGIC {
            // monolithicSparse: the file is its own (single) extent.
            let sparse = SparseExtent::open(path, file)?;
            let size = sparse.size;
            return Ok(VmdkReader {
                path: path.to_path_buf(),
                extents: vec![Extent::Sparse(Box::new(sparse))],
                size,
                files: vec![path.to_path_buf()],
                create_type: "monolithicSparse".into(),
            });
        }
        if len > MAX_DESCRIPTOR {
            return Err(ImageError::corrupt(
                path,
                Format::Vmdk,
                format!(
                    "descriptor is {len} bytes; a VMDK text descriptor is at most {MAX_DESCRIPTOR}"
                ),
            ));
        }
        let mut raw = vec![0u8; len as usize];
        util::read_exact_at(&file, path, &mut raw, 0, Format::Vmdk)?;
        let text = String::from_utf8(raw).map_err(|_| {
            ImageError::corrupt(path, Format::Vmdk, "descriptor is not valid UTF-8 text")
        })?;
        let desc = parse_descriptor(path, &text)?;
        let mut extents = Vec::new();
        let mut files = vec![path.to_path_buf()];
        let mut size = 0u64;
        for e in &desc.extents {
            let bytes = e
                .sectors
                .checked_mul(512)
                .ok_or_else(|| ImageError::corrupt(path, Format::Vmdk, "extent size overflows"))?;
            let ext = match e.kind.as_str() {
                "ZERO" => Extent::Zero { size: bytes },
                "FLAT" | "VMFS" => {
                    let p = resolve_extent(path, &e.file)?;
                    let f = util::open_ro(&p)?;
                    let flen = util::file_len(&f, &p)?;
                    let base = e.offset.checked_mul(512).ok_or_else(|| {
                        ImageError::corrupt(path, Format::Vmdk, "extent offset overflows")
                    })?;
                    if base.checked_add(bytes).is_none_or(|end| end > flen) {
                        return Err(ImageError::corrupt(
                            &p,
                            Format::Vmdk,
                            format!(
                                "flat extent is {flen} bytes but the descriptor {} needs {bytes} bytes at offset {base}",
                                path.display()
                            ),
                        ));
                    }
                    files.push(p.clone());
                    Extent::Flat(FileRange {
                        file: f,
                        path: p,
                        base,
                        size: bytes,
                        format: Format::Vmdk,
                    })
                }
                "SPARSE" => {
                    let p = resolve_extent(path, &e.file)?;
                    let f = util::open_ro(&p)?;
                    let s = SparseExtent::open(&p, f)?;
                    if s.size < bytes {
                        return Err(ImageError::corrupt(
                            &p,
                            Format::Vmdk,
                            format!("sparse extent capacity {} is smaller than the descriptor's {bytes}", s.size),
                        ));
                    }
                    files.push(p);
                    let mut s = s;
                    s.size = bytes;
                    Extent::Sparse(Box::new(s))
                }
                other => {
                    return Err(ImageError::unsupported(
                        path,
                        format!("VMDK extent type {other}"),
                    ))
                }
            };
            size = size
                .checked_add(ext.size())
                .ok_or_else(|| ImageError::corrupt(path, Format::Vmdk, "total size overflows"))?;
            extents.push(ext);
        }
        Ok(VmdkReader {
            path: path.to_path_buf(),
            extents,
            size,
            files,
            create_type: desc.create_type,
        })
    }

    /// Find the extent holding `offset`: (index, offset within extent).
    fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let mut start = 0u64;
        for (i, e) in self.extents.iter().enumerate() {
            if offset < start + e.size() {
                return Some((i, offset - start));
            }
            start += e.size();
        }
        None
    }
}

impl ImageReader for VmdkReader {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some((i, within)) = self.locate(pos) else {
                break;
            };
            let e = &mut self.extents[i];
            let n = ((e.size() - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match e {
                Extent::Flat(r) => r.read_at(piece, within)?,
                Extent::Zero { .. } => piece.fill(0),
                Extent::Sparse(s) => s.read_at(piece, within)?,
            }
            done += n;
        }
        Ok(())
    }
    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError> {
        let Some((i, within)) = self.locate(offset) else {
            return Ok((false, max_len.max(1)));
        };
        let e = &mut self.extents[i];
        let max = max_len.min(e.size() - within);
        Ok(match e {
            Extent::Flat(r) => r.block_status(within, max),
            Extent::Zero { .. } => (false, max.max(1)),
            Extent::Sparse(s) => s.block_status(within, max)?,
        })
    }
}

/// The `-flat` extent name for a descriptor path: `disk.vmdk` → `disk-flat.vmdk`.
pub(crate) fn flat_name(output: &Path) -> Result<PathBuf, ImageError> {
    let stem = output
        .file_stem()
        .ok_or_else(|| ImageError::unsupported(output, "output path has no file name"))?;
    Ok(output.with_file_name(format!("{}-flat.vmdk", stem.to_string_lossy())))
}

fn descriptor_text(size: u64, extent_name: &str) -> String {
    let sectors = size / 512;
    // Conventional BIOS geometry for IDE disks: 16 heads, 63 sectors.
    let cylinders = (sectors / (16 * 63)).clamp(1, 16383);
    let u = util::pseudo_uuid();
    let cid = u32::from_le_bytes([u[0], u[1], u[2], u[3]]);
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         RW {sectors} FLAT \"{extent_name}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n\
         ddb.uuid.image = \"{uuid}\"\n"
    )
}

/// Write a monolithicFlat VMDK: `output` (descriptor) and `NAME-flat.vmdk` (sparse raw data).
pub(crate) fn write_flat(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &crate::WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = util::round_up(source.virtual_size().max(512), 512)
        .ok_or_else(|| ImageError::unsupported(output, "virtual size too large for VMDK"))?;
    let flat = flat_name(output)?;
    let flat_file_name = flat
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if flat_file_name.contains('"') {
        return Err(ImageError::unsupported(
            output,
            "output file name must not contain '\"'",
        ));
    }
    let data = TempOut::create(&flat)?;
    write_plain(source, data.file()?, &flat, size, opts.fsync, progress)?;
    let desc = TempOut::create(output)?;
    util::write_all_at(
        desc.file()?,
        output,
        descriptor_text(size, &flat_file_name).as_bytes(),
        0,
    )?;
    // Extent first, descriptor last: a visible descriptor always has its data.
    util::commit(vec![data, desc], opts.fsync)
}

/// Open a monolithicFlat VMDK (single FLAT extent) for in-place writing.
pub(crate) fn open_flat_rw(path: &Path) -> Result<RawDevice, ImageError> {
    let r = VmdkReader::open(path)?;
    match r.extents.as_slice() {
        [Extent::Flat(range)] => {
            let file = util::open_rw(&range.path)?;
            Ok(RawDevice {
                range: FileRange {
                    file,
                    path: range.path.clone(),
                    base: range.base,
                    size: range.size,
                    format: Format::Vmdk,
                },
            })
        }
        _ => Err(ImageError::unsupported(
            path,
            format!(
                "writing {} VMDK images in place is not supported (only monolithicFlat)",
                r.create_type
            ),
        )),
    }
}

/// Structural check: descriptor, extent files and sizes, sparse grain tables.
pub(crate) fn check(path: &Path) -> Result<(u64, Vec<PathBuf>, Vec<String>), ImageError> {
    let mut r = VmdkReader::open(path)?;
    let mut problems = Vec::new();
    if r.size % 512 != 0 {
        problems.push(format!("virtual size {} is not a multiple of 512", r.size));
    }
    for e in &mut r.extents {
        if let Extent::Sparse(s) = e {
            let mut owners = std::collections::HashMap::new();
            for gt_idx in 0..s.gd.len() {
                let gt = match s.load_gt(gt_idx) {
                    Ok(Some(gt)) => gt.to_vec(),
                    Ok(None) => continue,
                    Err(err) => {
                        problems.push(err.to_string());
                        continue;
                    }
                };
                for (j, &g) in gt.iter().enumerate() {
                    if g == 0 || (g == 1 && s.zero_grains) {
                        continue;
                    }
                    let off = g as u64 * 512;
                    let need = if s.compressed { 12 } else { s.grain };
                    if off + need > util::round_up(s.file_len, 512).unwrap_or(u64::MAX) {
                        problems.push(format!(
                            "{}: grain {gt_idx}/{j} at offset {off} lies beyond the end of the file",
                            s.path.display()
                        ));
                    }
                    if let Some((a, b)) = owners.insert(g, (gt_idx, j)) {
                        problems.push(format!(
                            "{}: grains {a}/{b} and {gt_idx}/{j} share offset {off}",
                            s.path.display()
                        ));
                    }
                    if problems.len() > 50 {
                        problems.push("too many problems; stopping".into());
                        return Ok((r.size, r.files, problems));
                    }
                }
            }
        }
    }
    Ok((r.size, r.files, problems))
}
