#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MIB: u64 = 1 << 20;

/// Run a tool, panicking with a clear message if it is not installed.
pub fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}); install it (qemu-utils / xorriso) to run these tests")
    })
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    run("qemu-img", args)
}

/// Run qemu-img and require success.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A recognisable 512-byte boot sector.
pub fn boot_sector() -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0] = 0xEB; // jmp short
    b[1] = 0xFE;
    b[3..19].copy_from_slice(b"KILN TEST SECTOR");
    for (i, x) in b[32..500].iter_mut().enumerate() {
        *x = (i * 7 + 3) as u8;
    }
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8 | 1 // never zero, so data is never mistaken for a hole
        })
        .collect()
}

/// Sparse file of `size` bytes with data written at the given (offset, len) places.
pub fn make_sparse(path: &Path, size: u64, pieces: &[(u64, usize)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in pieces.iter().enumerate() {
        f.write_all_at(&pattern(len, i as u64 + off), off).unwrap();
    }
}

/// 1 MiB raw image: boot sector, some data, holes.
pub fn small_raw(dir: &Path) -> PathBuf {
    let path = dir.join("small.raw");
    make_sparse(
        &path,
        MIB,
        &[
            (4096, 1000),
            (65536 + 17, 70_000),
            (512 * 1024, 4096),
            (MIB - 4096, 4096),
        ],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    path
}

/// ~64 MiB sparse raw image with scattered data (unaligned, across block boundaries).
pub fn big_raw(dir: &Path) -> PathBuf {
    let path = dir.join("big.raw");
    make_sparse(
        &path,
        64 * MIB,
        &[
            (0, 512),
            (MIB - 100, 300),
            (3 * MIB + 12345, 2 * MIB as usize + 7),
            (17 * MIB, 65536),
            (33 * MIB - 4096, 8192),
            (50 * MIB + 1, 1),
            (64 * MIB - 512, 512),
        ],
    );
    path
}

pub fn read_all(r: &mut dyn kiln_image::ImageReader) -> Vec<u8> {
    let mut v = vec![0u8; r.virtual_size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        r.read_at(c, (i as u64) << 20).unwrap();
    }
    v
}

/// Compare our reader's view of `image` with the raw bytes of `raw` (zero-extended).
pub fn assert_same_content(image: &Path, raw: &Path) {
    let mut r = kiln_image::open(image).unwrap_or_else(|e| panic!("open {image:?}: {e}"));
    let got = read_all(r.as_mut());
    let want = std::fs::read(raw).unwrap();
    assert!(
        got.len() >= want.len(),
        "{image:?}: virtual size {} < {}",
        got.len(),
        want.len()
    );
    assert!(
        got[..want.len()] == want[..],
        "{image:?}: content differs from {raw:?}"
    );
    assert!(
        got[want.len()..].iter().all(|&b| b == 0),
        "{image:?}: tail not zero"
    );
    // block_status must agree with the data: zero and unallocated extents really read as zero.
    let mut off = 0u64;
    let size = r.virtual_size();
    while off < size {
        let (status, len) = r.block_status(off, size - off).unwrap();
        assert!(len >= 1 && len <= size - off);
        if !status.is_data() {
            assert!(
                got[off as usize..(off + len) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{image:?}: extent at {off}+{len} reported {status:?} but has data"
            );
        }
        off += len;
    }
}

/// qemu-img's driver name for our format.
pub fn qemu_fmt(f: kiln_image::Format) -> &'static str {
    match f {
        kiln_image::Format::Vhd => "vpc",
        other => other.name(),
    }
}

/// Overwrites `bytes` at `off` of the file `path` (to corrupt or craft an image).
pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}
