//! QCOW2: reading and writing through `imago` (sync mode), with our own header validation
//! (before imago sees the file, so corrupt headers cannot cause huge allocations) and our own
//! structural check (L1/L2/refcount walk, like `qemu-img check`).

use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    StorageOpenOptions,
};

use crate::copy::{check_range, copy, Sink};
use crate::util::{self, be32, be64, TempOut};
use crate::{Format, ImageDevice, ImageError, ImageReader};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// Largest virtual size we accept (qemu's limit is 2^61 - 1; keep tables bounded).
const MAX_SIZE: u64 = 1 << 56;

#[derive(Debug)]
pub(crate) struct Header {
    cluster_bits: u32,
    size: u64,
    l1_size: u64,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u64,
    nb_snapshots: u32,
    refcount_order: u32,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> ImageError {
    if e.kind() == std::io::ErrorKind::InvalidData || e.kind() == std::io::ErrorKind::UnexpectedEof
    {
        ImageError::corrupt(path, Format::Qcow2, format!("{what}: {e}"))
    } else {
        ImageError::io(path, what, e)
    }
}

/// Parse and sanity-check the header against the file size.
pub(crate) fn read_header(path: &Path, file: &std::fs::File) -> Result<Header, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Qcow2, m);
    let len = util::file_len(file, path)?;
    if len < 72 {
        return Err(bad(format!("file is {len} bytes, too short for a header")));
    }
    let mut h = [0u8; 104];
    let n = util::read_up_to(file, path, &mut h, 0)?;
    if &h[0..4] != MAGIC {
        return Err(bad("magic QFI\\xfb not found".into()));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(ImageError::unsupported(
            path,
            format!("QCOW2 version {version}"),
        ));
    }
    if version == 3 && n < 104 {
        return Err(bad("file is truncated inside the v3 header".into()));
    }
    let backing = be64(&h, 8);
    let cluster_bits = be32(&h, 20);
    let size = be64(&h, 24);
    let crypt = be32(&h, 32);
    let l1_size = be32(&h, 36) as u64;
    let l1_offset = be64(&h, 40);
    let rt_offset = be64(&h, 48);
    let rt_clusters = be32(&h, 56) as u64;
    let nb_snapshots = be32(&h, 60);
    let (incompat, refcount_order) = if version == 3 {
        (be64(&h, 72), be32(&h, 96))
    } else {
        (0, 4)
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("invalid cluster_bits {cluster_bits}")));
    }
    let cs = 1u64 << cluster_bits;
    if backing != 0 {
        return Err(ImageError::unsupported(
            path,
            "QCOW2 images with a backing file are not supported (use qemu-img convert to flatten)",
        ));
    }
    if crypt != 0 {
        return Err(ImageError::unsupported(path, "encrypted QCOW2 images"));
    }
    if incompat & 0b10 != 0 {
        return Err(bad("image is marked corrupt".into()));
    }
    if incompat & !0b1 != 0 {
        return Err(ImageError::unsupported(
            path,
            format!("QCOW2 incompatible features {incompat:#x} (external data file, zstd, extended L2, …)"),
        ));
    }
    if refcount_order > 6 {
        return Err(bad(format!("invalid refcount_order {refcount_order}")));
    }
    if size > MAX_SIZE {
        return Err(bad(format!("virtual size {size} is too large")));
    }
    let l2_entries = cs / 8;
    let needed_l1 = size.div_ceil(cs * l2_entries);
    if l1_size < needed_l1 {
        return Err(bad(format!(
            "L1 table has {l1_size} entries but {needed_l1} are needed for {size} bytes"
        )));
    }
    // Same limits as QEMU (32 MiB L1, 8 MiB refcount table): bounds what we and imago allocate.
    if l1_size * 8 > 32 << 20 {
        return Err(bad(format!("L1 table of {l1_size} entries is too large")));
    }
    if rt_clusters * cs > 8 << 20 {
        return Err(bad(format!(
            "refcount table of {rt_clusters} clusters is too large"
        )));
    }
    let table_fits = |off: u64, bytes: u64| off.checked_add(bytes).is_some_and(|e| e <= len);
    if l1_offset % cs != 0 || !table_fits(l1_offset, l1_size * 8) {
        return Err(bad(format!(
            "L1 table ({l1_size} entries at {l1_offset}) is misaligned or outside the file ({len} bytes)"
        )));
    }
    if rt_offset % cs != 0 || rt_clusters == 0 || !table_fits(rt_offset, rt_clusters * cs) {
        return Err(bad(format!(
            "refcount table ({rt_clusters} clusters at {rt_offset}) is misaligned or outside the file ({len} bytes)"
        )));
    }
    Ok(Header {
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        nb_snapshots,
        refcount_order,
    })
}

