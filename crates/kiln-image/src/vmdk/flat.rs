//! VMDK flat extents: byte ranges of plain files, opened from a descriptor's extent line;
//! monolithicFlat images written and opened for in-place writing.

use std::path::{Path, PathBuf};

use super::descriptor::{self, resolve_extent, ExtentLine};
use super::{Extent, VmdkReader};
use crate::raw::{write_plain, FileRange, RawDevice};
use crate::util::{self, TempOut};
use crate::{Format, ImageError, ImageReader, WriteOptions};

/// Open the `FLAT`/`VMFS` extent of `line` in `descriptor`, `bytes` long; its file must hold
/// all of them.
pub(super) fn open_listed(
    descriptor: &Path,
    line: &ExtentLine,
    bytes: u64,
) -> Result<FileRange, ImageError> {
    let (p, f) = resolve_extent(descriptor, &line.file)?;
    let flen = util::file_len(&f, &p)?;
    let base = line
        .offset
        .checked_mul(512)
        .ok_or_else(|| ImageError::corrupt(descriptor, Format::Vmdk, "extent offset overflows"))?;
    if base.checked_add(bytes).is_none_or(|end| end > flen) {
        return Err(ImageError::corrupt(
            &p,
            Format::Vmdk,
            format!(
                "flat extent is {flen} bytes but the descriptor {} needs {bytes} bytes at offset {base}",
                descriptor.display()
            ),
        ));
    }
    Ok(FileRange {
        file: f,
        path: p,
        base,
        size: bytes,
        format: Format::Vmdk,
    })
}

/// The `-flat` extent name for a descriptor path: `disk.vmdk` → `disk-flat.vmdk`.
fn flat_name(output: &Path) -> Result<PathBuf, ImageError> {
    let stem = output
        .file_stem()
        .ok_or_else(|| ImageError::unsupported(output, "output path has no file name"))?;
    Ok(output.with_file_name(format!("{}-flat.vmdk", stem.to_string_lossy())))
}

/// Write a monolithicFlat VMDK: `output` (descriptor) and `NAME-flat.vmdk` (sparse raw data).
pub(super) fn write_flat(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
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
        descriptor::flat_text(size, &flat_file_name).as_bytes(),
        0,
    )?;
    // Extent first, descriptor last: a visible descriptor always has its data.
    util::commit(vec![data, desc], opts.fsync)
}

/// Open a monolithicFlat VMDK (single FLAT extent) for in-place writing.
pub(super) fn open_flat_rw(path: &Path) -> Result<RawDevice, ImageError> {
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
