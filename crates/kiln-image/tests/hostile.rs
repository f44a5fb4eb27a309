//! Hostile images: small files whose headers claim huge disks, tables that name one block many
//! times, descriptors that name host files. Each is made here by a short generator (no opaque
//! blobs). Every one must be refused, or read, in well under two seconds, by `inspect` and
//! `convert` alike, and no output may be larger than the input's real data.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kiln_image::{convert_with, inspect, Format, ImageError, WriteOptions};

const LIMIT: Duration = Duration::from_secs(2);

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// `inspect` and `convert` (to QCOW2, whose allocation shows any multiplied output) of
/// `image`: both within [`LIMIT`]; returns their errors (the test decides what it expects).
fn both(image: &Path, out_dir: &Path) -> (Result<bool, String>, Result<u64, String>) {
    let t = Instant::now();
    let inspected = inspect(image)
        .map(|i| i.consistent)
        .map_err(|e| e.to_string());
    let took = t.elapsed();
    assert!(took < LIMIT, "inspect {} took {took:?}", image.display());
    let out = out_dir.join("out.qcow2");
    let _ = std::fs::remove_file(&out);
    let t = Instant::now();
    let converted = convert_with(
        image,
        &out,
        Format::Qcow2,
        &WriteOptions { fsync: false },
        &mut |_, _| {},
    )
    .map(|()| std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0))
    .map_err(|e| e.to_string());
    let took = t.elapsed();
    assert!(took < LIMIT, "convert {} took {took:?}", image.display());
    // Nothing half-written is left behind, whatever happened.
    for e in std::fs::read_dir(out_dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().contains("kiln-tmp"),
            "left {name:?} behind"
        );
    }
    (inspected, converted)
}

/// Both refuse `image`, naming it and `why`.
fn refused(image: &Path, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (i, c) = both(image, dir.path());
    for (what, r) in [("inspect", i.map(|_| 0)), ("convert", c)] {
        let e = r.expect_err(&format!("{what} accepted {}", image.display()));
        assert!(
            e.contains(why) && e.contains(image.file_name().unwrap().to_str().unwrap()),
            "{what} {}: {e}",
            image.display()
        );
    }
}

/// A QCOW2 v3 of 64 KiB clusters built by hand: header, L1 at cluster 1, refcount table at
/// cluster 2 (`rt_clusters` clusters) and `extra` clusters after it.
fn qcow2(path: &Path, size: u64, refcount_order: u32, rt_clusters: u32, extra: u64) -> u64 {
    let cs = 1u64 << 16;
    let l1_entries = size.div_ceil(cs * (cs / 8)) as u32;
    let len = (3 + rt_clusters as u64 + extra) * cs;
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    let mut h = vec![0u8; 104];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&be32(3));
    h[20..24].copy_from_slice(&be32(16));
    h[24..32].copy_from_slice(&be64(size));
    h[36..40].copy_from_slice(&be32(l1_entries));
    h[40..48].copy_from_slice(&be64(cs));
    h[48..56].copy_from_slice(&be64(2 * cs));
    h[56..60].copy_from_slice(&be32(rt_clusters));
    h[96..100].copy_from_slice(&be32(refcount_order));
    h[100..104].copy_from_slice(&be32(104));
    patch(path, 0, &h);
    len
}

#[test]
fn qcow2_refcount_table_repeating_one_block_is_refused_at_once() {
    // 1.7 MB: 24 refcount-table clusters whose 196,608 entries all name one refcount block,
    // at refcount_order 0 (each block holds 524,288 one-bit refcounts).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("refcounts.qcow2");
    let cs = 1u64 << 16;
    let len = qcow2(&img, 1 << 30, 0, 24, 1);
    let block = len - cs;
    let table: Vec<u8> = (0..24 * cs / 8).flat_map(|_| be64(block)).collect();
    patch(&img, 2 * cs, &table);
    refused(&img, "overlaps");
}

