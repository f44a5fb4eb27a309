//! Test helpers: a bootable test image.
#![allow(dead_code)]

use std::path::Path;

/// A stand-in for kiln's boot program with the same behaviour: prints "ClientAPI\r\n" on COM1
/// and the BIOS screen, then answers each serial line (ended by CR) reversed, plus CR LF.
/// (GNU as, .code16, linked at 0x7C00.)
const STAND_IN: &str = "fa31c08ed88ec08ed0bc007cfbbafb03b080eebaf803b001ee4230c0eebafb03b003eebe8a7ce85600bf007ee82b003c0d740d3c0a74f581ff407e73efaaebec81ff007e74084f8a05e81b00ebf2b00de81400b00ae80f00ebcfbafd03eca80174fbbaf803ecc35057b40ebb0700cd10bafd03eca82074fb5f58baf803eec3ac84c07405e8e0ffebf6c3436c69656e744150490d0a";

/// The boot sector: 512 bytes ending in 0x55AA.
pub fn boot_sector() -> Vec<u8> {
    let mut s: Vec<u8> = (0..STAND_IN.len() / 2)
        .map(|i| u8::from_str_radix(&STAND_IN[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
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
