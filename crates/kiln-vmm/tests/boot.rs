//! End-to-end boots of small guests assembled with iced-x86.

mod common;

use std::time::{Duration, Instant};

use common::{
    boot_sector, disk_address_packet, disk_image, hard_disk_vm, kvm_or_skip, print_si, run_to_end,
    s5, Capture,
};
use iced_x86::code_asm::*;
use kiln_vmm::{BootDevice, ExitReason, MemDisk, VideoOutput, Vm, VmConfig, VmmError};

/// An echo guest like kiln's boot program: COM1 init, banner via int 10h and COM1,
/// PWRBTN_EN set and checked, then a loop echoing serial lines reversed while polling
/// PM1a_STS for the power button, which triggers S5.
fn echo_guest() -> Vec<u8> {
    const BANNER: u16 = 0x7c00 + 0x180;
    const BUF: u16 = 0x8000;
    const LEN: u16 = 0x7e00;
    boot_sector(
        |a| {
            let mut putc = a.create_label();
            let mut bloop = a.create_label();
            let mut bdone = a.create_label();
            let mut main = a.create_label();
            let mut eol = a.create_label();
            let mut rev = a.create_label();
            let mut revdone = a.create_label();
            let mut off = a.create_label();
            let mut fail = a.create_label();
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(word_ptr(LEN as u32), 0)?;
            // COM1: 115200 8N1, FIFO on.
            for (port, val) in [
                (0x3f9u16, 0u8),
                (0x3fb, 0x80),
                (0x3f8, 1),
                (0x3f9, 0),
                (0x3fb, 3),
                (0x3fa, 0xc7),
            ] {
                a.mov(dx, port as u32)?;
                a.mov(al, val as u32)?;
                a.out(dx, al)?;
            }
            a.mov(si, BANNER as u32)?;
            a.set_label(&mut bloop)?;
            a.lodsb()?;
            a.test(al, al)?;
            a.jz(bdone)?;
            a.mov(ah, 0x0e)?;
            a.mov(bx, 7)?;
            a.int(0x10)?;
            a.call(putc)?;
            a.jmp(bloop)?;
            a.set_label(&mut bdone)?;
            // PWRBTN_EN, and check it reads back.
            a.mov(dx, 0x602)?;
            a.mov(ax, 0x100)?;
            a.out(dx, ax)?;
            a.in_(ax, dx)?;
            a.cmp(ax, 0x100)?;
            a.jne(fail)?;
            a.set_label(&mut main)?;
            a.mov(dx, 0x600)?;
            a.in_(ax, dx)?;
            a.test(ax, 0x100)?;
            a.jnz(off)?;
            a.mov(dx, 0x3fd)?;
            a.in_(al, dx)?;
            a.test(al, 1)?;
            a.jz(main)?;
            a.mov(dx, 0x3f8)?;
            a.in_(al, dx)?;
            a.cmp(al, 13)?;
            a.je(eol)?;
            a.mov(di, word_ptr(LEN as u32))?;
            a.mov(byte_ptr(di + BUF as i32), al)?;
            a.inc(word_ptr(LEN as u32))?;
            a.jmp(main)?;
            a.set_label(&mut eol)?;
            a.mov(di, word_ptr(LEN as u32))?;
            a.set_label(&mut rev)?;
            a.test(di, di)?;
            a.jz(revdone)?;
            a.dec(di)?;
            a.mov(al, byte_ptr(di + BUF as i32))?;
            a.call(putc)?;
            a.jmp(rev)?;
            a.set_label(&mut revdone)?;
            a.mov(word_ptr(LEN as u32), 0)?;
            a.mov(al, 13)?;
            a.call(putc)?;
            a.mov(al, 10)?;
            a.call(putc)?;
            a.jmp(main)?;
            a.set_label(&mut off)?;
            a.mov(dx, 0x604)?;
            a.mov(ax, 0x2000)?;
            a.out(dx, ax)?;
            a.set_label(&mut fail)?;
            a.cli()?;
            a.hlt()?;
            // putc: wait for THR empty, send AL.
            a.set_label(&mut putc)?;
            a.push(ax)?;
            a.push(dx)?;
            let mut w = a.create_label();
            a.mov(dx, 0x3fd)?;
            a.set_label(&mut w)?;
            a.in_(al, dx)?;
            a.test(al, 0x20)?;
            a.jz(w)?;
            a.pop(dx)?;
            a.pop(ax)?;
            a.push(dx)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, al)?;
            a.pop(dx)?;
            a.ret()
        },
        0x180,
        b"ClientAPI\r\n\0",
    )
}