#[test]
fn qcow2_l1_entries_naming_one_l2_table_are_refused() {
    // Every L1 entry names the same L2 table, whose entries name one data cluster: reading it
    // would copy that cluster once per guest cluster of a 64 GiB disk.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l2.qcow2");
    let cs = 1u64 << 16;
    let len = qcow2(&img, 64 << 30, 4, 1, 2);
    let (l2, data) = (len - 2 * cs, len - cs);
    let l1: Vec<u8> = (0..128).flat_map(|_| be64(l2 | 1 << 63)).collect();
    patch(&img, cs, &l1);
    patch(&img, l2, &be64(data | 1 << 63));
    patch(&img, data, &[0xAB; 512]);
    refused(&img, "overlaps");
    // One L2 table naming one data cluster twice is refused too.
    patch(&img, cs, &be64(l2 | 1 << 63));
    patch(&img, cs + 8, &vec![0u8; 127 * 8]);
    let l2_entries: Vec<u8> = (0..2).flat_map(|_| be64(data | 1 << 63)).collect();
    patch(&img, l2, &l2_entries);
    refused(&img, "overlaps");
    // Reserved bits in an L2 entry are refused by both (convert used to, inspect did not).
    patch(&img, l2, &be64(data | 1 << 63 | 1 << 3));
    patch(&img, l2 + 8, &be64(0));
    refused(&img, "reserved bits");
    // And an L2 entry past the end of the file.
    patch(&img, l2, &be64((len + cs) | 1 << 63));
    refused(&img, "beyond the end of the file");
}

/// A hosted sparse VMDK extent header (`KDMV` version 1) of `capacity` sectors, 64 KiB grains,
/// 512-entry grain tables, the grain directory at sector `gd_sector`.
fn vmdk_header(capacity: u64, gd_sector: u64, desc: Option<(u64, u64)>) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..12].copy_from_slice(&3u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&128u64.to_le_bytes());
    if let Some((at, sectors)) = desc {
        h[28..36].copy_from_slice(&at.to_le_bytes());
        h[36..44].copy_from_slice(&sectors.to_le_bytes());
    }
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[56..64].copy_from_slice(&gd_sector.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h
}

#[test]
fn vmdk_grain_directory_naming_one_table_is_refused_at_once() {
    // 8 MB claiming 8 TiB: 262,144 directory entries all name one (empty) grain table. Walking
    // it cost 24 s and converting ran past a minute, leaving an 8 TiB temporary file.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("tables.vmdk");
    let capacity = (8u64 << 40) / 512;
    let entries = capacity / (128 * 512);
    let gd_sector = 1;
    let gt_sector = gd_sector + entries * 4 / 512;
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    patch(&img, 0, &vmdk_header(capacity, gd_sector, None));
    let gd: Vec<u8> = (0..entries)
        .flat_map(|_| (gt_sector as u32).to_le_bytes())
        .collect();
    patch(&img, gd_sector * 512, &gd);
    refused(&img, "overlaps");
}

#[test]
fn vmdk_with_distinct_empty_tables_converts_quickly_to_nothing() {
    // The honest version of the above: as many distinct (empty) grain tables as 8 MB holds,
    // for an 8 TiB disk. Legal, so it is read, but in bounded time and to an empty output.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.vmdk");
    let capacity = (8u64 << 40) / 512;
    let entries = capacity / (128 * 512);
    let gd_sector = 1u64;
    let first_gt = gd_sector + entries * 4 / 512;
    let len = 8u64 << 20;
    std::fs::File::create(&img).unwrap().set_len(len).unwrap();
    patch(&img, 0, &vmdk_header(capacity, gd_sector, None));
    let tables = (len / 512 - first_gt) / 4;
    let gd: Vec<u8> = (0..tables)
        .flat_map(|i| ((first_gt + i * 4) as u32).to_le_bytes())
        .collect();
    patch(&img, gd_sector * 512, &gd);
    let out = tempfile::tempdir().unwrap();
    let (i, c) = both(&img, out.path());
    assert_eq!(i, Ok(true));
    let out_len = c.expect("converts");
    assert!(out_len < 1 << 20, "output is {out_len} bytes");
}

