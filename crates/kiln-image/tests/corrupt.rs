//! Truncated, corrupt and malicious inputs: always a clear error naming the file, never a
//! panic, never a huge allocation.

mod common;

use common::*;
use kiln_image::{convert, inspect, open, BlockStatus, Format, ImageError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn copy_to(src: &Path, dst: &Path) -> PathBuf {
    std::fs::copy(src, dst).unwrap();
    dst.to_path_buf()
}

/// Open + inspect + read everything; must not panic. Returns the first error.
fn try_all(path: &Path) -> Result<(), ImageError> {
    inspect(path)?;
    let mut r = open(path)?;
    let size = r.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        r.read_at(&mut buf[..n], off)?;
        r.block_status(off, size - off)?;
        off += n as u64;
    }
    Ok(())
}

fn expect_err(path: &Path, needle: &str) {
    let err = match try_all(path) {
        Ok(()) => panic!("{path:?}: corrupt image accepted (wanted error with {needle:?})"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(path.to_str().unwrap()) || err.contains("-flat"),
        "error does not name the file: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains('\n'), "multi-line error: {err}");
}

fn images(dir: &Path) -> Vec<(Format, PathBuf)> {
    let src = small_raw(dir);
    [Format::Qcow2, Format::Vmdk, Format::Vhd, Format::Vdi]
        .into_iter()
        .map(|f| {
            let out = dir.join(format!("good.{}", f.name()));
            convert(&src, &out, f, &mut |_, _| {}).unwrap();
            (f, out)
        })
        .collect()
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("does-not-exist.qcow2");
    let err = open(&p).err().unwrap().to_string();
    assert!(err.contains("does-not-exist.qcow2"), "{err}");
    let err = inspect(&p).unwrap_err().to_string();
    assert!(err.contains("does-not-exist.qcow2"), "{err}");
    let err = convert(&p, &dir.path().join("o.raw"), Format::Raw, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("does-not-exist.qcow2"), "{err}");
}

#[test]
fn qcow2_corrupt_headers() {
    let dir = tempfile::tempdir().unwrap();
    let good = images(dir.path()).remove(0).1;
    let c = |n: &str| copy_to(&good, &dir.path().join(n));
    // Huge L1 table: must be refused before anything is allocated.
    let p = c("l1.qcow2");
    patch(&p, 36, &u32::MAX.to_be_bytes());
    expect_err(&p, "L1 table");
    let p = c("cb.qcow2");
    patch(&p, 20, &40u32.to_be_bytes());
    expect_err(&p, "cluster_bits");
    let p = c("size.qcow2");
    patch(&p, 24, &(1u64 << 62).to_be_bytes());
    expect_err(&p, "too large");
    let p = c("rt.qcow2");
    patch(&p, 48, &(1u64 << 40).to_be_bytes());
    expect_err(&p, "refcount table");
    let p = c("backing.qcow2");
    patch(&p, 8, &512u64.to_be_bytes());
    expect_err(&p, "backing file");
    let p = c("trunc.qcow2");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    expect_err(&p, "too short");
}

#[test]
fn qcow2_bad_l2_pointer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let good = images(dir.path()).remove(0).1;
    let p = copy_to(&good, &dir.path().join("l2.qcow2"));
    // Point the first L1 entry far beyond the end of the file.
    let f = std::fs::File::open(&p).unwrap();
    let mut h = [0u8; 8];
    f.read_exact_at(&mut h, 40).unwrap();
    let l1 = u64::from_be_bytes(h);
    patch(&p, l1, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    assert!(try_all(&p).is_err());
    match inspect(&p) {
        Ok(i) => assert!(!i.consistent && !i.problems.is_empty()),
        Err(e) => assert!(e.to_string().contains("l2.qcow2"), "{e}"),
    }
}

#[test]
fn vhd_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let good = images(dir.path()).remove(2).1;
    let len = std::fs::metadata(&good).unwrap().len();
    let p = copy_to(&good, &dir.path().join("sum.vhd"));
    patch(&p, len - 512 + 48, &(2u64 << 20).to_be_bytes()); // size changed, checksum not
    expect_err(&p, "checksum");
    let p = copy_to(&good, &dir.path().join("trunc.vhd"));
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    // Footer gone: no longer detected as VHD, so it reads as raw — that is fine; but an
    // explicit VHD footer claiming more data than the file holds must fail:
    let p = copy_to(&good, &dir.path().join("big.vhd"));
    let f = std::fs::File::open(&p).unwrap();
    let mut foot = [0u8; 512];
    f.read_exact_at(&mut foot, len - 512).unwrap();
    foot[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    foot[64..68].copy_from_slice(&[0; 4]);
    let sum = !foot.iter().fold(0u32, |a, &b| a.wrapping_add(b as u32));
    foot[64..68].copy_from_slice(&sum.to_be_bytes());
    patch(&p, len - 512, &foot);
    expect_err(&p, "file holds only");
}

#[test]
fn vhd_dynamic_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_raw(dir.path());
    let good = dir.path().join("dyn.vhd");
    qemu_img_ok(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        p(&src),
        p(&good),
    ]);
    // Huge max table entries in the dynamic header (at 512): refused, no big allocation.
    let pth = copy_to(&good, &dir.path().join("bat.vhd"));
    let f = std::fs::File::open(&pth).unwrap();
    let mut h = [0u8; 1024];
    f.read_exact_at(&mut h, 512).unwrap();
    h[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
    h[36..40].copy_from_slice(&[0; 4]);
    let sum = !h.iter().fold(0u32, |a, &b| a.wrapping_add(b as u32));
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    patch(&pth, 512, &h);
    expect_err(&pth, "block allocation table");
}

#[test]
fn vdi_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let good = images(dir.path()).remove(3).1;
    let c = |n: &str| copy_to(&good, &dir.path().join(n));
    let p = c("blocks.vdi");
    patch(&p, 0x180, &0x03ff_ffff_u32.to_le_bytes());
    expect_err(&p, "block map");
    let p = c("blocks2.vdi");
    patch(&p, 0x180, &0x0010_0000_u32.to_le_bytes()); // fits the limit, not the file
    expect_err(&p, "block map");
    let p = c("bs.vdi");
    patch(&p, 0x178, &12345u32.to_le_bytes());
    expect_err(&p, "block size");
    let p = c("map.vdi");
    patch(&p, 0x200, &77u32.to_le_bytes());
    expect_err(&p, "block map entry 0");
    let p = c("trunc.vdi");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(300)
        .unwrap();
    expect_err(&p, "too short");
    let p = c("trunc2.vdi");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len((1 << 20) + 1000)
        .unwrap();
    // Still consistent header but the data block is gone → error on read/inspect.
    assert!(try_all(&p).is_err());
}

