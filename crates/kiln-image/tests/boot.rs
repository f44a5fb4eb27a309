//! End-to-end: a tiny boot sector, written into every format by kiln-image, really boots
//! under QEMU (SeaBIOS, TCG) and prints a marker on the debug console (port 0xE9).

mod common;

use common::*;
use kiln_image::{convert, write_boot_iso, Format};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"KILN-BOOT-OK";

/// `mov al, c; out 0xE9, al` for each marker byte, then `cli; hlt; jmp $-1`.
fn marker_boot_sector() -> [u8; 512] {
    let mut b = [0u8; 512];
    let mut i = 0;
    for &c in MARKER {
        b[i..i + 4].copy_from_slice(&[0xB0, c, 0xE6, 0xE9]);
        i += 4;
    }
    b[i..i + 4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]);
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn boots(dir: &Path, args: &[&str], what: &str) {
    let con = dir.join(format!("debugcon-{}.txt", what.replace('/', "_")));
    let _ = std::fs::remove_file(&con);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "pc,accel=tcg",
        "-m",
        "32",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-debugcon",
    ])
    .arg(format!("file:{}", con.display()))
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64 ({e}); install qemu-system-x86"));
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < Duration::from_secs(60) {
        if std::fs::read(&con)
            .map(|d| d.windows(MARKER.len()).any(|w| w == MARKER))
            .unwrap_or(false)
        {
            ok = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: qemu exited ({status}) without booting: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ok,
        "{what}: marker not seen on the debug console within 60 s"
    );
}

#[test]
fn every_format_boots_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("boot.raw");
    make_sparse(&raw, MIB, &[(300_000, 5000)]);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&marker_boot_sector(), 0).unwrap();
    for fmt in [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vdi,
    ] {
        let out = dir.path().join(format!("boot-out.{}", fmt.name()));
        convert(&raw, &out, fmt, &mut |_, _| {}).unwrap();
        let drive = format!("file={},format={},if=ide", out.display(), qemu_fmt(fmt));
        boots(dir.path(), &["-drive", &drive, "-boot", "c"], fmt.name());
    }
    let iso = dir.path().join("boot.iso");
    write_boot_iso(&marker_boot_sector(), &iso).unwrap();
    boots(dir.path(), &["-cdrom", p(&iso), "-boot", "d"], "iso");
}