/// QCOW2 reader (and in-place writer) over imago.
pub(crate) struct Qcow2Reader {
    path: PathBuf,
    access: FormatAccess<ImagoFile>,
    size: u64,
    /// File length for read-only opens: every mapped cluster must lie inside it.
    /// `None` when writable (the file grows as clusters are allocated).
    file_len: Option<u64>,
}

impl Qcow2Reader {
    fn open_mode(path: &Path, writable: bool) -> Result<Self, ImageError> {
        let file = if writable {
            util::open_rw(path)?
        } else {
            util::open_ro(path)?
        };
        let hdr = read_header(path, &file)?;
        let file_len = util::file_len(&file, path)?;
        validate_l1(path, &file, &hdr, file_len)?;
        let storage = ImagoFile::from_open_file(
            file,
            StorageOpenOptions::new().write(writable).filename(path),
        )
        .map_err(|e| io_err(path, "cannot open", e))?;
        let mut q = Qcow2::<ImagoFile>::open_image(storage, writable)
            .map_err(|e| io_err(path, "cannot open QCOW2 image", e))?;
        q.open_implicit_dependencies_gated(DenyImplicitOpenGate::default())
            .map_err(|e| io_err(path, "cannot open QCOW2 image", e))?;
        Ok(Qcow2Reader {
            path: path.to_path_buf(),
            access: FormatAccess::new(q),
            size: hdr.size,
            file_len: (!writable).then_some(file_len),
        })
    }

    pub(crate) fn open(path: &Path) -> Result<Self, ImageError> {
        Self::open_mode(path, false)
    }

    pub(crate) fn open_rw(path: &Path) -> Result<Self, ImageError> {
        Self::open_mode(path, true)
    }
}

impl ImageReader for Qcow2Reader {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        // imago reads past the end of a truncated file as zeros; refuse instead.
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (_, len) = self.block_status(pos, end - pos)?;
            pos += len;
        }
        self.access
            .read(buf, offset)
            .map_err(|e| io_err(&self.path, &format!("read at offset {offset}"), e))
    }
    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError> {
        let max = max_len.min(self.size.saturating_sub(offset));
        if max == 0 {
            return Ok((false, 1));
        }
        let (m, len) = self
            .access
            .get_mapping(offset, max)
            .map_err(|e| io_err(&self.path, &format!("mapping lookup at {offset}"), e))?;
        let data = match m {
            Mapping::Zero { .. } | Mapping::Eof { .. } => false,
            Mapping::Raw { offset: host, .. } => {
                if let Some(flen) = self.file_len {
                    if host.saturating_add(len) > flen {
                        return Err(ImageError::corrupt(
                            &self.path,
                            Format::Qcow2,
                            format!(
                                "guest offset {offset} maps to host offset {host}, beyond the end of the file ({flen} bytes; truncated?)"
                            ),
                        ));
                    }
                }
                true
            }
            _ => true,
        };
        Ok((data, len.clamp(1, max)))
    }
}

impl ImageDevice for Qcow2Reader {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        self.access
            .write(buf, offset)
            .map_err(|e| io_err(&self.path, &format!("write at offset {offset}"), e))
    }
    fn flush(&mut self) -> Result<(), ImageError> {
        self.access
            .flush()
            .and_then(|_| self.access.sync())
            .map_err(|e| io_err(&self.path, "flush", e))
    }
}

/// Every L2 table referenced by the L1 table must be aligned and inside the file.
fn validate_l1(
    path: &Path,
    file: &std::fs::File,
    hdr: &Header,
    len: u64,
) -> Result<(), ImageError> {
    let cs = 1u64 << hdr.cluster_bits;
    let mut l1 = vec![0u8; (hdr.l1_size * 8) as usize];
    util::read_exact_at(file, path, &mut l1, hdr.l1_offset, Format::Qcow2)?;
    for (i, e) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        let off = e & OFFSET_MASK;
        if off != 0 && (off % cs != 0 || off.saturating_add(cs) > len) {
            return Err(ImageError::corrupt(
                path,
                Format::Qcow2,
                format!("L1 entry {i}: L2 table offset {off} is misaligned or beyond the end of the file ({len} bytes)"),
            ));
        }
    }
    Ok(())
}

