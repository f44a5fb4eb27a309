//! ISO 9660: read (and written in place) as raw, detected by `CD001`, checked against the
//! volume size; bootable El Torito CDs are written by [`write_boot_iso`] via `hadris-iso`.

use std::fs::File;
use std::path::Path;

use hadris_fs::{Content, Node, Tree};
use hadris_iso::{BootEntry, ElTorito, IsoId, IsoOptions};

use crate::driver::{self, Check, Driver};
use crate::raw::RawDevice;
use crate::util::{self, TempOut};
use crate::{Format, ImageError};

/// ISO 9660: a raw disk whose file must hold the whole volume.
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Iso,
    probe_magic: driver::no_magic,
    // The first volume descriptor's `CD001` at 0x8001.
    probe_hint: |file| file.has_at(0x8001, b"CD001"),
    open: |path| Ok(Box::new(open(path, false)?)),
    in_place: Some(|path| Ok(Box::new(open(path, true)?))),
    check: |path| {
        let r = open(path, false)?;
        Ok(Check::single(path, r.range.size, Vec::new()))
    },
    write: |_, output, _, _| {
        Err(ImageError::unsupported(
            output,
            "writing ISO from a disk image is not supported; use write_boot_iso",
        ))
    },
};

/// The whole file as a disk, after checking that it is not shorter than the volume.
fn open(path: &Path, writable: bool) -> Result<RawDevice, ImageError> {
    let dev = RawDevice::open(path, Format::Iso, writable)?;
    check_volume_size(&dev.range.file, path, dev.range.size)?;
    Ok(dev)
}

/// An ISO's primary volume descriptor states the volume's size; a shorter file was truncated.
fn check_volume_size(file: &File, path: &Path, size: u64) -> Result<(), ImageError> {
    let mut pvd = [0u8; 0x82];
    util::read_exact_at(file, path, &mut pvd, 0x8000, Format::Iso)?;
    let blocks = u32::from_le_bytes([pvd[0x50], pvd[0x51], pvd[0x52], pvd[0x53]]) as u64;
    let block_size = u16::from_le_bytes([pvd[0x80], pvd[0x81]]) as u64;
    let volume = blocks * block_size;
    if volume > size {
        return Err(ImageError::corrupt(
            path,
            Format::Iso,
            format!("the volume is {volume} bytes but the file is only {size} (truncated?)"),
        ));
    }
    Ok(())
}

/// Path of the boot file inside the ISO tree.
pub const BOOT_IMAGE_PATH: &str = "BOOT/BOOT.IMG";
/// Path of the El Torito boot catalog inside the ISO tree.
pub const BOOT_CATALOG_PATH: &str = "BOOT/BOOT.CAT";

/// Write a bootable El Torito CD to `output`, atomically (temporary file, fsync, rename).
///
/// The boot entry is x86 BIOS, no emulation, load segment 0x07C0, loading 4 virtual
/// (512-byte) sectors. The boot file is `boot_sector` padded with zeros to one 2048-byte CD
/// sector; it and the boot catalog are visible in the ISO 9660 tree as
/// [`BOOT_IMAGE_PATH`] and [`BOOT_CATALOG_PATH`].
pub fn write_boot_iso(boot_sector: &[u8; 512], output: &Path) -> Result<(), ImageError> {
    let hadris = |e: &dyn std::fmt::Display| {
        ImageError::unsupported(output, format!("building the ISO failed: {e}"))
    };
    let mut image = vec![0u8; 2048];
    image[..512].copy_from_slice(boot_sector);
    let mut tree = Tree::new();
    tree.insert(BOOT_IMAGE_PATH, Node::file(Content::bytes(image)))
        .map_err(|e| hadris(&e))?;
    tree.insert(
        "README.TXT",
        Node::file(Content::bytes(
            "kiln boot CD: El Torito no-emulation boot image in BOOT/BOOT.IMG\n",
        )),
    )
    .map_err(|e| hadris(&e))?;
    let options = IsoOptions::default()
        .with_id(IsoId::Volume, "KILN_BOOT")
        .with_el_torito(
            ElTorito::new()
                .with_entry(
                    BootEntry::bios(BOOT_IMAGE_PATH)
                        .with_load_size(4)
                        .with_load_segment(0x07C0),
                )
                .with_catalog_path(BOOT_CATALOG_PATH),
        );
    let out = TempOut::create(output)?;
    let dev = hadris_storage::host::FileDevice::new(out.file_clone()?)
        .map_err(|e| ImageError::io(output, "cannot open output", e))?;
    hadris_iso::sync::write(dev, &tree, &options).map_err(|e| hadris(&e))?;
    util::commit(vec![out], true)
}
