//! `block_status` tells stored data, known zeros and unallocated ranges apart, and the
//! converter copies only the data.

mod common;

use common::*;
use kiln_image::{open, BlockStatus, Format};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

const KIB: u64 = 1 << 10;

/// `(status, start, len)` runs covering the whole disk, adjacent runs of one status merged.
fn runs(path: &Path) -> Vec<(BlockStatus, u64, u64)> {
    let mut r = open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let size = r.virtual_size();
    let mut out: Vec<(BlockStatus, u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (status, len) = r.block_status(off, size - off).unwrap();
        assert!(
            len >= 1 && len <= size - off,
            "{path:?}: len {len} at {off}"
        );
        match out.last_mut() {
            Some((s, _, l)) if *s == status => *l += len,
            _ => out.push((status, off, len)),
        }
        off += len;
    }
    out
}

/// Compare with qemu-img's reading of the same image.
fn assert_same_as_qemu(image: &Path, format: Format) {
    let raw = image.with_extension("qemu.raw");
    qemu_img_ok(&[
        "convert",
        "-f",
        qemu_fmt(format),
        "-O",
        "raw",
        p(image),
        p(&raw),
    ]);
    assert_same_content(image, &raw);
}

fn qemu_io(format: Format, image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", qemu_fmt(format)];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(image));
    let out = run("qemu-io", &args);
    assert!(
        out.status.success(),
        "qemu-io {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates an empty 4 MiB `format` image `name` in `dir` with qemu-img (with `-o options`
/// when given).
fn create_4m(dir: &Path, name: &str, format: Format, options: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", qemu_fmt(format)];
    if let Some(options) = options {
        args.extend(["-o", options]);
    }
    args.extend([p(&path), "4M"]);
    qemu_img_ok(&args);
    path
}

/// [`create_4m`], then 64 KiB of data at 0 and 64 KiB of zeros at 1 MiB written with qemu-io;
/// checks that the data reads as data, the zeros as zero and the rest as unallocated, with
/// the content qemu-img reads. Returns the image's path.
fn data_zero_unallocated(dir: &Path, name: &str, format: Format, options: Option<&str>) -> PathBuf {
    let path = create_4m(dir, name, format, options);
    qemu_io(format, &path, &["write -P 0x55 0 64k", "write -z 1M 64k"]);
    assert_eq!(
        runs(&path),
        [
            (Data, 0, 64 * KIB),
            (Unallocated, 64 * KIB, MIB - 64 * KIB),
            (Zero, MIB, 64 * KIB),
            (Unallocated, MIB + 64 * KIB, 3 * MIB - 64 * KIB),
        ]
    );
    assert_same_as_qemu(&path, format);
    path
}

use BlockStatus::{Data, Unallocated, Zero};

#[test]
fn raw_holes_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holes.raw");
    make_sparse(&path, 4 * MIB, &[(0, 4096), (MIB, 4096)]);
    assert_eq!(
        runs(&path),
        [
            (Data, 0, 4 * KIB),
            (Zero, 4 * KIB, MIB - 4 * KIB),
            (Data, MIB, 4 * KIB),
            (Zero, MIB + 4 * KIB, 3 * MIB - 4 * KIB),
        ]
    );
}

#[test]
fn qcow2_zero_clusters_are_zero_and_unallocated_ones_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = data_zero_unallocated(dir.path(), "z.qcow2", Format::Qcow2, None);
    // Only the data cluster is copied.
    let out = dir.path().join("z.raw");
    kiln_image::convert(&path, &out, Format::Raw, &mut |_, _| {}).unwrap();
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated <= 64 * KIB, "{allocated} bytes allocated");
}

#[test]
fn vmdk_zero_grains_are_zero_and_unallocated_ones_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    data_zero_unallocated(
        dir.path(),
        "z.vmdk",
        Format::Vmdk,
        Some("subformat=monolithicSparse,zeroed_grain=on"),
    );
}

#[test]
fn vdi_zeroed_blocks_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = create_4m(dir.path(), "z.vdi", Format::Vdi, None);
    qemu_io(Format::Vdi, &path, &["write -P 0x55 0 64k"]);
    // Mark block 2 "zeroed" (0xFFFFFFFE) in the block map; qemu never writes that itself.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut bmap = [0u8; 4];
    f.read_exact_at(&mut bmap, 0x154).unwrap();
    let bmap = u32::from_le_bytes(bmap) as u64;
    f.write_all_at(&0xFFFF_FFFEu32.to_le_bytes(), bmap + 2 * 4)
        .unwrap();
    assert_eq!(
        runs(&path),
        [
            (Data, 0, MIB),
            (Unallocated, MIB, MIB),
            (Zero, 2 * MIB, MIB),
            (Unallocated, 3 * MIB, MIB),
        ]
    );
    assert_same_as_qemu(&path, Format::Vdi);
}

#[test]
fn past_the_end_is_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    let raw = small_raw(dir.path());
    for format in [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vdi,
    ] {
        let path = dir.path().join(format!("end.{}", format.name()));
        kiln_image::convert(&raw, &path, format, &mut |_, _| {}).unwrap();
        let mut r = open(&path).unwrap();
        let size = r.virtual_size();
        let (status, len) = r.block_status(size, 4096).unwrap();
        assert_eq!(status, Unallocated, "{format}");
        assert!(len >= 1, "{format}");
    }
    // A dynamic VHD (kiln writes fixed ones).
    let path = dir.path().join("end-dynamic.vhd");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "vpc", p(&raw), p(&path)]);
    let mut r = open(&path).unwrap();
    let size = r.virtual_size();
    assert_eq!(r.block_status(size, 4096).unwrap().0, Unallocated);
}