#[test]
fn vdi_block_map_naming_one_block_is_refused() {
    // 6 MB: a 1 TiB disk of 1 MiB blocks whose whole map names block 0 (1 TiB of output).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("blocks.vdi");
    let blocks = 1u64 << 20;
    let (bmap, data) = (0x200u64, 0x200 + blocks * 4);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(data + (1 << 20))
        .unwrap();
    let mut h = vec![0u8; 512];
    h[0x40..0x44].copy_from_slice(&0xBEDA107Fu32.to_le_bytes());
    h[0x44..0x48].copy_from_slice(&0x0001_0001u32.to_le_bytes());
    h[0x48..0x4c].copy_from_slice(&0x190u32.to_le_bytes());
    h[0x4c..0x50].copy_from_slice(&1u32.to_le_bytes()); // dynamic
    h[0x154..0x158].copy_from_slice(&(bmap as u32).to_le_bytes());
    h[0x158..0x15c].copy_from_slice(&(data as u32).to_le_bytes());
    h[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
    h[0x170..0x178].copy_from_slice(&(blocks << 20).to_le_bytes());
    h[0x178..0x17c].copy_from_slice(&(1u32 << 20).to_le_bytes());
    h[0x180..0x184].copy_from_slice(&(blocks as u32).to_le_bytes());
    h[0x184..0x188].copy_from_slice(&1u32.to_le_bytes());
    patch(&img, 0, &h);
    patch(&img, bmap, &vec![0u8; (blocks * 4) as usize]);
    patch(&img, data, &[0x5A; 4096]);
    refused(&img, "overlaps");
}

#[test]
fn vhd_block_table_naming_one_block_is_refused() {
    // A dynamic 64 GiB VHD with one block written, then every table entry pointed at it.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("one.raw");
    make_sparse(&raw, 64 << 30, &[(0, 4096)]);
    let img = dir.path().join("blocks.vhd");
    qemu_img_ok(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        p(&raw),
        p(&img),
    ]);
    let mut dh = [0u8; 1024];
    let f = std::fs::File::open(&img).unwrap();
    f.read_exact_at(&mut dh, 512).unwrap();
    let table = u64::from_be_bytes(dh[16..24].try_into().unwrap());
    let entries = u32::from_be_bytes(dh[28..32].try_into().unwrap());
    let mut first = [0u8; 4];
    f.read_exact_at(&mut first, table).unwrap();
    assert_ne!(first, [0xff; 4], "qemu-img allocated block 0");
    let bat: Vec<u8> = (0..entries).flat_map(|_| first).collect();
    patch(&img, table, &bat);
    refused(&img, "overlaps");
}

/// A monolithicFlat descriptor with `extents` lines over files in its directory.
fn descriptor(path: &Path, body: &str) {
    std::fs::write(
        path,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n{body}"
        ),
    )
    .unwrap();
}

#[test]
fn vmdk_extents_repeating_one_file_are_refused() {
    // 65 KB of FLAT lines over one 1 MiB file: 3.4 GiB of output.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.raw"), vec![7u8; 1 << 20]).unwrap();
    let img = dir.path().join("repeat.vmdk");
    let body: String = (0..2300).map(|_| "RW 2048 FLAT \"data.raw\" 0\n").collect();
    descriptor(&img, &body);
    refused(&img, "already uses");
    // Overlapping by one sector is as bad as repeating.
    descriptor(
        &img,
        "RW 1024 FLAT \"data.raw\" 0\nRW 1024 FLAT \"data.raw\" 1023\n",
    );
    refused(&img, "already uses");
    // Disjoint ranges of one file are fine.
    descriptor(
        &img,
        "RW 1024 FLAT \"data.raw\" 0\nRW 1024 FLAT \"data.raw\" 1024\n",
    );
    let out = tempfile::tempdir().unwrap();
    let (i, c) = both(&img, out.path());
    assert_eq!(i, Ok(true));
    c.expect("converts");
    // An extent over the descriptor itself is refused.
    descriptor(
        &img,
        "RW 0 FLAT \"repeat.vmdk\" 0\nRW 2048 FLAT \"data.raw\" 0\n",
    );
    refused(&img, "already uses");
}

