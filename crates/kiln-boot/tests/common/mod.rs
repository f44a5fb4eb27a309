//! What kiln-boot's QEMU tests share.

use std::path::{Path, PathBuf};

/// `dir/boot.img`: the program's boot sector at the start of a 1 MiB raw disk (q35's AHCI
/// will not boot a 512-byte one).
pub fn disk_image(dir: &Path) -> PathBuf {
    let program = kiln_boot::program().expect("program assembles");
    let sector = kiln_boot::boot_sector(&program).expect("boot sector");
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&sector);
    let path = dir.join("boot.img");
    std::fs::write(&path, image).expect("write boot.img");
    path
}
