//! Raw images: the driver, plus the plain "byte range of a file" extent that ISO, VMDK flat
//! extents and fixed VHDs reuse.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::copy::{check_range, copy, Sink};
use crate::driver::{self, Check, Driver};
use crate::util::{self, TempOut};
use crate::{BlockStatus, Format, ImageDevice, ImageError, ImageReader, WriteOptions};

/// Raw: plain disk content. Never probed (it is what detection falls back to).
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Raw,
    probe_magic: driver::no_magic,
    probe_hint: driver::no_hint,
    open: |path| Ok(Box::new(RawDevice::open(path, Format::Raw, false)?)),
    in_place: Some(|path| Ok(Box::new(RawDevice::open(path, Format::Raw, true)?))),
    check: |path| {
        let r = RawDevice::open(path, Format::Raw, false)?;
        Ok(Check::single(path, r.range.size, Vec::new()))
    },
    write,
};

/// A range `[base, base+size)` of a plain file exposed as a disk.
pub(crate) struct FileRange {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) base: u64,
    pub(crate) size: u64,
    /// The format errors name and [`ImageReader::format`] reports; the file must hold the
    /// whole range (callers validate that where the format does not guarantee it).
    pub(crate) format: Format,
}

impl FileRange {
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        util::read_exact_at(&self.file, &self.path, buf, self.base + offset, self.format)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        util::write_all_at(&self.file, &self.path, buf, self.base + offset)
    }

    /// Holes are [`BlockStatus::Zero`], see [`util::file_block_status`].
    pub(crate) fn block_status(&self, offset: u64, max_len: u64) -> (BlockStatus, u64) {
        if let Some(past) = util::past_end(offset, self.size, max_len) {
            return past;
        }
        let end = self.size.min(offset.saturating_add(max_len));
        let (d, l) = util::file_block_status(&self.file, self.base + offset, self.base + end);
        (d, l.max(1))
    }
}

/// A raw image or ISO (read-only or writable), or any plain file range: VMDK flat extents and
/// fixed VHD data reuse it.
pub(crate) struct RawDevice {
    pub(crate) range: FileRange,
}

impl RawDevice {
    /// Opens `path` read-only (for [`crate::open`]) or read-write (for [`crate::open_rw`]);
    /// the whole file is the disk, reported as `format`.
    pub(crate) fn open(path: &Path, format: Format, writable: bool) -> Result<Self, ImageError> {
        let file = if writable {
            util::open_rw(path)?
        } else {
            util::open_ro(path)?
        };
        let size = util::file_len(&file, path)?;
        Ok(RawDevice {
            range: FileRange {
                file,
                path: path.to_path_buf(),
                base: 0,
                size,
                format,
            },
        })
    }
}

impl ImageReader for RawDevice {
    fn format(&self) -> Format {
        self.range.format
    }
    fn virtual_size(&self) -> u64 {
        self.range.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.range.read_at(buf, offset)
    }
    fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        Ok(self.range.block_status(offset, max_len))
    }
}

impl ImageDevice for RawDevice {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.range.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), ImageError> {
        self.range
            .file
            .sync_data()
            .map_err(|e| ImageError::io(&self.range.path, "fsync failed", e))
    }
}

/// Sink writing at `base + offset` into a plain file (holes stay holes).
pub(crate) struct FileSink<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(crate) base: u64,
}

impl Sink for FileSink<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        util::write_all_at(self.file, self.path, data, self.base + offset)
    }
}

/// Copy `source` into `file` as a sparse plain byte range of `size` bytes starting at 0.
/// With `writeback`, the file's writeback starts while copying, so a final fsync is short;
/// without a final fsync that is only extra waiting.
pub(crate) fn write_plain(
    source: &mut dyn ImageReader,
    file: &File,
    path: &Path,
    size: u64,
    writeback: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    // Size first so untouched regions are holes.
    util::set_len(file, path, size)?;
    let src_size = source.virtual_size().min(size);
    let mut sink = FileSink {
        file,
        path,
        base: 0,
    };
    copy(
        source,
        src_size,
        &mut sink,
        writeback.then_some(file),
        progress,
    )
}

/// Write `source` as a sparse raw image.
fn write(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let out = TempOut::create(output)?;
    let size = source.virtual_size();
    write_plain(source, out.file()?, output, size, opts.fsync, progress)?;
    util::commit(vec![out], opts.fsync)
}
