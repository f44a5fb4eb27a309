//! `kiln run --bios-console` on both engines: a floppy whose program loads sector 2 with int 13h
//! and prints it through int 10h, then echoes int 16h keys; both reach the terminal.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, Session};
use iced_x86::code_asm::*;

/// Loads CHS 0/0/2 at 0x7E00 with int 13h, prints its zero-terminated text with int 10h, then
/// echoes every int 16h key as the next character (`a` → `b`), so the echo cannot be the input.
fn floppy_program() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut print = a.create_label();
    let mut keys = a.create_label();
    let mut fail = a.create_label();
    a.cli().unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7C00u32).unwrap();
    a.mov(ax, 0x0201u32).unwrap(); // read 1 sector
    a.mov(cx, 0x0002u32).unwrap(); // cylinder 0, sector 2
    a.xor(dh, dh).unwrap(); // head 0; DL is the boot drive
    a.mov(bx, 0x7E00u32).unwrap();
    a.int(0x13).unwrap();
    a.jc(fail).unwrap();
    a.mov(si, 0x7E00u32).unwrap();
    a.set_label(&mut print).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(keys).unwrap();
    a.mov(ah, 0x0Eu32).unwrap();
    a.int(0x10).unwrap();
    a.jmp(print).unwrap();
    a.set_label(&mut keys).unwrap();
    a.xor(ah, ah).unwrap();
    a.int(0x16).unwrap();
    a.inc(al).unwrap();
    a.mov(ah, 0x0Eu32).unwrap();
    a.int(0x10).unwrap();
    a.jmp(keys).unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(ax, 0x0E21u32).unwrap(); // '!'
    a.int(0x10).unwrap();
    a.hlt().unwrap();
    a.assemble(0x7C00).unwrap()
}

/// Boots the floppy on `engine` with `--bios-console` and drives it through the terminal.
fn floppy_through_the_bios_console(engine: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut image = vec![0u8; 1_474_560];
    let prog = floppy_program();
    assert!(prog.len() <= 510, "test program is {} bytes", prog.len());
    image[..prog.len()].copy_from_slice(&prog);
    image[510..512].copy_from_slice(&[0x55, 0xAA]);
    let text = b"SECTOR-TWO-OK\r\n\0";
    image[512..512 + text.len()].copy_from_slice(text);
    let path = tmp.path().join("floppy.img");
    std::fs::write(&path, &image).unwrap();

    // int 10h output on the terminal, terminal input to int 16h.
    let name = format!("floppy-{engine}");
    let mut s = Session::start(&[
        "run",
        "--engine",
        engine,
        "--bios-console",
        "--name",
        &name,
        path.to_str().unwrap(),
    ]);
    s.expect("SECTOR-TWO-OK\r\n", Duration::from_secs(30));
    s.send("abc");
    s.expect("bcd", Duration::from_secs(20));
    let out = common::kiln(&["kill", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.wait(Duration::from_secs(10)).expect("killed");
}

#[test]
fn floppy_int13_int10_int16_through_the_bios_console_builtin() {
    if kvm_or_skip("floppy_int13_int10_int16_through_the_bios_console_builtin") {
        floppy_through_the_bios_console("builtin");
    }
}

#[test]
fn floppy_int13_int10_int16_through_the_bios_console_qemu() {
    common::require_tool("qemu-system-x86_64");
    floppy_through_the_bios_console("qemu");
}
