//! Storage without a guest: QCOW2 overlays checked by qemu-img, ext4 disks by e2fsck/debugfs.

use std::path::Path;
use std::process::Command;

fn tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install qemu-utils / e2fsprogs): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn checksum(p: &Path) -> String {
    tool(Command::new("sha256sum").arg(p))
}

#[test]
fn overlay_is_valid_qcow2_backed_by_the_untouched_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xabu8; 3 << 20]).unwrap();
    let before = checksum(&base);
    let overlay = dir.path().join("root.qcow2");
    let size = kiln_image::create_overlay(&base, &overlay).unwrap();
    assert_eq!(size, 3 << 20);
    tool(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&overlay),
    );
    let info: serde_json::Value = serde_json::from_str(&tool(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&overlay),
    ))
    .unwrap();
    assert_eq!(info["virtual-size"], 3 << 20);
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(
        info["full-backing-filename"],
        base.canonicalize().unwrap().to_str().unwrap()
    );
    // Guest-style writes land in the overlay; reads fall through to the base elsewhere.
    tool(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x55 0 64k",
                "-c",
                "read -P 0xab 1M 64k",
            ])
            .arg(&overlay),
    );
    tool(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&overlay),
    );
    tool(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -P 0x55 0 64k"])
            .arg(&overlay),
    );
    assert_eq!(before, checksum(&base), "the base image changed");
    // An existing overlay is never overwritten.
    assert!(kiln_image::create_overlay(&base, &overlay).is_err());
}

#[test]
fn ext4_disk_is_sparse_and_holds_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed");
    std::fs::create_dir_all(seed.join("lib/dpkg")).unwrap();
    std::fs::write(seed.join("lib/dpkg/status"), "Package: kiln\n").unwrap();
    let disk = dir.path().join("var.ext4");
    kiln_rootfs::make_ext4_disk(&disk, 1 << 30, Some(&seed), "var").unwrap();
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "not sparse: {} blocks",
        meta.blocks()
    );
    tool(Command::new("e2fsck").arg("-fn").arg(&disk));
    let out = tool(
        Command::new("debugfs")
            .args(["-R", "cat /lib/dpkg/status"])
            .arg(&disk),
    );
    assert_eq!(out, "Package: kiln\n");
    // And back out with extract_dir, as `kiln vm run --rootfs` does for images without seeds.
    let x = kiln_rootfs::extract_dir(&disk, "/lib", &dir.path().join("x")).unwrap();
    assert_eq!(
        std::fs::read_to_string(x.join("dpkg/status")).unwrap(),
        "Package: kiln\n"
    );
}
