//! El Torito CD boots built with real xorriso: floppy emulation (1.2M/1.44M/2.88M),
//! hard-disk emulation and no emulation, plus malformed boot catalogs.

mod common;

use std::path::Path;
use std::process::Command;

use common::{boot_sector, kvm_or_skip, print_si, run_to_end, s5};
use iced_x86::code_asm::*;
use kiln_vmm::{BootDevice, ExitReason, MemDisk, Vm, VmConfig, VmmError};

/// Guest scratch: boot drive byte, then the 4Bh specification packet.
const DRIVE: u32 = 0x7e00;
const PACKET: u32 = 0x7e10;
/// Offset of the guest's strings in its boot sector (kept clear of the MBR partition table).
const DATA: usize = 0x170;

/// CHS read of one sector of the boot drive to ES:BX = 0:`buf` (CF from int 13h).
fn read_chs(a: &mut CodeAssembler, (c, h, s): (u32, u32, u32), buf: u32) -> Result<(), IcedError> {
    a.mov(ax, 0x0201)?;
    a.mov(ch, c & 0xff)?;
    a.mov(cl, s | ((c >> 2) & 0xc0))?;
    a.mov(dh, h)?;
    a.mov(dl, byte_ptr(DRIVE))?;
    a.mov(bx, buf)?;
    a.int(0x13)
}

/// What an emulated drive must look like to the guest.
struct Expect {
    drive: u8,
    media: u8,
    sectors: u8,
    max_head: u8,
    far: (u32, u32, u32),
}

/// Boot sector for an emulated drive: prints `marker`, checks DL, reads its own sector 2
/// (CHS 0/0/2) and the sector at `far` and prints both, checks int 13h AH=08h geometry,
/// that a write fails write-protected, that AX=4B01h reports the emulation, and that
/// after AX=4B00h the drive is gone. Prints "OK" and powers off, or "FAIL<n>" and halts.
fn emulated_guest(marker: &str, e: &Expect) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(marker.as_bytes());
    data.extend_from_slice(b"\r\n\0");
    let ok_at = data.len();
    data.extend_from_slice(b"OK\r\n\0");
    let fail_at = data.len();
    data.extend_from_slice(b"FAIL\0");
    let str_addr = |off: usize| (0x7c00 + DATA + off) as u32;
    boot_sector(
        |a| {
            let mut start = a.create_label();
            let mut fail = a.create_label();
            a.jmp(start)?;
            let print = print_si(a)?;
            a.set_label(&mut start)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(byte_ptr(DRIVE), dl)?;
            a.mov(si, str_addr(0))?;
            a.call(print)?;
            // Failure code in BP, printed after "FAIL".
            a.mov(bp, u32::from(b'0'))?;
            a.cmp(byte_ptr(DRIVE), u32::from(e.drive))?;
            a.jne(fail)?;
            a.inc(bp)?;
            read_chs(a, (0, 0, 2), 0x8000)?;
            a.jc(fail)?;
            a.mov(si, 0x8000)?;
            a.call(print)?;
            a.inc(bp)?;
            read_chs(a, e.far, 0x8200)?;
            a.jc(fail)?;
            a.mov(si, 0x8200)?;
            a.call(print)?;
            a.inc(bp)?;
            a.mov(ah, 0x08)?;
            a.mov(dl, byte_ptr(DRIVE))?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.and(cl, 0x3f)?;
            a.cmp(cl, u32::from(e.sectors))?;
            a.jne(fail)?;
            a.cmp(dh, u32::from(e.max_head))?;
            a.jne(fail)?;
            // AH=08h on a floppy points ES:DI at the parameter table.
            a.xor(ax, ax)?;
            a.mov(es, ax)?;
            a.inc(bp)?;
            a.mov(ax, 0x0301)?;
            a.mov(cx, 0x0002)?;
            a.xor(dh, dh)?;
            a.mov(dl, byte_ptr(DRIVE))?;
            a.mov(bx, 0x8000)?;
            a.int(0x13)?;
            a.jnc(fail)?;
            a.cmp(ah, 0x03)?;
            a.jne(fail)?;
            a.inc(bp)?;
            a.mov(ax, 0x4b01)?;
            a.mov(dl, byte_ptr(DRIVE))?;
            a.mov(si, PACKET)?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.cmp(byte_ptr(PACKET + 1), u32::from(e.media))?;
            a.jne(fail)?;
            a.cmp(byte_ptr(PACKET + 2), u32::from(e.drive))?;
            a.jne(fail)?;
            a.inc(bp)?;
            a.mov(ax, 0x4b00)?;
            a.mov(dl, byte_ptr(DRIVE))?;
            a.mov(si, PACKET)?;
            a.int(0x13)?;
            a.jc(fail)?;
            read_chs(a, (0, 0, 2), 0x8000)?;
            a.jnc(fail)?;
            a.mov(si, str_addr(ok_at))?;
            a.call(print)?;
            s5(a)?;
            a.set_label(&mut fail)?;
            a.mov(si, str_addr(fail_at))?;
            a.call(print)?;
            a.mov(ax, bp)?;
            a.mov(ah, 0x0e)?;
            a.int(0x10)?;
            a.cli()?;
            a.hlt()
        },
        DATA,
        &data,
    )
}

