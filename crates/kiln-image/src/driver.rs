//! The format table: one [`Driver`] per [`Format`] knows how to recognise, open, check and
//! write that format, and [`driver`] is the one place that maps a format to its driver.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{iso, qcow2, raw, util, vdi, vhd, vmdk};
use crate::{Format, ImageDevice, ImageError, ImageReader, WriteOptions};

/// Opens an image for reading.
pub(crate) type OpenFn = fn(&Path) -> Result<Box<dyn ImageReader>, ImageError>;
/// Opens an image for reading and writing in place.
pub(crate) type OpenRwFn = fn(&Path) -> Result<Box<dyn ImageDevice>, ImageError>;
/// Writes `source` to `output` in one format, atomically (see [`crate::write_image`]).
pub(crate) type WriteFn = fn(
    source: &mut dyn ImageReader,
    output: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError>;

/// Everything the crate knows about one format: each format module defines one as its
/// `DRIVER`.
pub(crate) struct Driver {
    /// The format this driver handles.
    pub(crate) format: Format,
    /// Whether `head` (up to the file's first 512 bytes) starts with this format's magic
    /// number ([`no_magic`] where it has none). Tried for every driver before any
    /// [`Driver::probe_hint`].
    pub(crate) probe_magic: fn(head: &[u8]) -> bool,
    /// Weaker evidence when no magic number matched: descriptor text, a footer at the end, a
    /// volume descriptor further in ([`no_hint`] where there is none).
    pub(crate) probe_hint: fn(file: &Sniff<'_>) -> Result<bool, ImageError>,
    /// Open `path` for reading.
    pub(crate) open: OpenFn,
    /// Open `path` for reading and writing in place, refusing a layout that is not written in
    /// place with [`ImageError::Unsupported`]. `None` when no layout of the format is (then
    /// [`Driver::open_rw`] refuses every file).
    pub(crate) in_place: Option<OpenRwFn>,
    /// Validate the structure thoroughly (like `qemu-img check`) for [`crate::inspect`]:
    /// opening through the reader first, as [`Driver::open`] does, so `inspect` refuses all
    /// that converting would. Damage that prevents reading is an `Err`; anything else goes
    /// into [`Check::problems`].
    pub(crate) check: fn(path: &Path) -> Result<Check, ImageError>,
    /// Write an image in this format.
    pub(crate) write: WriteFn,
}

impl Driver {
    /// Open `path` for reading and writing in place, or refuse with
    /// [`ImageError::Unsupported`] (always so for a format without [`Driver::in_place`]).
    pub(crate) fn open_rw(&self, path: &Path) -> Result<Box<dyn ImageDevice>, ImageError> {
        match self.in_place {
            Some(open_rw) => open_rw(path),
            None => Err(ImageError::unsupported(
                path,
                format!(
                    "writing {} images in place is not supported (convert to raw or qcow2)",
                    self.format.name().to_ascii_uppercase()
                ),
            )),
        }
    }
}

/// [`Driver::probe_magic`] of a format without a magic number.
pub(crate) fn no_magic(_head: &[u8]) -> bool {
    false
}

/// [`Driver::probe_hint`] of a format without weaker evidence.
pub(crate) fn no_hint(_file: &Sniff<'_>) -> Result<bool, ImageError> {
    Ok(false)
}

/// The driver for `format`.
pub(crate) fn driver(format: Format) -> &'static Driver {
    match format {
        Format::Raw => &raw::DRIVER,
        Format::Qcow2 => &qcow2::DRIVER,
        Format::Vmdk => &vmdk::DRIVER,
        Format::Vhd => &vhd::DRIVER,
        Format::Vdi => &vdi::DRIVER,
        Format::Iso => &iso::DRIVER,
    }
}

/// The order in which content detection asks drivers, within each of the two passes
/// (magic numbers, then hints). Raw is not probed: it is what remains.
///
/// The order only matters for files that match two formats; VDI's signature sits at 0x40, so
/// it is tried before VHD's `conectix` at 0.
const PROBE_ORDER: [Format; 5] = [
    Format::Qcow2,
    Format::Vmdk,
    Format::Vdi,
    Format::Vhd,
    Format::Iso,
];

/// What [`Driver::check`] found out: the format-specific part of [`crate::ImageInfo`].
pub(crate) struct Check {
    /// Size of the virtual disk in bytes.
    pub(crate) virtual_size: u64,
    /// All files making up the image (descriptor first for VMDK).
    pub(crate) files: Vec<PathBuf>,
    /// Human-readable problems found (empty when consistent).
    pub(crate) problems: Vec<String>,
}

impl Check {
    /// A single-file image of `virtual_size` bytes with `problems`.
    pub(crate) fn single(path: &Path, virtual_size: u64, problems: Vec<String>) -> Self {
        Check {
            virtual_size,
            files: vec![path.to_path_buf()],
            problems,
        }
    }
}

/// The file being detected, as [`Driver::probe_hint`] sees it.
pub(crate) struct Sniff<'a> {
    /// The file's path, for error messages.
    pub(crate) path: &'a Path,
    /// The open file.
    pub(crate) file: &'a File,
    /// Its length in bytes.
    pub(crate) len: u64,
    /// Up to its first 512 bytes.
    pub(crate) head: &'a [u8],
}

impl Sniff<'_> {
    /// Whether the file holds `want` at `offset` (false when the file is too short).
    pub(crate) fn has_at(&self, offset: u64, want: &[u8]) -> Result<bool, ImageError> {
        if offset.saturating_add(want.len() as u64) > self.len {
            return Ok(false);
        }
        let mut got = vec![0u8; want.len()];
        util::read_exact_at(self.file, self.path, &mut got, offset, Format::Raw)?;
        Ok(got == want)
    }
}

/// The format of `path` by content alone: the first driver whose magic number matches, else
/// the first whose hint matches, else raw.
pub(crate) fn detect_content(path: &Path) -> Result<Format, ImageError> {
    let file = util::open_ro(path)?;
    let len = util::file_len(&file, path)?;
    let mut head = [0u8; 512];
    let n = util::read_up_to(&file, path, &mut head, 0)?;
    let head = &head[..n];
    let drivers = PROBE_ORDER.map(driver);
    if let Some(d) = drivers.iter().find(|d| (d.probe_magic)(head)) {
        return Ok(d.format);
    }
    let sniff = Sniff {
        path,
        file: &file,
        len,
        head,
    };
    for d in drivers {
        if (d.probe_hint)(&sniff)? {
            return Ok(d.format);
        }
    }
    Ok(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_its_driver() {
        for f in Format::ALL {
            let d = driver(f);
            assert_eq!(d.format, f, "driver for {f} handles {}", d.format);
        }
    }

    #[test]
    fn detection_probes_every_format_but_raw_once() {
        for f in Format::ALL {
            let n = PROBE_ORDER.iter().filter(|&&p| p == f).count();
            assert_eq!(
                n,
                usize::from(f != Format::Raw),
                "{f} in PROBE_ORDER {n} times"
            );
        }
    }

    #[test]
    fn a_format_without_in_place_writing_refuses_it_by_name() {
        let e = driver(Format::Vdi)
            .open_rw(Path::new("disk.vdi"))
            .err()
            .expect("VDI is not written in place");
        assert_eq!(
            e.to_string(),
            "disk.vdi: unsupported: writing VDI images in place is not supported (convert to raw or qcow2)"
        );
    }

    #[test]
    fn raw_is_never_probed() {
        let head = [0u8; 512];
        assert!(!(driver(Format::Raw).probe_magic)(&head));
    }
}