#[test]
fn banner_echo_and_power_button() {
    if !kvm_or_skip("banner_echo_and_power_button") {
        return;
    }
    let out = Capture::default();
    let config = VmConfig {
        video: VideoOutput::VgaOnly,
        ..VmConfig::default()
    };
    let t0 = Instant::now();
    let mut vm = Vm::new(
        config,
        Box::new(MemDisk::new(disk_image(&echo_guest(), 1 << 20))),
        Box::new(out.clone()),
    )
    .expect("create VM");
    let created = t0.elapsed();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || {
        let r = vm.run();
        (r, vm)
    });
    let banner_at = out.wait_for("ClientAPI\r\n", Duration::from_secs(10));
    let at_banner = handle.counters();
    eprintln!(
        "MEASURE: Vm::new {:?}, Vm::new -> banner {:?}, exits to banner {:?}",
        created,
        banner_at - t0,
        at_banner
    );
    handle.send_input(b"hello\r");
    out.wait_for("olleh\r\n", Duration::from_secs(10));
    handle.send_input(b"kiln vmm\r");
    out.wait_for("mmv nlik\r\n", Duration::from_secs(10));
    handle.press_power_button();
    let (result, vm) = runner.join().unwrap();
    assert_eq!(result.unwrap(), ExitReason::PoweredOff);
    // int 10h output went to the VGA buffer only.
    assert!(
        vm.screen_text().starts_with("ClientAPI"),
        "{}",
        vm.screen_text()
    );
    assert_eq!(out.text().matches("ClientAPI").count(), 1);
    let c = vm.counters();
    eprintln!("MEASURE: total exits {c:?}");
    assert!(c.bios >= 11 && c.io >= c.bios && c.total >= c.io);
}

#[test]
fn int13_reads_sectors_chs_and_lba() {
    if !kvm_or_skip("int13_reads_sectors_chs_and_lba") {
        return;
    }
    let sector = boot_sector(
        |a| {
            let mut print = a.create_label();
            let mut fail = a.create_label();
            let mut start = a.create_label();
            a.jmp(start)?;
            // Subroutine first so its label exists.
            let p = print_si(a)?;
            a.set_label(&mut start)?;
            let _ = &mut print;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(byte_ptr(0x7e00), dl)?; // boot drive
                                          // CHS read: cylinder 0, head 0, sectors 2..4 (3 sectors) to 0x8000.
            a.mov(ax, 0x0203)?;
            a.mov(cx, 0x0002)?;
            a.mov(dh, 0)?;
            a.mov(bx, 0x8000)?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.cmp(al, 3)?;
            a.jne(fail)?;
            for off in [0x8000u32, 0x8200, 0x8400] {
                a.mov(si, off)?;
                a.call(p)?;
            }
            // Extensions present?
            a.mov(ah, 0x41)?;
            a.mov(bx, 0x55aa)?;
            a.mov(dl, byte_ptr(0x7e00))?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.cmp(bx, 0xaa55)?;
            a.jne(fail)?;
            // LBA read of sector 5 via a DAP at 0x7e10.
            disk_address_packet(a, 0x9000, 5)?;
            a.mov(ah, 0x42)?;
            a.mov(dl, byte_ptr(0x7e00))?;
            a.int(0x13)?;
            a.jc(fail)?;
            a.mov(si, 0x9000)?;
            a.call(p)?;
            // Reading past the end must fail with CF set.
            a.mov(dword_ptr(0x7e18), 0x10_0000)?;
            a.mov(si, 0x7e10)?;
            a.mov(ah, 0x42)?;
            a.mov(dl, byte_ptr(0x7e00))?;
            a.int(0x13)?;
            a.jnc(fail)?;
            a.mov(si, 0x7d80)?;
            a.call(p)?;
            s5(a)?;
            a.set_label(&mut fail)?;
            a.mov(si, 0x7d90)?;
            a.call(p)?;
            a.cli()?;
            a.hlt()
        },
        0x180,
        b"END\r\n\0\0\0\0\0\0\0\0\0\0\0FAIL\r\n\0",
    );
    let mut disk = disk_image(&sector, 1 << 20);
    for (lba, text) in [
        (1usize, &b"alpha "[..]),
        (2, b"beta "),
        (3, b"gamma\r\n"),
        (5, b"lba-five\r\n"),
    ] {
        disk[lba * 512..lba * 512 + text.len()].copy_from_slice(text);
    }
    let (r, text) = run_to_end(VmConfig::default(), Box::new(MemDisk::new(disk)));
    assert_eq!(r.unwrap(), ExitReason::PoweredOff, "console: {text:?}");
    assert_eq!(text, "alpha beta gamma\r\nlba-five\r\nEND\r\n");
}