#[test]
fn vmdk_extent_escapes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("img");
    std::fs::create_dir(&inner).unwrap();
    let outside = dir.path().join("secret.raw");
    std::fs::write(&outside, vec![7u8; 1 << 20]).unwrap();
    let desc = |name: &str, extent: &str| {
        let p = inner.join(name);
        std::fs::write(
            &p,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\nRW 2048 FLAT \"{extent}\" 0\n"
            ),
        )
        .unwrap();
        p
    };
    for (name, extent) in [
        ("abs.vmdk", outside.to_str().unwrap().to_string()),
        ("dotdot.vmdk", "../secret.raw".to_string()),
        ("sub.vmdk", "x/../../secret.raw".to_string()),
    ] {
        let p = desc(name, &extent);
        let err = open(&p).err().unwrap();
        assert!(
            matches!(err, ImageError::ExtentOutsideDirectory { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("outside the image's directory"), "{msg}");
        assert!(msg.contains(name), "{msg}");
    }
    // A symlink inside the directory pointing outside.
    std::os::unix::fs::symlink(&outside, inner.join("link-flat.vmdk")).unwrap();
    let p = desc("link.vmdk", "link-flat.vmdk");
    let err = open(&p).err().unwrap();
    assert!(
        matches!(err, ImageError::ExtentOutsideDirectory { .. }),
        "{err}"
    );
    // A symlink staying inside is refused too: it is not the image's own file.
    std::fs::write(inner.join("real.raw"), vec![1u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink("real.raw", inner.join("ok-flat.vmdk")).unwrap();
    let p = desc("ok.vmdk", "ok-flat.vmdk");
    let err = open(&p).err().unwrap();
    assert!(
        matches!(err, ImageError::ExtentOutsideDirectory { .. }),
        "{err}"
    );
    // So is a file in a subdirectory (a descriptor in a home directory naming .ssh/id_rsa).
    std::fs::create_dir(inner.join(".ssh")).unwrap();
    std::fs::write(inner.join(".ssh/id_rsa"), vec![1u8; 1 << 20]).unwrap();
    let p = desc("key.vmdk", ".ssh/id_rsa");
    let err = open(&p).err().unwrap();
    assert!(
        matches!(err, ImageError::ExtentOutsideDirectory { .. }),
        "{err}"
    );
    // The plain file itself, named directly, is the image's own extent.
    let p = desc("real.vmdk", "real.raw");
    assert_eq!(open(&p).unwrap().virtual_size(), 1 << 20);
    // A FIFO extent must not hang the reader.
    let fifo = inner.join("fifo-flat.vmdk");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let p = desc("fifo.vmdk", "fifo-flat.vmdk");
    let err = open(&p).err().unwrap().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    // Missing extent: error names it.
    let p = desc("missing.vmdk", "missing-flat.vmdk");
    let err = open(&p).err().unwrap().to_string();
    assert!(err.contains("missing-flat.vmdk"), "{err}");
    // Extent shorter than the descriptor claims.
    std::fs::write(inner.join("short-flat.vmdk"), vec![1u8; 4096]).unwrap();
    let p = desc("short.vmdk", "short-flat.vmdk");
    let err = open(&p).err().unwrap().to_string();
    assert!(
        err.contains("short-flat.vmdk") && err.contains("needs"),
        "{err}"
    );
}

#[test]
fn vmdk_sparse_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_raw(dir.path());
    let good = dir.path().join("sparse.vmdk");
    qemu_img_ok(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        p(&src),
        p(&good),
    ]);
    let p1 = copy_to(&good, &dir.path().join("cap.vmdk"));
    patch(&p1, 12, &(1u64 << 60).to_le_bytes()); // capacity
    expect_err(&p1, "capacity");
    let p2 = copy_to(&good, &dir.path().join("gd.vmdk"));
    patch(&p2, 56, &(1u64 << 40).to_le_bytes()); // gdOffset
    expect_err(&p2, "grain directory");
    let p3 = copy_to(&good, &dir.path().join("grain.vmdk"));
    patch(&p3, 20, &3u64.to_le_bytes());
    expect_err(&p3, "grain size");
}

#[test]
fn vmdk_descriptor_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.vmdk");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\ncreateType=\"x\"\nRW lots FLAT \"a\" 0\n",
    )
    .unwrap();
    expect_err(&p, "bad extent size");
    std::fs::write(&p, "# Disk DescriptorFile\ncreateType=\"x\"\n").unwrap();
    expect_err(&p, "no extents");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nRW 99999999999999999999 FLAT \"a\" 0\n",
    )
    .unwrap();
    expect_err(&p, "bad extent size");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nRW 18446744073709551615 FLAT \"a\" 0\n",
    )
    .unwrap();
    assert!(open(&p).is_err());
}

