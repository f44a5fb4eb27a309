//! kiln-image: streaming, sparse-aware disk-image formats for kiln.
//!
//! Supported formats:
//! - raw / img (read + write, holes via `SEEK_DATA`/`SEEK_HOLE`);
//! - QCOW2 v3 (read + write through the `imago` crate; structural checks by hand);
//! - VMDK monolithicFlat (read + write), monolithicSparse / hosted sparse extents (read);
//! - VHD fixed (read + write, Azure-compatible 1 MiB-aligned size), VHD dynamic (read);
//! - VDI dynamic (read + write), VDI fixed (read);
//! - ISO 9660 + El Torito bootable CD (write via `hadris-iso`; read as raw).
//!
//! Nothing ever holds a whole image in memory: data is copied in 2 MiB chunks, zero and
//! unallocated regions are skipped and become holes or unallocated blocks in the output.

use std::fmt;
use std::path::{Path, PathBuf};

mod copy;
mod driver;
mod iso;
mod qcow2;
mod raw;
mod util;
mod vdi;
mod vhd;
mod vmdk;

pub use iso::{write_boot_iso, BOOT_CATALOG_PATH, BOOT_IMAGE_PATH};
pub use qcow2::{create_overlay, validate_overlay};

/// A disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Plain disk content, byte for byte.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk (descriptor + flat extent, or hosted sparse).
    Vmdk,
    /// Microsoft Virtual Hard Disk (fixed or dynamic).
    Vhd,
    /// VirtualBox disk image.
    Vdi,
    /// ISO 9660 CD image (read as raw).
    Iso,
}

impl Format {
    /// All formats, in a stable order.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vdi,
        Format::Iso,
    ];

    /// Guess the format from the file extension (`.raw .img .bin` → raw, `.qcow2`, `.vmdk`,
    /// `.vhd`, `.vdi`, `.iso`), case-insensitively.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "raw" | "img" | "bin" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vhd" => Format::Vhd,
            "vdi" => Format::Vdi,
            "iso" => Format::Iso,
            _ => return None,
        })
    }

    /// The canonical lowercase name: "raw", "qcow2", "vmdk", "vhd", "vdi", "iso".
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    /// Accepts "raw"|"img", "qcow2", "vmdk", "vhd"|"vpc", "vdi", "iso" (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vhd" | "vpc" => Format::Vhd,
            "vdi" => Format::Vdi,
            "iso" => Format::Iso,
            other => {
                return Err(format!(
                    "unknown image format '{other}' (expected raw, img, qcow2, vmdk, vhd, vpc, vdi or iso)"
                ))
            }
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of this crate; every message names the file and what is wrong, on one line.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation on a file failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file's structure is invalid for its format (corrupt or truncated).
    #[error("{}: invalid {format} image: {msg}", path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// The format it was read as.
        format: Format,
        /// What is wrong.
        msg: String,
    },
    /// The image uses a feature this crate does not support.
    #[error("{}: unsupported: {msg}", path.display())]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is not supported.
        msg: String,
    },
    /// A read or write outside the virtual disk.
    #[error("{}: access of {len} bytes at offset {offset} is beyond the virtual disk size {size}", path.display())]
    OutOfRange {
        /// The image concerned.
        path: PathBuf,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A VMDK descriptor references an extent outside its own directory.
    #[error("{}: VMDK extent \"{extent}\" is outside the image's directory; refusing to open it", path.display())]
    ExtentOutsideDirectory {
        /// The descriptor file.
        path: PathBuf,
        /// The extent file name as written in the descriptor.
        extent: String,
    },
}

