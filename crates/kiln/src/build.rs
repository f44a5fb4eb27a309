//! `kiln build`: one program, every disk format.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_image::Format;

/// Size of boot.img: q35's AHCI refuses to boot a 512-byte disk, and 1 MiB is also the VHD
/// alignment Azure requires.
pub const DISK_SIZE: u64 = 1 << 20;

/// One file `build` wrote.
#[derive(Debug, serde::Serialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub format: Format,
    pub description: &'static str,
}

/// Writes boot.bin, boot.img, boot.iso, boot.qcow2, boot.vmdk (+ boot-flat.vmdk), boot.vhd and
/// boot.vdi for `program` into `out`. `progress` is told the name of each file as it starts.
pub fn build(
    program: &[u8],
    out: &Path,
    progress: &mut dyn FnMut(&Path),
) -> anyhow::Result<Vec<Artifact>> {
    let sector = kiln_boot::boot_sector(program)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the output directory", out.display()))?;
    let mut made = Vec::new();
    let mut record = |path: PathBuf, format, description| {
        made.push(Artifact {
            path,
            format,
            description,
        })
    };

    let bin = out.join("boot.bin");
    progress(&bin);
    crate::write_atomic(&bin, program, None)?;
    record(bin, Format::Raw, "the raw program");

    let img = out.join("boot.img");
    progress(&img);
    crate::write_atomic(&img, &sector, Some(DISK_SIZE))?;
    record(img.clone(), Format::Raw, "raw bootable disk, 1 MiB");

    let iso = out.join("boot.iso");
    progress(&iso);
    kiln_image::write_boot_iso(&sector, &iso)?;
    record(iso, Format::Iso, "ISO 9660 + El Torito CD");

    for (name, format, description) in [
        ("boot.qcow2", Format::Qcow2, "QCOW2 v3"),
        (
            "boot.vmdk",
            Format::Vmdk,
            "VMware monolithicFlat (with boot-flat.vmdk)",
        ),
        ("boot.vhd", Format::Vhd, "Microsoft VHD, fixed"),
        ("boot.vdi", Format::Vdi, "VirtualBox VDI"),
    ] {
        let path = out.join(name);
        progress(&path);
        kiln_image::convert(&img, &path, format, &mut |_, _| {})?;
        record(path, format, description);
    }
    Ok(made)
}