#[test]
fn int16_keys_from_console_input() {
    if !kvm_or_skip("int16_keys_from_console_input") {
        return;
    }
    // Echo keys (AH=00h, blocking) until 'q'; report the scan code of Enter as '#'.
    let sector = boot_sector(
        |a| {
            let mut lp = a.create_label();
            let mut quit = a.create_label();
            let mut put = a.create_label();
            a.set_label(&mut lp)?;
            a.mov(ah, 0x01)?;
            a.int(0x16)?; // peek: ZF=1 when no key (exercise it)
            a.mov(ah, 0x00)?;
            a.int(0x16)?;
            a.cmp(al, b'q' as u32)?;
            a.je(quit)?;
            a.cmp(ah, 0x1c)?;
            a.jne(put)?;
            a.mov(al, b'#' as u32)?;
            a.set_label(&mut put)?;
            a.mov(ah, 0x0e)?;
            a.int(0x10)?;
            a.jmp(lp)?;
            a.set_label(&mut quit)?;
            s5(a)
        },
        0x100,
        &[],
    );
    let (mut vm, out) = hard_disk_vm(&sector);
    let h = vm.handle();
    let t = std::thread::spawn(move || vm.run());
    std::thread::sleep(Duration::from_millis(50));
    h.send_input(b"ab\n");
    out.wait_for("ab#", Duration::from_secs(10));
    h.send_input(b"cq");
    assert_eq!(t.join().unwrap().unwrap(), ExitReason::PoweredOff);
    assert_eq!(out.text(), "ab#c");
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !kvm_or_skip("triple_fault_is_a_clear_error") {
        return;
    }
    // Protected mode with an empty IDT, then an exception: #GP -> #DF -> triple fault.
    let sector = boot_sector(
        |a| {
            a.cli()?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(dword_ptr(0x6000), 0)?;
            a.mov(word_ptr(0x6004), 0)?;
            a.lidt(ptr(0x6000))?;
            a.mov(eax, cr0)?;
            a.or(eax, 1)?;
            a.mov(cr0, eax)?;
            a.int3()?;
            a.hlt()
        },
        0x100,
        &[],
    );
    let t0 = Instant::now();
    let (r, _) = run_to_end(
        VmConfig::default(),
        Box::new(MemDisk::new(disk_image(&sector, 1 << 20))),
    );
    let err = r.expect_err("triple fault must be an error");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            VmmError::TripleFault { .. } | VmmError::InternalError { .. }
        ),
        "unexpected error {err}"
    );
    eprintln!("triple fault reported as: {err}");
}

#[test]
fn cpu_exception_in_real_mode_is_reported() {
    if !kvm_or_skip("cpu_exception_in_real_mode_is_reported") {
        return;
    }
    // Divide by zero goes through the BIOS vector 0 stub, which reports it.
    let sector = boot_sector(
        |a| {
            a.xor(ax, ax)?;
            a.xor(cx, cx)?;
            a.div(cl)?;
            a.hlt()
        },
        0x100,
        &[],
    );
    let (r, _) = run_to_end(
        VmConfig::default(),
        Box::new(MemDisk::new(disk_image(&sector, 1 << 20))),
    );
    match r {
        Err(VmmError::GuestException {
            vector: 0,
            cs: 0,
            ip,
        }) => assert_eq!(ip, 0x7c04),
        other => panic!("expected divide error, got {other:?}"),
    }
}