/// Runs xorriso's mkisofs emulation on `root` with `args`, returning the ISO bytes.
fn mkisofs(dir: &Path, root: &Path, args: &[&str]) -> Vec<u8> {
    let iso = dir.join("x.iso");
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet"])
        .args(args)
        .args(["-c", "boot.cat", "-o"])
        .arg(&iso)
        .arg(root)
        .output()
        .expect("xorriso must be installed to build the test ISO");
    assert!(
        out.status.success(),
        "xorriso {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&iso).unwrap()
}

/// Builds an ISO whose boot image `name` is `image`, with extra mkisofs `args`.
fn iso_with(name: &str, image: &[u8], args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join(name), image).unwrap();
    let mut all = vec!["-b", name];
    all.extend_from_slice(args);
    mkisofs(dir.path(), &root, &all)
}

fn boot_cd(iso: Vec<u8>) -> (Result<ExitReason, VmmError>, String) {
    let config = VmConfig {
        boot: BootDevice::Cdrom,
        ..VmConfig::default()
    };
    run_to_end(config, Box::new(MemDisk::new(iso)))
}

fn put(image: &mut [u8], lba: usize, text: &str) {
    image[lba * 512..lba * 512 + text.len()].copy_from_slice(text.as_bytes());
}

#[test]
fn floppy_emulation_boots_and_reads_through_int13() {
    if !kvm_or_skip("floppy_emulation_boots_and_reads_through_int13") {
        return;
    }
    for (size, media, sectors) in [
        (1_228_800usize, 1u8, 15u8),
        (1_474_560, 2, 18),
        (2_949_120, 3, 36),
    ] {
        let e = Expect {
            drive: 0x00,
            media,
            sectors,
            max_head: 1,
            // Last sector of the disk: cylinder 79, head 1.
            far: (79, 1, u32::from(sectors)),
        };
        let marker = format!("FLOPPY-EMU-{media}");
        let mut image = vec![0u8; size];
        image[..512].copy_from_slice(&emulated_guest(&marker, &e));
        put(&mut image, 1, &format!("sector two of {size}\r\n\0"));
        put(&mut image, size / 512 - 1, "last sector\r\n\0");
        let iso = iso_with("floppy.img", &image, &[]);
        let (r, text) = boot_cd(iso);
        assert_eq!(
            text,
            format!("{marker}\r\nsector two of {size}\r\nlast sector\r\nOK\r\n")
        );
        assert_eq!(r.unwrap(), ExitReason::PoweredOff);
    }
}

#[test]
fn hard_disk_emulation_boots_with_mbr_geometry() {
    if !kvm_or_skip("hard_disk_emulation_boots_with_mbr_geometry") {
        return;
    }
    // 4 MiB disk, one partition from LBA 63 to the end of cylinder 7 on 16 heads x 63
    // sectors (LBA 8063): end CHS = cylinder 7, head 15, sector 63.
    let e = Expect {
        drive: 0x80,
        media: 4,
        sectors: 63,
        max_head: 15,
        far: (1, 2, 3),
    };
    let mut image = vec![0u8; 4 << 20];
    image[..512].copy_from_slice(&emulated_guest("HDD-EMU", &e));
    let mut part = [0u8; 16];
    part[0] = 0x80;
    part[1..4].copy_from_slice(&[1, 1, 0]);
    part[4] = 0x06;
    part[5..8].copy_from_slice(&[15, 63, 7]);
    part[8..12].copy_from_slice(&63u32.to_le_bytes());
    part[12..16].copy_from_slice(&(8064u32 - 63).to_le_bytes());
    image[446..462].copy_from_slice(&part);
    put(&mut image, 1, "mbr sector two\r\n\0");
    // CHS 1/2/3 on 16 x 63 = LBA (1*16+2)*63 + 2.
    put(&mut image, (16 + 2) * 63 + 2, "chs 1/2/3\r\n\0");
    let iso = iso_with("hd.img", &image, &["-hard-disk-boot"]);
    let (r, text) = boot_cd(iso);
    assert_eq!(text, "HDD-EMU\r\nmbr sector two\r\nchs 1/2/3\r\nOK\r\n");
    assert_eq!(r.unwrap(), ExitReason::PoweredOff);
}

