//! Guests that check the firmware tables and services the way an OS or boot loader
//! finds them: ACPI by scanning for the RSDP, E820, int 11h/12h/1Ah, int 13h writes,
//! and `sti; hlt` waiting for input.

mod common;

use std::time::Duration;

use common::{
    boot_sector, disk_address_packet, disk_image, hard_disk_vm, kvm_or_skip, run_to_end, s5,
};
use iced_x86::code_asm::*;
use kiln_vmm::{ExitReason, FileDisk, MemDisk, VmConfig};

fn putc(a: &mut CodeAssembler, c: u8) -> Result<(), iced_x86::IcedError> {
    a.mov(ax, 0x0e00 | u32::from(c))?;
    a.int(0x10)
}

/// Points ES:BX at the linear address in EAX (below 1 MiB).
fn lin_to_es_bx(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(ebx, eax)?;
    a.shr(eax, 4)?;
    a.mov(es, ax)?;
    a.and(bx, 15)
}

#[test]
fn acpi_tables_e820_and_bios_data() {
    if !kvm_or_skip("acpi_tables_e820_and_bios_data") {
        return;
    }
    let sector = boot_sector(
        |a| {
            let mut scan = a.create_label();
            let mut next = a.create_label();
            let mut found = a.create_label();
            let mut fail = a.create_label();
            let mut e820 = a.create_label();
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            // Scan E000..FFFF (16-byte steps) for "RSD PTR ".
            a.mov(cx, 0xe000)?;
            a.set_label(&mut scan)?;
            a.mov(es, cx)?;
            a.cmp(dword_ptr(0).es(), 0x2044_5352)?; // "RSD "
            a.jne(next)?;
            a.cmp(dword_ptr(4).es(), 0x2052_5450)?; // "PTR "
            a.je(found)?;
            a.set_label(&mut next)?;
            a.inc(cx)?;
            a.jnz(scan)?;
            a.jmp(fail)?;
            a.set_label(&mut found)?;
            putc(a, b'R')?;
            // RSDT -> first entry must be the FADT.
            a.mov(eax, dword_ptr(16).es())?;
            lin_to_es_bx(a)?;
            a.cmp(dword_ptr(bx).es(), 0x5444_5352)?; // "RSDT"
            a.jne(fail)?;
            a.mov(eax, dword_ptr(bx + 36).es())?;
            lin_to_es_bx(a)?;
            a.cmp(dword_ptr(bx).es(), 0x5043_4146)?; // "FACP"
            a.jne(fail)?;
            a.cmp(dword_ptr(bx + 56).es(), 0x600)?;
            a.jne(fail)?;
            a.cmp(dword_ptr(bx + 64).es(), 0x604)?;
            a.jne(fail)?;
            putc(a, b'F')?;
            // DSDT starts its AML with Name(_S5_, Package(4){0, ...}).
            a.mov(eax, dword_ptr(bx + 40).es())?;
            lin_to_es_bx(a)?;
            a.cmp(dword_ptr(bx).es(), 0x5444_5344)?; // "DSDT"
            a.jne(fail)?;
            a.cmp(dword_ptr(bx + 37).es(), 0x5f35_535f)?; // "_S5_"
            a.jne(fail)?;
            a.cmp(byte_ptr(bx + 44).es(), 0)?; // SLP_TYPa = Zero
            a.jne(fail)?;
            putc(a, b'S')?;
            // E820: count entries into SI.
            a.xor(ax, ax)?;
            a.mov(es, ax)?;
            a.xor(ebx, ebx)?;
            a.xor(si, si)?;
            a.set_label(&mut e820)?;
            a.mov(eax, 0xe820)?;
            a.mov(edx, 0x534d_4150)?;
            a.mov(ecx, 24)?;
            a.mov(di, 0x9000)?;
            a.int(0x15)?;
            a.jc(fail)?;
            a.cmp(eax, 0x534d_4150)?;
            a.jne(fail)?;
            a.inc(si)?;
            a.test(ebx, ebx)?;
            a.jnz(e820)?;
            // Last entry: RAM from 1 MiB, 15 MiB long, type 1.
            a.cmp(dword_ptr(0x9000), 0x10_0000)?;
            a.jne(fail)?;
            a.cmp(dword_ptr(0x9008), 15 << 20)?;
            a.jne(fail)?;
            a.mov(ax, si)?;
            a.add(al, b'0' as u32)?;
            a.mov(ah, 0x0e)?;
            a.int(0x10)?;
            // int 12h: 639 KiB; int 11h: one serial port; BDA COM1 = 0x3F8.
            a.int(0x12)?;
            a.cmp(ax, 639)?;
            a.jne(fail)?;
            a.int(0x11)?;
            a.and(ax, 0x0e00)?;
            a.cmp(ax, 0x0200)?;
            a.jne(fail)?;
            a.cmp(word_ptr(0x400), 0x3f8)?;
            a.jne(fail)?;
            putc(a, b'M')?;
            // int 1Ah: RTC time succeeds, tick count is non-zero-ish (CX:DX valid).
            a.mov(ah, 0x02)?;
            a.int(0x1a)?;
            a.jc(fail)?;
            a.mov(ah, 0x00)?;
            a.int(0x1a)?;
            putc(a, b'T')?;
            s5(a)?;
            a.set_label(&mut fail)?;
            putc(a, b'X')?;
            a.cli()?;
            a.hlt()
        },
        0x1f0,
        &[],
    );
    let (r, text) = run_to_end(
        VmConfig::default(),
        Box::new(MemDisk::new(disk_image(&sector, 1 << 20))),
    );
    let r = r.expect("run");
    assert_eq!((r, text.as_str()), (ExitReason::PoweredOff, "RFS4MT"));
}