#[test]
fn unknown_ports_read_all_ones_and_cli_hlt_halts() {
    if !kvm_or_skip("unknown_ports_read_all_ones_and_cli_hlt_halts") {
        return;
    }
    let sector = boot_sector(
        |a| {
            let mut bad = a.create_label();
            a.mov(dx, 0x1234)?;
            a.in_(al, dx)?;
            a.cmp(al, 0xff)?;
            a.jne(bad)?;
            a.in_(ax, dx)?;
            a.cmp(ax, 0xffff)?;
            a.jne(bad)?;
            a.out(dx, al)?;
            a.out(0x80, al)?;
            // The VGA window is RAM: what is written reads back, at no exit.
            a.mov(ax, 0xa000)?;
            a.mov(ds, ax)?;
            a.mov(byte_ptr(0x10), 0x5a)?;
            a.mov(al, byte_ptr(0x10))?;
            a.cmp(al, 0x5a)?;
            a.jne(bad)?;
            a.mov(ax, 0x0e00 | b'O' as u32)?;
            a.int(0x10)?;
            a.mov(al, b'K' as u32)?;
            a.int(0x10)?;
            a.cli()?;
            a.hlt()?;
            a.set_label(&mut bad)?;
            a.mov(ax, 0x0e00 | b'X' as u32)?;
            a.int(0x10)?;
            a.cli()?;
            a.hlt()
        },
        0x100,
        &[],
    );
    let (mut vm, out) = hard_disk_vm(&sector);
    assert_eq!(vm.run().unwrap(), ExitReason::Halted);
    assert_eq!(out.text(), "OK");
    assert_eq!(vm.counters().mmio, 0);
}

#[test]
fn kill_stops_a_spinning_guest() {
    if !kvm_or_skip("kill_stops_a_spinning_guest") {
        return;
    }
    let sector = boot_sector(
        |a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.jmp(l)
        },
        0x100,
        &[],
    );
    let (mut vm, _) = hard_disk_vm(&sector);
    let h = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        h.kill();
    });
    let t0 = Instant::now();
    assert_eq!(vm.run().unwrap(), ExitReason::Killed);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn i8042_reset_returns_reset() {
    if !kvm_or_skip("i8042_reset_returns_reset") {
        return;
    }
    let sector = boot_sector(
        |a| {
            a.mov(al, 0xfe)?;
            a.out(0x64, al)?;
            a.hlt()
        },
        0x100,
        &[],
    );
    let (mut vm, _) = hard_disk_vm(&sector);
    assert_eq!(vm.run().unwrap(), ExitReason::Reset);
    // Running again reboots from the disk and resets again.
    assert_eq!(vm.run().unwrap(), ExitReason::Reset);
}

#[test]
fn missing_signature_is_not_bootable() {
    if !kvm_or_skip("missing_signature_is_not_bootable") {
        return;
    }
    let err = Vm::new(
        VmConfig::default(),
        Box::new(MemDisk::new(vec![0u8; 4096])),
        Box::new(std::io::sink()),
    )
    .expect_err("no 55AA");
    assert!(matches!(err, VmmError::NotBootable(_)), "{err}");
    assert!(err.to_string().contains("55 AA"), "{err}");
}

#[test]
fn floppy_boot_dl_and_geometry() {
    if !kvm_or_skip("floppy_boot_dl_and_geometry") {
        return;
    }
    // Prints 'F' if DL=0, then 'G' if int 13h AH=08h reports 18 sectors / 2 heads.
    let sector = boot_sector(
        |a| {
            let mut bad = a.create_label();
            a.test(dl, dl)?;
            a.jnz(bad)?;
            a.mov(ax, 0x0e00 | b'F' as u32)?;
            a.int(0x10)?;
            a.mov(ah, 0x08)?;
            a.xor(dl, dl)?;
            a.int(0x13)?;
            a.jc(bad)?;
            a.and(cl, 0x3f)?;
            a.cmp(cl, 18)?;
            a.jne(bad)?;
            a.cmp(dh, 1)?;
            a.jne(bad)?;
            a.mov(ax, 0x0e00 | b'G' as u32)?;
            a.int(0x10)?;
            s5(a)?;
            a.set_label(&mut bad)?;
            a.mov(ax, 0x0e00 | b'X' as u32)?;
            a.int(0x10)?;
            a.cli()?;
            a.hlt()
        },
        0x100,
        &[],
    );
    let config = VmConfig {
        boot: BootDevice::Floppy,
        ..VmConfig::default()
    };
    let (r, text) = run_to_end(
        config,
        Box::new(MemDisk::new(disk_image(&sector, 1_474_560))),
    );
    assert_eq!(r.unwrap(), ExitReason::PoweredOff);
    assert_eq!(text, "FG");
}