#[test]
fn no_emulation_reports_cd_drive_and_reads_lba() {
    if !kvm_or_skip("no_emulation_reports_cd_drive_and_reads_lba") {
        return;
    }
    // 4 KiB boot image: code in the first 512 bytes, text in its second CD sector, read
    // with int 13h AH=42h at (boot image LBA from AX=4B01h) + 1.
    let sector = boot_sector(
        |a| {
            let mut start = a.create_label();
            let mut fail = a.create_label();
            a.jmp(start)?;
            let print = print_si(a)?;
            a.set_label(&mut start)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(byte_ptr(DRIVE), dl)?;
            a.cmp(dl, 0xe0)?;
            a.jne(fail)?;
            a.mov(ax, 0x4b01)?;
            a.mov(si, PACKET)?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.cmp(byte_ptr(PACKET + 1), 0)?;
            a.jne(fail)?;
            a.cmp(byte_ptr(PACKET + 2), 0xe0)?;
            a.jne(fail)?;
            // DAP at 0x7e40: 1 sector to 0000:8000 from LBA packet.lba + 1.
            a.mov(word_ptr(0x7e40), 0x10)?;
            a.mov(word_ptr(0x7e42), 1)?;
            a.mov(word_ptr(0x7e44), 0x8000)?;
            a.mov(word_ptr(0x7e46), 0)?;
            a.mov(eax, dword_ptr(PACKET + 4))?;
            a.inc(eax)?;
            a.mov(dword_ptr(0x7e48), eax)?;
            a.mov(dword_ptr(0x7e4c), 0)?;
            a.mov(ah, 0x42)?;
            a.mov(dl, byte_ptr(DRIVE))?;
            a.mov(si, 0x7e40)?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.mov(si, 0x8000)?;
            a.call(print)?;
            s5(a)?;
            a.set_label(&mut fail)?;
            a.mov(ax, 0x0e00 | u32::from(b'X'))?;
            a.int(0x10)?;
            a.cli()?;
            a.hlt()
        },
        DATA,
        &[],
    );
    let mut image = vec![0u8; 4096];
    image[..512].copy_from_slice(&sector);
    image[2048..2048 + 13].copy_from_slice(b"no-emu lba\r\n\0");
    let iso = iso_with(
        "boot.bin",
        &image,
        &["-no-emul-boot", "-boot-load-size", "4"],
    );
    let (r, text) = boot_cd(iso);
    assert_eq!(text, "no-emu lba\r\n");
    assert_eq!(r.unwrap(), ExitReason::PoweredOff);
}

/// Patches the initial catalog entry of an ISO made by xorriso.
fn patch_entry(iso: &mut [u8], f: impl FnOnce(&mut [u8])) {
    let b = 17 * 2048 + 0x47;
    let cat = u32::from_le_bytes([iso[b], iso[b + 1], iso[b + 2], iso[b + 3]]) as usize;
    f(&mut iso[cat * 2048 + 32..cat * 2048 + 64]);
}

fn not_bootable(iso: Vec<u8>) -> String {
    let config = VmConfig {
        boot: BootDevice::Cdrom,
        ..VmConfig::default()
    };
    match Vm::new(
        config,
        Box::new(MemDisk::new(iso)),
        Box::new(std::io::sink()),
    ) {
        Err(VmmError::NotBootable(msg)) => msg,
        Err(e) => panic!("expected NotBootable, got {e}"),
        Ok(_) => panic!("expected NotBootable, the VM was created"),
    }
}

#[test]
fn malformed_catalogs_are_not_bootable() {
    if !kvm_or_skip("malformed_catalogs_are_not_bootable") {
        return;
    }
    let mut image = vec![0u8; 1_474_560];
    image[510] = 0x55;
    image[511] = 0xaa;
    let iso = iso_with("floppy.img", &image, &[]);

    let mut bad = iso.clone();
    patch_entry(&mut bad, |e| e[1] = 7);
    let msg = not_bootable(bad);
    assert!(msg.contains("media type 7"), "{msg}");

    let mut bad = iso.clone();
    patch_entry(&mut bad, |e| {
        e[8..12].copy_from_slice(&0x00ff_ffffu32.to_le_bytes())
    });
    let msg = not_bootable(bad);
    assert!(msg.contains("beyond the end"), "{msg}");

    let mut bad = iso.clone();
    patch_entry(&mut bad, |e| e[0] = 0);
    let msg = not_bootable(bad);
    assert!(msg.contains("not marked bootable"), "{msg}");

    let mut bad = iso;
    let b = 17 * 2048 + 0x47;
    let cat = u32::from_le_bytes([bad[b], bad[b + 1], bad[b + 2], bad[b + 3]]) as usize;
    bad[cat * 2048 + 4] ^= 1;
    let msg = not_bootable(bad);
    assert!(msg.contains("validation entry"), "{msg}");
}
