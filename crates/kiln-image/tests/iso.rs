//! The boot CD, checked with xorriso.

mod common;

use common::*;
use kiln_image::{detect, inspect, open, write_boot_iso, Format};

fn xorriso(args: &[&str]) -> String {
    let out = run("xorriso", args);
    assert!(
        out.status.success(),
        "xorriso {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn boot_iso_has_el_torito_entry_and_visible_files() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("boot.iso");
    let bs = boot_sector();
    write_boot_iso(&bs, &iso).unwrap();

    let report = xorriso(&["-indev", p(&iso), "-report_el_torito", "plain"]);
    eprintln!("{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("El Torito boot img :   1"))
        .unwrap_or_else(|| panic!("no boot image in report:\n{report}"));
    assert!(line.contains("BIOS"), "{line}");
    assert!(line.contains("none"), "not no-emulation: {line}");
    assert!(line.contains("0x07c0"), "load segment: {line}");
    assert!(line.contains(" 4 "), "load size 4: {line}");
    assert!(report.contains("/BOOT/BOOT.IMG"), "{report}");
    assert!(report.contains("/BOOT/BOOT.CAT"), "{report}");

    let found = xorriso(&["-indev", p(&iso), "-find", "/", "-exec", "lsdl"]);
    assert!(found.contains("BOOT.IMG"), "{found}");
    assert!(found.contains("BOOT.CAT"), "{found}");

    // Extract the boot file and compare with the boot sector.
    let out = dir.path().join("extracted.img");
    xorriso(&[
        "-osirrox",
        "on",
        "-indev",
        p(&iso),
        "-extract",
        "/BOOT/BOOT.IMG",
        p(&out),
    ]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 2048);
    assert_eq!(&got[..512], &bs[..]);
    assert!(got[512..].iter().all(|&b| b == 0));

    assert_eq!(detect(&iso).unwrap(), Format::Iso);
    let info = inspect(&iso).unwrap();
    assert_eq!(info.format, Format::Iso);
    assert!(info.consistent);
    let mut r = open(&iso).unwrap();
    assert_eq!(r.format(), Format::Iso);
    let mut pvd = [0u8; 6];
    r.read_at(&mut pvd, 0x8000).unwrap();
    assert_eq!(&pvd, b"\x01CD001");
    // No temporary files left.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("kiln-tmp")), "{names:?}");
}

#[test]
fn boot_iso_into_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("nope/boot.iso");
    let err = write_boot_iso(&boot_sector(), &iso).unwrap_err();
    assert!(err.to_string().contains("nope/boot.iso"), "{err}");
}