struct QcowSink<'a> {
    access: &'a FormatAccess<ImagoFile>,
    path: &'a Path,
}

impl Sink for QcowSink<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.access
            .write(data, offset)
            .map_err(|e| io_err(self.path, &format!("write at offset {offset}"), e))
    }
}

pub(crate) fn write(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &crate::WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = util::round_up(source.virtual_size(), 512)
        .filter(|s| *s <= MAX_SIZE)
        .ok_or_else(|| ImageError::unsupported(output, "virtual size too large for QCOW2"))?;
    let out = TempOut::create(output)?;
    let f = out
        .file()?
        .try_clone()
        .map_err(|e| ImageError::io(output, "cannot duplicate file handle", e))?;
    let storage =
        ImagoFile::from_open_file(f, StorageOpenOptions::new().write(true).filename(&out.tmp))
            .map_err(|e| io_err(output, "cannot open output", e))?;
    let q = Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .cluster_size(65536)
        .create_open(DenyImplicitOpenGate::default(), |s| {
            Ok(Qcow2::<ImagoFile>::builder(s).write(true))
        })
        .map_err(|e| io_err(output, "cannot create QCOW2 image", e))?;
    let access = FormatAccess::new(q);
    {
        let mut sink = QcowSink {
            access: &access,
            path: output,
        };
        let src_size = source.virtual_size();
        let file = out.file()?;
        copy(
            source,
            src_size,
            &mut sink,
            opts.fsync.then_some(file),
            progress,
        )?;
    }
    access.flush().map_err(|e| io_err(output, "flush", e))?;
    drop(access);
    util::commit(vec![out], opts.fsync)
}

/// Creates `overlay`: an empty QCOW2 v3 image of the base's size whose backing file is `base`
/// (raw, recorded by absolute path). QEMU opens a backing file read-only, so the base is never
/// modified; the guest's writes land in the overlay. Returns the virtual size.
///
/// Written to a temporary name and renamed; not fsynced (an overlay is recreated, never
/// recovered, when its VM is).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<u64, ImageError> {
    let base = base
        .canonicalize()
        .map_err(|e| ImageError::io(base, "cannot resolve the base image", e))?;
    let size = util::file_len(&util::open_ro(&base)?, &base)?;
    if size % 512 != 0 || size > MAX_SIZE {
        return Err(ImageError::unsupported(
            &base,
            format!("a {size}-byte base image cannot back a QCOW2 overlay (a multiple of 512 bytes up to {MAX_SIZE})"),
        ));
    }
    let name = base.to_str().filter(|n| n.len() <= 1023).ok_or_else(|| {
        ImageError::unsupported(
            &base,
            "the base image's path must be UTF-8 and at most 1023 bytes (QCOW2's limit)",
        )
    })?;
    if overlay.exists() {
        // An overlay holds a VM's writes: never replace one.
        return Err(ImageError::io(
            overlay,
            "cannot create the overlay",
            std::io::ErrorKind::AlreadyExists.into(),
        ));
    }
    let out = TempOut::create(overlay)?;
    let f = out
        .file()?
        .try_clone()
        .map_err(|e| ImageError::io(overlay, "cannot duplicate file handle", e))?;
    let storage =
        ImagoFile::from_open_file(f, StorageOpenOptions::new().write(true).filename(&out.tmp))
            .map_err(|e| io_err(overlay, "cannot open output", e))?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .cluster_size(65536)
        .backing(name.to_string(), "raw".to_string())
        .create()
        .map_err(|e| io_err(overlay, "cannot create QCOW2 overlay", e))?;
    util::commit(vec![out], false)?;
    Ok(size)
}

