//! Real-tool tests: every format we write is checked and compared by qemu-img, every format
//! qemu-img writes is read by us, and everything round-trips.

mod common;

use common::*;
use kiln_image::{convert, detect, inspect, open, Format};
use std::path::Path;

const WRITABLE: [Format; 5] = [
    Format::Raw,
    Format::Qcow2,
    Format::Vmdk,
    Format::Vhd,
    Format::Vdi,
];

fn ext(f: Format) -> &'static str {
    match f {
        Format::Raw => "img",
        other => other.name(),
    }
}

fn check_written(src: &Path, out: &Path, fmt: Format, size: u64) {
    let q = qemu_fmt(fmt);
    // qemu-img has no checker for raw and vpc (VHD); our inspect() covers the VHD footer.
    if fmt != Format::Raw && fmt != Format::Vhd {
        let check = qemu_img(&["check", "-f", q, p(out)]);
        assert!(
            check.status.success(),
            "qemu-img check {out:?}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", q, p(src), p(out)]);
    assert!(
        cmp.status.success(),
        "qemu-img compare {src:?} {out:?}: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    // qemu-img must detect the format on its own too, except fixed VHD: qemu only probes for
    // the "conectix" cookie at offset 0, which fixed VHDs (footer only) don't have.
    let info = if fmt == Format::Vhd {
        qemu_img_ok(&["info", "-f", "vpc", "--output=json", p(out)])
    } else {
        qemu_img_ok(&["info", "--output=json", p(out)])
    };
    assert!(
        info.contains(&format!("\"format\": \"{q}\"")),
        "qemu-img info {out:?}: {info}"
    );
    assert!(
        info.contains(&format!("\"virtual-size\": {size},")),
        "qemu-img info {out:?} virtual size != {size}: {info}"
    );
    assert_eq!(detect(out).unwrap(), fmt);
    let i = inspect(out).unwrap();
    assert!(i.consistent, "{out:?}: {:?}", i.problems);
    assert_eq!(i.format, fmt);
    assert_eq!(i.virtual_size, size);
    assert_same_content(out, src);
}

#[test]
fn writes_every_format_qemu_img_accepts() {
    let dir = tempfile::tempdir().unwrap();
    for src in [small_raw(dir.path()), big_raw(dir.path())] {
        let size = std::fs::metadata(&src).unwrap().len();
        for fmt in WRITABLE {
            let out = dir.path().join(format!("out-{}.{}", size, ext(fmt)));
            convert(&src, &out, fmt, &mut |_, _| {}).unwrap();
            check_written(&src, &out, fmt, size);
            if fmt == Format::Vmdk {
                let flat = dir.path().join(format!("out-{size}-flat.vmdk"));
                assert!(flat.exists(), "missing {flat:?}");
                let text = std::fs::read_to_string(&out).unwrap();
                assert!(text.contains("createType=\"monolithicFlat\""), "{text}");
                let i = inspect(&out).unwrap();
                assert_eq!(i.files.len(), 2);
            }
        }
    }
    // Only the outputs remain: no temporary files.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains("kiln-tmp"), "leftover temp file {name}");
    }
}

#[test]
fn sparse_outputs_stay_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_raw(dir.path());
    for fmt in WRITABLE {
        let out = dir.path().join(format!("sparse.{}", ext(fmt)));
        convert(&src, &out, fmt, &mut |_, _| {}).unwrap();
        let i = inspect(&out).unwrap();
        // ~2.2 MiB of data in a 64 MiB disk: allow block-size rounding, not the whole disk.
        assert!(
            i.allocated_size < 16 * MIB,
            "{fmt}: {} bytes allocated for a mostly empty 64 MiB disk",
            i.allocated_size
        );
    }
}