#[test]
fn int13_write_reaches_the_disk_file() {
    if !kvm_or_skip("int13_write_reaches_the_disk_file") {
        return;
    }
    // Write 0x7C00 (this boot sector) to CHS sector 3 and, via AH=43h, LBA 7.
    let sector = boot_sector(
        |a| {
            let mut fail = a.create_label();
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(byte_ptr(0x7e00), dl)?;
            a.mov(ax, 0x0301)?;
            a.mov(cx, 0x0003)?;
            a.mov(dh, 0)?;
            a.mov(bx, 0x7c00)?;
            a.int(0x13)?;
            a.jc(fail)?;
            disk_address_packet(a, 0x7c00, 7)?;
            a.mov(ax, 0x4300)?;
            a.mov(dl, byte_ptr(0x7e00))?;
            a.int(0x13)?;
            a.jc(fail)?;
            putc(a, b'W')?;
            s5(a)?;
            a.set_label(&mut fail)?;
            putc(a, b'X')?;
            a.cli()?;
            a.hlt()
        },
        0x1f0,
        &[],
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), disk_image(&sector, 64 * 1024)).unwrap();
    let disk = FileDisk::open(file.path(), false).unwrap();
    let (r, text) = run_to_end(VmConfig::default(), Box::new(disk));
    let r = r.expect("run");
    assert_eq!((r, text.as_str()), (ExitReason::PoweredOff, "W"));
    let data = std::fs::read(file.path()).unwrap();
    assert_eq!(&data[2 * 512..3 * 512], &sector[..]);
    assert_eq!(&data[7 * 512..8 * 512], &sector[..]);
    assert!(data[512..1024].iter().all(|&b| b == 0));
}

#[test]
fn sti_hlt_sleeps_until_input() {
    if !kvm_or_skip("sti_hlt_sleeps_until_input") {
        return;
    }
    let sector = boot_sector(
        |a| {
            let mut idle = a.create_label();
            a.set_label(&mut idle)?;
            a.sti()?;
            a.hlt()?;
            a.mov(ah, 0x01)?;
            a.int(0x16)?;
            a.jz(idle)?;
            a.mov(ah, 0x00)?;
            a.int(0x16)?;
            a.mov(ah, 0x0e)?;
            a.int(0x10)?;
            s5(a)
        },
        0x1f0,
        &[],
    );
    let (mut vm, out) = hard_disk_vm(&sector);
    let h = vm.handle();
    let h2 = h.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        h2.send_input(b"z");
    });
    assert_eq!(vm.run().unwrap(), ExitReason::PoweredOff);
    assert_eq!(out.text(), "z");
    // 300 ms of idling must not be a busy loop: about one hlt per 55 ms, woken early by input.
    let c = h.counters();
    assert!(c.hlt >= 1 && c.hlt <= 12, "hlt exits: {c:?}");
}
