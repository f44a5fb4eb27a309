//! Test helpers: kiln's boot image, the web/ directory.
#![allow(dead_code)]

use std::path::Path;

/// kiln's boot program in a boot sector: prints "ClientAPI\r\n" on COM1 and the BIOS screen,
/// then answers each serial line reversed.
pub fn boot_sector() -> Vec<u8> {
    let program = kiln_boot::program().expect("assemble kiln's boot program");
    kiln_boot::boot_sector(&program)
        .expect("boot sector")
        .to_vec()
}

/// Write boot.img (the sector padded to 1 MiB) into `dir` and return its path.
pub fn boot_img(dir: &Path) -> std::path::PathBuf {
    let mut img = boot_sector();
    img.resize(1 << 20, 0);
    let p = dir.join("boot.img");
    std::fs::write(&p, img).expect("write boot.img");
    p
}

/// The repository's web/ directory.
pub fn web_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web")
}