#[test]
fn reads_images_written_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for src in [small_raw(dir.path()), big_raw(dir.path())] {
        let cases: &[(&str, &[&str], Format)] = &[
            ("qcow2", &[], Format::Qcow2),
            ("qcow2", &["-c"], Format::Qcow2),
            (
                "qcow2",
                &["-o", "compat=0.10,cluster_size=4096"],
                Format::Qcow2,
            ),
            (
                "qcow2",
                &["-o", "cluster_size=2M,refcount_bits=1"],
                Format::Qcow2,
            ),
            ("vmdk", &["-o", "subformat=monolithicFlat"], Format::Vmdk),
            ("vmdk", &["-o", "subformat=monolithicSparse"], Format::Vmdk),
            ("vmdk", &["-o", "subformat=streamOptimized"], Format::Vmdk),
            (
                "vmdk",
                &["-o", "subformat=twoGbMaxExtentSparse"],
                Format::Vmdk,
            ),
            (
                "vmdk",
                &["-o", "subformat=twoGbMaxExtentFlat"],
                Format::Vmdk,
            ),
            ("vpc", &["-o", "subformat=fixed,force_size=on"], Format::Vhd),
            (
                "vpc",
                &["-o", "subformat=dynamic,force_size=on"],
                Format::Vhd,
            ),
            ("vdi", &[], Format::Vdi),
            ("vdi", &["-o", "static=on"], Format::Vdi),
        ];
        for (i, (q, opts, fmt)) in cases.iter().enumerate() {
            let out = dir.path().join(format!("q{i}.{}", ext(*fmt)));
            let mut args = vec!["convert", "-f", "raw", "-O", q];
            args.extend_from_slice(opts);
            args.push(p(&src));
            args.push(p(&out));
            qemu_img_ok(&args);
            assert_eq!(detect(&out).unwrap(), *fmt, "{q} {opts:?}");
            assert_same_content(&out, &src);
            let info = inspect(&out).unwrap();
            assert!(info.consistent, "{q} {opts:?}: {:?}", info.problems);
            // And we convert what qemu-img wrote back to raw correctly.
            let back = dir.path().join(format!("q{i}-back.raw"));
            convert(&out, &back, Format::Raw, &mut |_, _| {}).unwrap();
            qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", p(&src), p(&back)]);
        }
    }
}

#[test]
fn every_format_to_every_other_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_raw(dir.path());
    let want = std::fs::read(&src).unwrap();
    for a in WRITABLE {
        let pa = dir.path().join(format!("a.{}", ext(a)));
        convert(&src, &pa, a, &mut |_, _| {}).unwrap();
        for b in WRITABLE {
            let pb = dir.path().join(format!("a-to-b.{}", ext(b)));
            convert(&pa, &pb, b, &mut |_, _| {}).unwrap();
            let back = dir.path().join("back.raw");
            convert(&pb, &back, Format::Raw, &mut |_, _| {}).unwrap();
            let got = std::fs::read(&back).unwrap();
            assert!(got.len() >= want.len());
            assert!(got[..want.len()] == want[..], "{a} -> {b} -> raw differs");
        }
    }
}

#[test]
fn progress_reports_reach_total() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_raw(dir.path());
    let mut last = (0, 0);
    let mut calls = 0;
    convert(
        &src,
        &dir.path().join("p.qcow2"),
        Format::Qcow2,
        &mut |d, t| {
            assert!(d <= t && d >= last.0);
            last = (d, t);
            calls += 1;
        },
    )
    .unwrap();
    assert_eq!(last, (64 * MIB, 64 * MIB));
    assert!(calls > 1);
}

#[test]
fn writing_iso_from_disk_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_raw(dir.path());
    let out = dir.path().join("x.iso");
    let err = convert(&src, &out, Format::Iso, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("write_boot_iso"), "{err}");
    assert!(!out.exists());
}

#[test]
fn open_rw_writes_through() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_raw(dir.path());
    for fmt in [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vhd] {
        let out = dir.path().join(format!("rw.{}", ext(fmt)));
        convert(&src, &out, fmt, &mut |_, _| {}).unwrap();
        {
            let mut dev = kiln_image::open_rw(&out).unwrap();
            dev.write_at(b"HELLO FROM INT13", 200_000).unwrap();
            dev.write_at(&[0xAB; 512], 0).unwrap();
            assert!(
                dev.write_at(&[1; 512], MIB).is_err(),
                "{fmt}: write past end accepted"
            );
            dev.flush().unwrap();
        }
        let mut r = open(&out).unwrap();
        let mut b = [0u8; 16];
        r.read_at(&mut b, 200_000).unwrap();
        assert_eq!(&b, b"HELLO FROM INT13", "{fmt}");
        let mut s = [0u8; 512];
        r.read_at(&mut s, 0).unwrap();
        assert_eq!(s, [0xAB; 512], "{fmt}");
        if fmt != Format::Raw && fmt != Format::Vhd {
            qemu_img_ok(&["check", "-f", qemu_fmt(fmt), p(&out)]);
        }
    }
    let vdi = dir.path().join("rw.vdi");
    convert(&src, &vdi, Format::Vdi, &mut |_, _| {}).unwrap();
    assert!(kiln_image::open_rw(&vdi).is_err());
}