/// Walk all metadata and compare reference counts, like `qemu-img check`.
pub(crate) fn check(path: &Path) -> Result<(u64, Vec<PathBuf>, Vec<String>), ImageError> {
    let file = util::open_ro(path)?;
    let hdr = read_header(path, &file)?;
    let len = util::file_len(&file, path)?;
    let cs = 1u64 << hdr.cluster_bits;
    let nclusters = len.div_ceil(cs) as usize;
    let mut problems: Vec<String> = Vec::new();
    let mut refs = vec![0u32; nclusters];
    let push = |problems: &mut Vec<String>, m: String| {
        if problems.len() < 50 {
            problems.push(m);
        }
    };
    let mut add = |problems: &mut Vec<String>, off: u64, bytes: u64, what: &str| {
        if off % cs != 0 && what != "compressed data" {
            push(
                problems,
                format!("{what} at offset {off} is not cluster aligned"),
            );
        }
        let first = off / cs;
        let last = (off + bytes.max(1) - 1) / cs;
        for c in first..=last {
            match refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    push(
                        problems,
                        format!(
                            "{what} at offset {off} lies beyond the end of the file ({len} bytes)"
                        ),
                    );
                    return;
                }
            }
        }
    };
    add(&mut problems, 0, cs, "header");
    add(&mut problems, hdr.l1_offset, hdr.l1_size * 8, "L1 table");
    add(
        &mut problems,
        hdr.rt_offset,
        hdr.rt_clusters * cs,
        "refcount table",
    );

    let mut l1 = vec![0u8; (hdr.l1_size * 8) as usize];
    util::read_exact_at(&file, path, &mut l1, hdr.l1_offset, Format::Qcow2)?;
    let mut l2 = vec![0u8; cs as usize];
    let csize_shift = 62 - (hdr.cluster_bits - 8);
    for (i, e) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if l2_off % cs != 0 || l2_off + cs > len {
            push(&mut problems, format!("L1 entry {i}: L2 table offset {l2_off} is misaligned or beyond the end of the file"));
            continue;
        }
        add(&mut problems, l2_off, cs, "L2 table");
        util::read_exact_at(&file, path, &mut l2, l2_off, Format::Qcow2)?;
        for (j, e) in l2.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            if e & COMPRESSED != 0 {
                let coff = e & ((1u64 << csize_shift) - 1);
                let sectors = ((e >> csize_shift) & ((1u64 << (62 - csize_shift)) - 1)) + 1;
                add(&mut problems, coff & !511, sectors * 512, "compressed data");
                continue;
            }
            let off = e & OFFSET_MASK;
            if off != 0 {
                let guest = ((i as u64 * (cs / 8)) + j as u64) * cs;
                if guest >= hdr.size {
                    push(
                        &mut problems,
                        format!("L2 entry maps guest offset {guest} beyond the virtual size"),
                    );
                }
                add(&mut problems, off, cs, "data cluster");
            }
        }
    }

    // Refcount blocks and stored refcounts.
    let bits = 1u64 << hdr.refcount_order;
    let per_block = cs * 8 / bits;
    let mut rt = vec![0u8; (hdr.rt_clusters * cs) as usize];
    util::read_exact_at(&file, path, &mut rt, hdr.rt_offset, Format::Qcow2)?;
    let mut stored = vec![0u64; nclusters];
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        let off = e & !511;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off + cs > len {
            push(&mut problems, format!("refcount table entry {i}: block offset {off} is misaligned or beyond the end of the file"));
            continue;
        }
        add(&mut problems, off, cs, "refcount block");
        util::read_exact_at(&file, path, &mut block, off, Format::Qcow2)?;
        for k in 0..per_block {
            let cluster = i as u64 * per_block + k;
            let v = read_refcount(&block, k, bits);
            match stored.get_mut(cluster as usize) {
                Some(s) => *s = v,
                None if v != 0 => push(
                    &mut problems,
                    format!("refcount for cluster {cluster} beyond the end of the file is {v}"),
                ),
                None => {}
            }
        }
    }
    if hdr.nb_snapshots == 0 {
        let mut leaked = 0u64;
        for (c, (&want, &have)) in refs.iter().zip(stored.iter()).enumerate() {
            let want = want as u64;
            if have < want {
                push(
                    &mut problems,
                    format!(
                        "cluster {c} (offset {}) is in use but its refcount is {have}",
                        c as u64 * cs
                    ),
                );
            } else if have > want {
                leaked += 1;
            }
        }
        if leaked > 0 {
            push(
                &mut problems,
                format!("{leaked} leaked clusters (refcount set but unused)"),
            );
        }
    }
    Ok((hdr.size, vec![path.to_path_buf()], problems))
}

fn read_refcount(block: &[u8], idx: u64, bits: u64) -> u64 {
    match bits {
        64 => be64(block, idx as usize * 8),
        32 => be32(block, idx as usize * 4) as u64,
        16 => util::be16(block, idx as usize * 2) as u64,
        8 => block[idx as usize] as u64,
        _ => {
            let bit = idx * bits;
            let byte = block[(bit / 8) as usize];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
    }
}
