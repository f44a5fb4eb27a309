//! Bootable ISO 9660 + El Torito CD via `hadris-iso`.

use std::path::Path;

use hadris_fs::{Content, Node, Tree};
use hadris_iso::{BootEntry, ElTorito, IsoId, IsoOptions};

use crate::util::{self, TempOut};
use crate::ImageError;

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
    let f = out
        .file()?
        .try_clone()
        .map_err(|e| ImageError::io(output, "cannot duplicate file handle", e))?;
    let dev = hadris_storage::host::FileDevice::new(f)
        .map_err(|e| ImageError::io(output, "cannot open output", e))?;
    hadris_iso::sync::write(dev, &tree, &options).map_err(|e| hadris(&e))?;
    util::commit(vec![out], true)
}