/// Truncate every image at many lengths and flip header bytes: no panics allowed, and
/// every error names the file.
#[test]
fn fuzz_truncation_and_bitflips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut imgs = images(dir.path());
    // Also images only qemu-img writes (we read them): dynamic VHD, sparse/stream VMDK.
    let src = dir.path().join("small.raw");
    for (i, (fmt, q, opt)) in [
        (Format::Vhd, "vpc", "subformat=dynamic"),
        (Format::Vmdk, "vmdk", "subformat=monolithicSparse"),
        (Format::Vmdk, "vmdk", "subformat=streamOptimized"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("qemu{i}.{}", fmt.name()));
        qemu_img_ok(&["convert", "-O", q, "-o", opt, p(&src), p(&out)]);
        imgs.push((fmt, out));
    }
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (fmt, good) in &imgs {
        let len = std::fs::metadata(good).unwrap().len();
        let data = std::fs::read(good).unwrap();
        let t = dir.path().join(format!("fuzz.{}", fmt.name()));
        let mut cuts: Vec<u64> = vec![0, 1, 4, 100, 511, 512, 513, 1024, 4096, 65536];
        cuts.extend((1..20).map(|i| len * i / 20));
        cuts.push(len - 1);
        for cut in cuts {
            std::fs::write(&t, &data[..cut.min(len) as usize]).unwrap();
            if let Err(e) = try_all(&t) {
                let m = e.to_string();
                assert!(
                    m.contains("fuzz.") || m.contains("-flat"),
                    "{fmt} cut {cut}: {m}"
                );
            }
        }
        // Bit flips in the metadata area (first 4 KiB and last 1 KiB).
        for _ in 0..300 {
            let mut d = data.clone();
            for _ in 0..(1 + rnd() % 4) {
                let r = rnd();
                let pos = match r % 4 {
                    0 => len - 1 - (r >> 8) % 1024.min(len),
                    1 => (r >> 8) % len,
                    _ => (r >> 8) % 4096.min(len),
                };
                d[pos as usize] ^= 1 << (r % 8);
            }
            std::fs::write(&t, &d).unwrap();
            if let Err(e) = try_all(&t) {
                let m = e.to_string();
                assert!(m.contains("fuzz.") || m.contains("-flat"), "{fmt}: {m}");
                assert!(!m.contains('\n'), "{m}");
            }
        }
    }
}

#[test]
fn failed_write_leaves_nothing_behind() {
    struct Failing;
    impl kiln_image::ImageReader for Failing {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            8 << 20
        }
        fn read_at(&mut self, _buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
            if offset >= 4 << 20 {
                Err(ImageError::Io {
                    path: "failing-source".into(),
                    what: "read".into(),
                    source: std::io::Error::other("injected failure"),
                })
            } else {
                Ok(())
            }
        }
        fn block_status(&mut self, _o: u64, max: u64) -> Result<(BlockStatus, u64), ImageError> {
            Ok((BlockStatus::Data, max))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for fmt in [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vdi,
    ] {
        let out = dir.path().join(format!("fail.{}", fmt.name()));
        let err = kiln_image::write_image(&mut Failing, &out, fmt, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{fmt}: left behind {left:?}");
    }
}
