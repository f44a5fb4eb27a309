//! `kiln build`'s images checked by independent implementations: qemu-img and xorriso.

mod common;

use common::{built, kiln, tool};

const DISKS: [(&str, &str); 4] = [
    ("boot.qcow2", "qcow2"),
    ("boot.vmdk", "vmdk"),
    ("boot.vhd", "vpc"),
    ("boot.vdi", "vdi"),
];

/// `qemu-img compare` of `image` (in qemu-img's `format`) against the raw boot.img.
fn same_as_boot_img(boot_img: &std::path::Path, image: &str, format: &str) -> (bool, String) {
    tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            boot_img.to_str().unwrap(),
            image,
        ],
    )
}

#[test]
fn build_writes_every_format() {
    let dir = built();
    for f in [
        "boot.bin",
        "boot.img",
        "boot.iso",
        "boot.qcow2",
        "boot.vmdk",
        "boot-flat.vmdk",
        "boot.vhd",
        "boot.vdi",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let bin = std::fs::read(dir.join("boot.bin")).unwrap();
    assert!(
        !bin.is_empty() && bin.len() <= 256,
        "boot.bin is {} bytes",
        bin.len()
    );
    let img = std::fs::read(dir.join("boot.img")).unwrap();
    assert_eq!(img.len(), 1 << 20, "boot.img is padded to 1 MiB");
    assert_eq!(
        &img[..bin.len()],
        &bin[..],
        "sector 0 starts with the program"
    );
    assert_eq!(&img[510..512], &[0x55, 0xAA], "boot signature");
    // No temporary files are left behind.
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "leftover temporary file {name}");
    }
}

#[test]
fn qemu_img_checks_and_compares_every_disk_format() {
    let dir = built();
    let img = dir.join("boot.img");
    for (file, qemu_fmt) in DISKS {
        let path = dir.join(file);
        let p = path.to_str().unwrap();
        // A fixed VHD has its footer at the end only, and qemu-img probes just the start: name
        // the format, as one must with qemu-img for fixed VHDs.
        let (ok, info) = tool("qemu-img", &["info", "-f", qemu_fmt, "--output=json", p]);
        assert!(ok, "qemu-img info {file}: {info}");
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            info["format"], qemu_fmt,
            "{file}: qemu-img sees {}",
            info["format"]
        );
        assert_eq!(info["virtual-size"], 1 << 20, "{file}: virtual size");
        // qemu-img checks qcow2, vmdk and vdi; its vpc driver has no check (the VHD footer is
        // verified below).
        if qemu_fmt != "vpc" {
            let (ok, out) = tool("qemu-img", &["check", "-f", qemu_fmt, p]);
            assert!(ok, "qemu-img check {file}: {out}");
        }
        let (ok, out) = same_as_boot_img(&img, p, qemu_fmt);
        assert!(
            ok && out.contains("identical"),
            "qemu-img compare boot.img {file}: {out}"
        );
    }
    // The VHD footer: fixed disk, size a multiple of 1 MiB.
    let vhd = std::fs::read(dir.join("boot.vhd")).unwrap();
    assert_eq!(
        (vhd.len() - 512) % (1 << 20),
        0,
        "VHD data is a multiple of 1 MiB"
    );
    let footer = &vhd[vhd.len() - 512..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "disk type fixed"
    );
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| *b as u32)
        .sum();
    assert_eq!(
        !sum,
        u32::from_be_bytes(footer[64..68].try_into().unwrap()),
        "footer checksum"
    );
}

#[test]
fn xorriso_sees_the_el_torito_boot_image() {
    let iso = built().join("boot.iso");
    let (ok, out) = tool(
        "xorriso",
        &[
            "-indev",
            iso.to_str().unwrap(),
            "-report_el_torito",
            "plain",
        ],
    );
    assert!(ok, "xorriso: {out}");
    assert!(
        out.contains("El Torito boot img"),
        "no El Torito boot image reported:\n{out}"
    );
    assert!(out.contains("BIOS"), "boot image is not for BIOS:\n{out}");
    // The boot image holds the boot sector: extract it and compare with boot.img's sector 0.
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out) = tool(
        "xorriso",
        &[
            "-osirrox",
            "on",
            "-indev",
            iso.to_str().unwrap(),
            "-extract_boot_images",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert!(ok, "xorriso -extract_boot_images: {out}");
    let img = std::fs::read(built().join("boot.img")).unwrap();
    let extracted: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        extracted.iter().any(|p| {
            let b = std::fs::read(p).unwrap();
            b.len() >= 512 && b[..512] == img[..512]
        }),
        "no extracted boot image equals the boot sector: {extracted:?}"
    );
}

#[test]
fn every_format_converts_to_every_other_and_back() {
    let dir = built();
    let img = dir.join("boot.img");
    let tmp = tempfile::tempdir().unwrap();
    let exts = ["img", "qcow2", "vmdk", "vhd", "vdi"];
    for from in exts {
        let src = dir.join(format!("boot.{from}"));
        for to in exts.iter().filter(|t| **t != from) {
            let there = tmp.path().join(format!("{from}-to.{to}"));
            let back = tmp.path().join(format!("{from}-to-{to}-back.{from}"));
            for (a, b) in [(&src, &there), (&there, &back)] {
                let out = kiln(&["convert", a.to_str().unwrap(), b.to_str().unwrap()]);
                assert!(
                    out.status.success(),
                    "kiln convert {} {}: {}",
                    a.display(),
                    b.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for (p, ext) in [(&there, *to), (&back, from)] {
                let qemu_fmt = match ext {
                    "img" => "raw",
                    "vhd" => "vpc",
                    other => other,
                };
                let (ok, out) = same_as_boot_img(&img, p.to_str().unwrap(), qemu_fmt);
                assert!(
                    ok && out.contains("identical"),
                    "{from} -> {to}: {} differs: {out}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn inspect_reports_format_sizes_and_consistency() {
    let dir = built();
    for (file, fmt) in [
        ("boot.img", "raw"),
        ("boot.iso", "iso"),
        ("boot.qcow2", "qcow2"),
        ("boot.vmdk", "vmdk"),
        ("boot.vhd", "vhd"),
        ("boot.vdi", "vdi"),
    ] {
        let out = kiln(&["inspect", "--json", dir.join(file).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "inspect {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["format"], fmt, "{file}");
        assert_eq!(v["consistent"], true, "{file}: {}", v["problems"]);
        assert!(v["allocated_size"].as_u64().unwrap() > 0, "{file}");
        if file != "boot.iso" {
            assert_eq!(v["virtual_size"], 1 << 20, "{file}");
        }
    }
}

#[test]
fn size_and_check_report_the_program() {
    let out = kiln(&["size"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let n: usize = text.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        text.trim() == format!("{n} / 256 bytes ({} free)", 256 - n),
        "{text}"
    );
    let out = kiln(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