/// A file outside the image's directory that no reader may ever open.
fn canary(dir: &Path) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::create_dir(&secret).unwrap();
    let c = secret.join("shadow");
    std::fs::write(&c, vec![0x42; 1 << 20]).unwrap();
    c
}

#[test]
fn vmdk_descriptor_differentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shadow = canary(dir.path());
    let img_dir = dir.path().join("image");
    std::fs::create_dir(&img_dir).unwrap();
    std::fs::write(img_dir.join("data.raw"), vec![7u8; 1 << 20]).unwrap();
    let img = img_dir.join("disk.vmdk");
    // A line that is an extent line with trailing junk (QEMU reads it; kiln used to take it
    // for `key=value` because it contains `=`), next to an extent kiln would have used.
    descriptor(
        &img,
        &format!(
            "RW 2 FLAT \"{}\" 0 x=y\nRDONLY 2048 FLAT \"data.raw\" 0\n",
            shadow.display()
        ),
    );
    refused(&img, "disk.vmdk");
    // A parent named in a comment (QEMU searches the whole text for it).
    descriptor(
        &img,
        "# parentFileNameHint=\"../secret/parent.vmdk\"\nRW 2048 FLAT \"data.raw\" 0\n",
    );
    refused(&img, "parent");
    // Lines that are neither an extent nor `key = value`.
    descriptor(&img, "RW 2048 FLAT \"data.raw\" 0\nhello world\n");
    refused(&img, "cannot parse");

    // A sparse file whose header says capacity 0 and whose embedded descriptor names a host
    // file as a FLAT extent (kiln never used to parse embedded descriptors).
    let raw = img_dir.join("small.raw");
    make_sparse(&raw, 1 << 20, &[(0, 4096)]);
    let sparse = img_dir.join("sparse.vmdk");
    qemu_img_ok(&["convert", "-O", "vmdk", p(&raw), p(&sparse)]);
    let mut h = [0u8; 512];
    std::fs::File::open(&sparse)
        .unwrap()
        .read_exact_at(&mut h, 0)
        .unwrap();
    let desc_at = u64::from_le_bytes(h[28..36].try_into().unwrap()) * 512;
    assert!(desc_at > 0, "qemu-img embeds a descriptor");
    patch(&sparse, 12, &0u64.to_le_bytes());
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 2048 FLAT \"{}\" 0\n\0",
        shadow.display()
    );
    patch(&sparse, desc_at, text.as_bytes());
    refused(&sparse, "embedded descriptor");
    // A parent named only in the embedded descriptor.
    patch(&sparse, 12, &2048u64.to_le_bytes());
    let text = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=1\nparentFileNameHint=\"p.vmdk\"\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"sparse.vmdk\"\n\0";
    patch(&sparse, desc_at, text.as_bytes());
    refused(&sparse, "parent");
}

#[test]
fn refusals_are_one_line_errors() {
    // The error type names the image for every refusal above; spot-check the variant.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.vmdk");
    descriptor(&img, "RW 2048 FLAT \"../x\" 0\n");
    let e = kiln_image::open(&img).err().unwrap();
    assert!(
        matches!(e, ImageError::ExtentOutsideDirectory { .. }),
        "{e}"
    );
    assert!(!e.to_string().contains('\n'));
}