impl ImageError {
    pub(crate) fn io(path: &Path, what: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, format: Format, msg: impl Into<String>) -> Self {
        ImageError::Corrupt {
            path: path.to_path_buf(),
            format,
            msg: msg.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        ImageError::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// What [`inspect`] found out about an image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    /// The image path as given.
    pub path: PathBuf,
    /// Detected format.
    pub format: Format,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Bytes actually allocated on disk by all files of the image.
    pub allocated_size: u64,
    /// All files making up the image (descriptor first for VMDK).
    pub files: Vec<PathBuf>,
    /// True when no structural problem was found.
    pub consistent: bool,
    /// Human-readable problems found (empty when consistent).
    pub problems: Vec<String>,
}

/// A readable virtual disk of any supported format (ISO is read as raw).
pub trait ImageReader: Send {
    /// The on-disk format.
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn virtual_size(&self) -> u64;
    /// Fill `buf` from the virtual disk at `offset`; reads past the end are an error.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    /// `(status, len)`: the extent starting at `offset` whose `len` bytes all have one
    /// [`BlockStatus`] (`1 ≤ len ≤ max_len`, except at or past the end of the disk, where it is
    /// `Unallocated` with `len ≥ 1`).
    fn block_status(&mut self, offset: u64, max_len: u64)
        -> Result<(BlockStatus, u64), ImageError>;
}

/// How a range of a virtual disk is stored, as reported by [`ImageReader::block_status`].
///
/// Only `Data` needs reading: the other two read as zeros, and converting skips them (they
/// become holes or unallocated blocks in the output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockStatus {
    /// Stored in the image. May still contain zeros.
    Data,
    /// Known to read as zeros, without data stored: QCOW2 zero clusters, VMDK zero grains and
    /// `ZERO` extents, VDI zeroed blocks, and holes (`SEEK_HOLE`) in plain files (raw, ISO,
    /// VMDK flat extents, fixed VHD), which have no backing file to fall through to.
    Zero,
    /// Not allocated in this image: QCOW2 unallocated clusters, VMDK unallocated grains,
    /// unallocated VHD and VDI blocks, and anything past the end of the disk. Reads as zeros
    /// (this crate refuses images with a backing file).
    Unallocated,
}

impl BlockStatus {
    /// Whether the range has data stored (and so must be read and copied).
    pub fn is_data(self) -> bool {
        self == BlockStatus::Data
    }
}

/// A virtual disk that can also be written in place (for the builtin VMM's int 13h writes).
pub trait ImageDevice: ImageReader {
    /// Write `buf` to the virtual disk at `offset`; writes past the end are an error.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError>;
    /// Make all writes durable.
    fn flush(&mut self) -> Result<(), ImageError>;
}

/// Raw image sizes that PC BIOSes (SeaBIOS, v86, kiln's VMM) boot as floppy disks: 160 KiB to
/// 2.88 MiB.
pub const FLOPPY_SIZES: [u64; 8] = [
    160 << 10,
    180 << 10,
    320 << 10,
    360 << 10,
    720 << 10,
    1200 << 10,
    1440 << 10,
    2880 << 10,
];

/// Whether a raw image of `len` bytes is a floppy disk rather than a hard disk.
pub fn is_floppy_size(len: u64) -> bool {
    FLOPPY_SIZES.contains(&len)
}

/// How a firmware guest sees a boot image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMedia {
    /// A hard disk (BIOS drive 0x80).
    Disk,
    /// A CD-ROM (El Torito).
    Cdrom,
    /// A floppy disk (BIOS drive 0x00).
    Floppy,
}

impl BootMedia {
    /// `disk`, `cdrom` or `floppy`.
    pub fn name(self) -> &'static str {
        match self {
            BootMedia::Disk => "disk",
            BootMedia::Cdrom => "cdrom",
            BootMedia::Floppy => "floppy",
        }
    }
}

/// The one rule every engine (and kiln-web) uses to boot an image: an ISO is a CD, a raw image
/// of a floppy size is a floppy, anything else is a hard disk.
pub fn boot_media(format: Format, virtual_size: u64) -> BootMedia {
    match format {
        Format::Iso => BootMedia::Cdrom,
        Format::Raw if is_floppy_size(virtual_size) => BootMedia::Floppy,
        _ => BootMedia::Disk,
    }
}

