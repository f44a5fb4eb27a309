//! `kiln run --bios-console` on both engines: a floppy whose program loads sector 2 with int 13h
//! and prints it through int 10h, then echoes int 16h keys; both reach the terminal. And kiln's
//! own program, which writes every character to the BIOS screen and COM1, shows its output
//! once on the default console of `kiln run` and of a background `kiln vm run --disk
//! --bios-console` (its console and serial.log), on both engines.

mod common;

use std::time::Duration;

use common::{built, kvm_or_skip, Session};
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
    let quiet = Duration::from_millis(500);
    let shown = s.settle_until("SECTOR-TWO-OK\r\n", Duration::from_secs(30), quiet);
    assert_eq!(shown.matches("SECTOR-TWO-OK").count(), 1, "{shown:?}");
    s.send("abc");
    assert_eq!(s.settle_until("bcd", Duration::from_secs(20), quiet), "bcd");
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

/// How long each wait may take (TCG boots are slow on busy cores), and the quiet that shows a
/// duplicate would have arrived.
const BOOT: Duration = Duration::from_secs(60);
const QUIET: Duration = Duration::from_millis(500);

/// What the console shows of kiln's program, from its first character.
fn program_part<'a>(shown: &'a str, engine: &str) -> &'a str {
    if engine == "qemu" {
        // SeaBIOS's own messages come first, and stay.
        let at = shown
            .find("Booting from Hard Disk...")
            .unwrap_or_else(|| panic!("no SeaBIOS boot message in {shown:?}"));
        &shown[at + "Booting from Hard Disk...".len()..]
    } else {
        shown
    }
}

/// The banner and the REPL's reply, once each, on `s`.
fn dialogue_once(s: &mut Session, engine: &str) {
    let shown = s.settle_until("$ ", BOOT, QUIET);
    let banner = if engine == "qemu" {
        "\r\nClientAPI\r\n$ "
    } else {
        "ClientAPI\r\n$ "
    };
    assert_eq!(
        program_part(&shown, engine),
        banner,
        "{engine}: {shown:?}\nstderr: {}",
        s.stderr()
    );
    s.send("hello\r");
    assert_eq!(
        s.settle_until("olleh\r\n$ ", BOOT, QUIET),
        "hello\r\nolleh\r\n$ ",
        "{engine}"
    );
}

fn foreground_console_shows_the_program_once(engine: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let name = format!("once-{engine}");
    let mut s = Session::start(&[
        "run",
        "--engine",
        engine,
        "--name",
        &name,
        image.to_str().unwrap(),
    ]);
    dialogue_once(&mut s, engine);
    s.send("\x01x");
    let status = s
        .wait(Duration::from_secs(10))
        .expect("Ctrl-A X ends the VM");
    assert!(status.success(), "stderr: {}", s.stderr());
}

#[test]
fn kiln_run_console_shows_the_program_once_builtin() {
    if kvm_or_skip("kiln_run_console_shows_the_program_once_builtin") {
        foreground_console_shows_the_program_once("builtin");
    }
}

#[test]
fn kiln_run_console_shows_the_program_once_qemu() {
    common::require_tool("qemu-system-x86_64");
    foreground_console_shows_the_program_once("qemu");
}

fn background_console_shows_the_program_once(engine: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let name = format!("bg-once-{engine}");
    // A background VM outlives a failed assertion by design: end it with the test.
    let _cleanup = common::KillVmOnDrop(common::kiln_home().to_path_buf(), name.clone());
    let out = common::kiln(&[
        "vm",
        "run",
        "--disk",
        image.to_str().unwrap(),
        "--engine",
        engine,
        "--bios-console",
        "--name",
        &name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The console (its backlog replayed from the start), then the log keeps the same stream.
    let mut s = Session::start(&["console", &name, "--linger", "2"]);
    dialogue_once(&mut s, engine);
    drop(s);
    let out = common::kiln(&["logs", &name]);
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    let out = common::kiln(&["stop", &name, "--timeout", "10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let banner = if engine == "qemu" {
        "\r\nClientAPI\r\n$ hello\r\nolleh\r\n$ "
    } else {
        "ClientAPI\r\n$ hello\r\nolleh\r\n$ "
    };
    assert_eq!(program_part(&log, engine), banner, "serial.log: {log:?}");
    let _ = common::kiln(&["rm", &name]);
}

#[test]
fn vm_run_console_and_log_show_the_program_once_builtin() {
    if kvm_or_skip("vm_run_console_and_log_show_the_program_once_builtin") {
        background_console_shows_the_program_once("builtin");
    }
}

#[test]
fn vm_run_console_and_log_show_the_program_once_qemu() {
    common::require_tool("qemu-system-x86_64");
    background_console_shows_the_program_once("qemu");
}

/// The terminal is relayed by kiln: what the guest printed just before it ended still reaches
/// it (a boot sector that writes `bye!` to COM1 and halts with interrupts off, which ends a
/// builtin VM at once).
#[test]
fn last_output_reaches_the_terminal_before_kiln_run_ends_builtin() {
    if !kvm_or_skip("last_output_reaches_the_terminal_before_kiln_run_ends_builtin") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut prog = vec![0xBA, 0xF8, 0x03]; // mov dx, 0x3F8
    for &c in b"bye!" {
        prog.extend_from_slice(&[0xB0, c, 0xEE]); // mov al, c; out dx, al
    }
    prog.extend_from_slice(&[0xFA, 0xF4]); // cli; hlt
    common::build_program(dir.path(), "bye", &prog);
    let image = dir.path().join("boot.img");
    for _ in 0..5 {
        let mut s = Session::start(&["run", "--engine", "builtin", image.to_str().unwrap()]);
        s.wait(Duration::from_secs(20))
            .expect("a halted guest ends the VM");
        assert_eq!(s.serial(), "bye!", "stderr: {}", s.stderr());
    }
}
