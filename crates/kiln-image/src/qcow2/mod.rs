//! QCOW2: reading and writing through `imago` (sync mode), with our own header validation
//! (before imago sees the file, so corrupt headers cannot cause huge allocations) and our own
//! structural check (L1/L2/refcount walk, like `qemu-img check`).

mod check;
mod header;

use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    StorageOpenOptions,
};

use crate::copy::{check_range, copy, Sink};
use crate::driver::{self, Driver};
use crate::util::{self, TempOut};
use crate::{BlockStatus, Format, ImageDevice, ImageError, ImageReader, WriteOptions};
use header::{read_header, read_header_with, validate_tables};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// Cluster size of the images and overlays written: 64 KiB, as `qemu-img` makes them.
const CLUSTER_SIZE: usize = 64 << 10;
/// Largest virtual size we accept (qemu's limit is 2^61 - 1; keep tables bounded).
const MAX_SIZE: u64 = 1 << 56;

/// QCOW2 v2/v3 without backing file or encryption: read, written in place and written.
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Qcow2,
    // `QFI\xfb` at 0.
    probe_magic: |head| head.starts_with(MAGIC),
    probe_hint: driver::no_hint,
    open: |path| Ok(Box::new(Qcow2Reader::open_mode(path, false)?)),
    in_place: Some(|path| Ok(Box::new(Qcow2Reader::open_mode(path, true)?))),
    check: check::check,
    write,
};

fn io_err(path: &Path, what: &str, e: std::io::Error) -> ImageError {
    if e.kind() == std::io::ErrorKind::InvalidData || e.kind() == std::io::ErrorKind::UnexpectedEof
    {
        ImageError::corrupt(path, Format::Qcow2, format!("{what}: {e}"))
    } else {
        ImageError::io(path, what, e)
    }
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
    /// Validate the header and L1 table, then open through imago.
    fn open_mode(path: &Path, writable: bool) -> Result<Self, ImageError> {
        let file = if writable {
            util::open_rw(path)?
        } else {
            util::open_ro(path)?
        };
        let hdr = read_header(path, &file)?;
        let file_len = util::file_len(&file, path)?;
        validate_tables(path, &file, &hdr, file_len)?;
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
    /// Zero clusters are [`BlockStatus::Zero`], unallocated ones [`BlockStatus::Unallocated`];
    /// compressed clusters are data.
    fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        let max = max_len.min(self.size.saturating_sub(offset));
        if max == 0 {
            return Ok((BlockStatus::Unallocated, 1));
        }
        let (m, len) = self
            .access
            .get_mapping(offset, max)
            .map_err(|e| io_err(&self.path, &format!("mapping lookup at {offset}"), e))?;
        let status = match m {
            Mapping::Zero { explicit: true, .. } => BlockStatus::Zero,
            Mapping::Zero { .. } | Mapping::Eof { .. } => BlockStatus::Unallocated,
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
                BlockStatus::Data
            }
            _ => BlockStatus::Data,
        };
        Ok((status, len.clamp(1, max)))
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

/// The temporary file for a new image `output` (see [`TempOut`]), and imago storage on it.
fn create_output(output: &Path) -> Result<(TempOut, ImagoFile), ImageError> {
    let out = TempOut::create(output)?;
    let storage = ImagoFile::from_open_file(
        out.file_clone()?,
        StorageOpenOptions::new().write(true).filename(&out.tmp),
    )
    .map_err(|e| io_err(output, "cannot open output", e))?;
    Ok((out, storage))
}

/// Write `source` as a new QCOW2 v3 image with [`CLUSTER_SIZE`] clusters.
fn write(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = util::round_up(source.virtual_size(), 512)
        .filter(|s| *s <= MAX_SIZE)
        .ok_or_else(|| ImageError::unsupported(output, "virtual size too large for QCOW2"))?;
    let (out, storage) = create_output(output)?;
    let q = Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .cluster_size(CLUSTER_SIZE)
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
    let (out, storage) = create_output(overlay)?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .cluster_size(CLUSTER_SIZE)
        .backing(name.to_string(), "raw".to_string())
        .create()
        .map_err(|e| io_err(overlay, "cannot create QCOW2 overlay", e))?;
    util::commit(vec![out], false)?;
    Ok(size)
}

/// Checks a QCOW2 overlay (one [`create_overlay`] made, then written by a guest) before an
/// engine is given it: the header and every table are validated like any image's, and only
/// the features kiln writes are allowed. The backing file name it records is not trusted: the
/// engine is handed the base by the path kiln holds.
pub fn validate_overlay(overlay: &Path) -> Result<(), ImageError> {
    let file = util::open_ro(overlay)?;
    let hdr = read_header_with(overlay, &file, true)?;
    let len = util::file_len(&file, overlay)?;
    validate_tables(overlay, &file, &hdr, len)
}