/// Detect the format from the file content: magic numbers (QCOW2 `QFI\xfb`, VMDK `KDMV`, VDI
/// signature, VHD `conectix` at start or in the footer at the end), a VMDK descriptor text,
/// ISO `CD001` at 0x8001; anything else is raw.
///
/// A file whose extension names a container format (`.qcow2`, `.vmdk`, `.vhd`, `.vdi`, `.iso`)
/// but whose content has no signature at all is an error, not raw data: that is what a
/// truncated fixed VHD or a VDI with a damaged header looks like, and booting or converting it
/// as raw would silently hand out garbage.
pub fn detect(path: &Path) -> Result<Format, ImageError> {
    let format = driver::detect_content(path)?;
    match Format::from_extension(path) {
        Some(named) if format == Format::Raw && named != Format::Raw => Err(ImageError::corrupt(
            path,
            named,
            format!(
                "the name says {} but the file has no {} signature (truncated or damaged?)",
                named.name(),
                named.name()
            ),
        )),
        _ => Ok(format),
    }
}

/// Open an image of any supported format for reading (format detected from content).
pub fn open(path: &Path) -> Result<Box<dyn ImageReader>, ImageError> {
    (driver::driver(detect(path)?).open)(path)
}

/// Open an image for reading and writing in place. Supported: raw (and ISO as raw), VMDK
/// monolithicFlat, VHD fixed, QCOW2. Other layouts are refused with [`ImageError::Unsupported`].
pub fn open_rw(path: &Path) -> Result<Box<dyn ImageDevice>, ImageError> {
    driver::driver(detect(path)?).open_rw(path)
}

/// Open the image, validate its structure thoroughly (like `qemu-img check`) and report.
///
/// Structural damage that prevents reading at all is an `Err`; inconsistencies that still
/// allow reading (leaked clusters, overlapping blocks, …) are listed in `problems`.
pub fn inspect(path: &Path) -> Result<ImageInfo, ImageError> {
    let format = detect(path)?;
    let driver = driver::driver(format);
    // Every driver's check opens the image through its reader first, which validates every
    // table and mapping (what converting relies on), then looks deeper at an image known to
    // be bounded by its file's size.
    let driver::Check {
        virtual_size,
        files,
        problems,
    } = (driver.check)(path)?;
    let mut allocated_size = 0;
    for f in &files {
        allocated_size += util::allocated_bytes(f)?;
    }
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size,
        allocated_size,
        files,
        consistent: problems.is_empty(),
        problems,
    })
}

/// Options for [`write_image_with`] / [`convert_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// fsync the output file(s) and their directory before returning (default: true).
    /// Without it the rename is still atomic, but a crash shortly afterwards may leave an
    /// empty or partial file under the final name (this is what `qemu-img convert` does).
    pub fsync: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { fsync: true }
    }
}

/// Write the content of `source` to `output` as `format`, atomically: everything is written to
/// temporary name(s) in the output's directory, fsynced, then renamed into place (VMDK: the
/// `-flat` extent first, the descriptor last). On error no output file is left behind.
///
/// `progress(done, total)` is called as bytes of the virtual disk are processed.
pub fn write_image(
    source: &mut dyn ImageReader,
    output: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    write_image_with(source, output, format, &WriteOptions::default(), progress)
}

/// [`write_image`] with explicit [`WriteOptions`].
pub fn write_image_with(
    source: &mut dyn ImageReader,
    output: &Path,
    format: Format,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    (driver::driver(format).write)(source, output, opts, progress)
}

/// [`open`] `input` and [`write_image`] it to `output` as `format`.
pub fn convert(
    input: &Path,
    output: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    convert_with(input, output, format, &WriteOptions::default(), progress)
}

/// [`convert`] with explicit [`WriteOptions`].
pub fn convert_with(
    input: &Path,
    output: &Path,
    format: Format,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let mut src = open(input)?;
    write_image_with(src.as_mut(), output, format, opts, progress)
}