#[test]
fn format_names_and_extensions() {
    for f in Format::ALL {
        assert_eq!(f.name().parse::<Format>().unwrap(), f);
        assert_eq!(f.to_string(), f.name());
    }
    assert_eq!("vpc".parse::<Format>().unwrap(), Format::Vhd);
    assert_eq!("img".parse::<Format>().unwrap(), Format::Raw);
    assert!("nope".parse::<Format>().is_err());
    assert_eq!(
        Format::from_extension(Path::new("a/b.BIN")),
        Some(Format::Raw)
    );
    assert_eq!(
        Format::from_extension(Path::new("x.qcow2")),
        Some(Format::Qcow2)
    );
    assert_eq!(Format::from_extension(Path::new("x.txt")), None);
}

#[test]
fn vhd_is_azure_aligned_with_valid_footer() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    make_sparse(&src, 3 * MIB / 2 + 100, &[(0, 4096), (MIB, 100_000)]);
    let out = dir.path().join("odd.vhd");
    convert(&src, &out, Format::Vhd, &mut |_, _| {}).unwrap();
    let data = std::fs::read(&out).unwrap();
    assert_eq!(
        data.len() as u64,
        2 * MIB + 512,
        "size must round up to whole MiB + footer"
    );
    let foot = &data[data.len() - 512..];
    assert_eq!(&foot[0..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(foot[60..64].try_into().unwrap()),
        2,
        "fixed disk type"
    );
    assert_eq!(
        u64::from_be_bytes(foot[48..56].try_into().unwrap()),
        2 * MIB
    );
    assert_eq!(
        u64::from_be_bytes(foot[16..24].try_into().unwrap()),
        u64::MAX
    );
    let stored = u32::from_be_bytes(foot[64..68].try_into().unwrap());
    let sum = foot
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(b as u32));
    assert_eq!(stored, !sum, "footer checksum");
    // CHS for 4096 sectors per the VHD spec: 60 cylinders, 4 heads, 17 sectors/track.
    assert_eq!(u16::from_be_bytes([foot[56], foot[57]]), 60);
    assert_eq!((foot[58], foot[59]), (4, 17));
    // qemu reads the size from the footer ("win " creator), padded with zeros.
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vpc", p(&src), p(&out)]);
    let info = qemu_img_ok(&["info", "-f", "vpc", "--output=json", p(&out)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {},", 2 * MIB)),
        "{info}"
    );
}

/// Huge, empty disks: converting must cost time proportional to metadata, not disk size.
#[test]
fn huge_empty_images_convert_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    for (q, opts, name) in [
        ("qcow2", "cluster_size=65536", "huge.qcow2"),
        ("vmdk", "subformat=monolithicSparse", "huge.vmdk"),
        ("vdi", "static=off", "huge.vdi"),
        ("vpc", "subformat=dynamic", "huge.vhd"),
    ] {
        let src = dir.path().join(name);
        qemu_img_ok(&["create", "-f", q, "-o", opts, p(&src), "1T"]);
        let size = open(&src).unwrap().virtual_size();
        assert!(size >= 1 << 39, "{name}: {size}");
        for out_fmt in [Format::Qcow2, Format::Vdi, Format::Raw] {
            let out = dir.path().join(format!("out-{name}.{}", ext(out_fmt)));
            convert(&src, &out, out_fmt, &mut |_, _| {}).unwrap();
            let i = inspect(&out).unwrap();
            assert!(i.consistent, "{name} -> {out_fmt}: {:?}", i.problems);
            assert!(
                i.allocated_size < 64 * MIB,
                "{name} -> {out_fmt}: {}",
                i.allocated_size
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
    assert!(
        start.elapsed() < std::time::Duration::from_secs(120),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn tiny_and_odd_sized_sources() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("empty.raw", 0u64), ("odd.raw", 1000), ("sector.raw", 512)] {
        let src = dir.path().join(name);
        make_sparse(&src, size, if size > 0 { &[(0, 7)] } else { &[] });
        for fmt in WRITABLE {
            let out = dir.path().join(format!("{name}.{}", ext(fmt)));
            convert(&src, &out, fmt, &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{name} -> {fmt}: {e}"));
            let mut r = open(&out).unwrap();
            assert!(r.virtual_size() >= size, "{name} -> {fmt}");
            let got = read_all(r.as_mut());
            let want = std::fs::read(&src).unwrap();
            assert_eq!(&got[..want.len()], &want[..], "{name} -> {fmt}");
        }
    }
}
