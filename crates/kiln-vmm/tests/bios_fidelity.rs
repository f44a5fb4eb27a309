//! A corpus of small BIOS-only boot sectors of the kinds third-party programs are: text
//! through int 10h (AH=0Eh, AH=09h/0Ah with counts, code page 437), mode 13h graphics,
//! int 14h serial I/O, and a guest poking ports and MMIO nobody handles. Each runs on the
//! builtin VMM; the console must show what the program wrote.

mod common;

use std::time::Duration;

use common::{boot_sector, disk_image, hard_disk_vm, kvm_or_skip, run_to_end, s5, Capture, Term};
use iced_x86::code_asm::*;
use kiln_vmm::{ExitReason, MemDisk, VideoOutput, Vm, VmConfig};

type R = Result<(), iced_x86::IcedError>;

fn tty(a: &mut CodeAssembler, c: u8) -> R {
    a.mov(ax, 0x0e00 | u32::from(c))?;
    a.int(0x10)
}

fn tty_str(a: &mut CodeAssembler, s: &[u8]) -> R {
    s.iter().try_for_each(|&c| tty(a, c))
}

/// int 10h AH (09h or 0Ah): CX copies of `c`, attribute BL = 1Fh.
fn write_n(a: &mut CodeAssembler, func: u8, c: u8, n: u16) -> R {
    a.mov(ax, (u32::from(func) << 8) | u32::from(c))?;
    a.mov(bx, 0x001f)?;
    a.mov(cx, u32::from(n))?;
    a.int(0x10)
}

fn goto(a: &mut CodeAssembler, row: u8, col: u8) -> R {
    a.mov(ah, 0x02)?;
    a.xor(bh, bh)?;
    a.mov(dx, (u32::from(row) << 8) | u32::from(col))?;
    a.int(0x10)
}

/// (a): what a text program writes, as the VGA screen must hold it.
const TEXT_SCREEN: &str = concat!(
    "Hello, ABxxx\n",
    "abZ\n",
    "éß▒▒▒! ?\n",
    "                                                                            <===\n",
    "====\n",
    "end"
);

/// Where the QEMU variant of a program marks that it is done (first byte after the BDA).
const DONE_FLAG: u32 = 0x500;

/// The text program; it powers off, or (for QEMU, whose monitor then reads the screen)
/// sets [`DONE_FLAG`] and halts.
fn text_program(power_off: bool) -> Vec<u8> {
    boot_sector(
        |a| {
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(ax, 0x0003)?;
            a.int(0x10)?;
            // Row 0: teletype, then five x's in place (the cursor stays), then "AB" over them.
            tty_str(a, b"Hello, ")?;
            write_n(a, 0x09, b'x', 5)?;
            tty_str(a, b"AB\r\n")?;
            // Row 1: a line editor's backspace: BS, blank the cell with AH=0Ah, go on typing.
            tty_str(a, b"abc\x08")?;
            write_n(a, 0x0a, b' ', 1)?;
            tty_str(a, b"Zq\x08")?;
            write_n(a, 0x0a, b' ', 1)?;
            tty_str(a, b"\r\n")?;
            // Row 2: code page 437 (e acute, sharp s, shades), a cursor move, a NUL.
            tty_str(a, &[0x82, 0xe1])?;
            write_n(a, 0x09, 0xb1, 3)?;
            goto(a, 2, 5)?;
            tty_str(a, b"!\0?")?;
            // Rows 3-4: AH=09h running past the end of a row, then one char over its start.
            goto(a, 3, 76)?;
            write_n(a, 0x09, b'=', 8)?;
            tty(a, b'<')?;
            goto(a, 5, 0)?;
            tty_str(a, b"end")?;
            if power_off {
                s5(a)
            } else {
                a.mov(byte_ptr(DONE_FLAG), 0xaa)?;
                a.cli()?;
                a.hlt()
            }
        },
        0x1f0,
        &[],
    )
}

#[test]
fn text_program_terminal_shows_the_screen() {
    if !kvm_or_skip("text_program_terminal_shows_the_screen") {
        return;
    }
    let (mut vm, out) = hard_disk_vm(&text_program(true));
    let watchdog = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        watchdog.kill();
    });
    assert_eq!(vm.run().unwrap(), ExitReason::PoweredOff);
    let bytes = out.0.lock().unwrap().clone();
    // Exactly that on a terminal of 80 columns and on a wider one, with the terminal's
    // cursor where the BIOS cursor ended (row 5, column 3).
    for width in [80, 132] {
        let term = Term::render(&bytes, width);
        assert_eq!(
            term.text(),
            TEXT_SCREEN,
            "width {width}, console bytes {:?}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(term.cursor, (5, 3), "width {width}");
    }
    // No NUL and no raw code page 437 bytes reach the terminal.
    assert!(std::str::from_utf8(&bytes).is_ok(), "{bytes:?}");
    assert!(!bytes.contains(&0));
    // And the VGA screen holds the same.
    assert_eq!(vm.screen_text().trim_end_matches('\n'), TEXT_SCREEN);
}

/// QEMU's binary; fails the test with a clear message when QEMU is not installed (CI
/// installs it, as for kiln's own QEMU tests).
fn require_qemu() -> &'static str {
    let qemu = "qemu-system-x86_64";
    let found = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{qemu} is not installed: run scripts/setup (apt-get install qemu-system-x86)"
    );
    qemu
}

/// Kills a child process when dropped (a failing test leaks no QEMU).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The 80x25 text screen in `vga` (character/attribute pairs) as text, like
/// `Vm::screen_text`.
fn decode_screen(vga: &[u8]) -> String {
    let rows: Vec<String> = vga
        .chunks(160)
        .map(|row| {
            let line: String = row
                .chunks(2)
                .map(|c| match c[0] {
                    0 => ' ',
                    b => kiln_vmm::firmware::cp437(b),
                })
                .collect();
            line.trim_end_matches(' ').to_string()
        })
        .collect();
    rows.join("\n").trim_end_matches('\n').to_string()
}

/// The same text program on QEMU with SeaBIOS and its VGA BIOS: the screen and cursor the
/// real VGA BIOS leaves must be the ones the builtin VMM shows (on its screen, checked side
/// by side here, and by the test above on the terminal).
#[test]
fn text_program_screen_matches_qemu_seabios() {
    use std::io::{BufRead, Write};
    let (dir, mut child) = qemu_pc(&text_program(false), Stdio::Monitor);
    let mut monitor = child.0.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    'wait: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the program did not finish on QEMU"
        );
        writeln!(monitor, "xp /1bx {DONE_FLAG:#x}").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        while let Ok(line) = rx.try_recv() {
            if line.contains(&format!("{DONE_FLAG:x}: 0xaa")) {
                break 'wait;
            }
        }
    }
    let vga = dir.path().join("vga.bin");
    let bda = dir.path().join("bda.bin");
    writeln!(monitor, "pmemsave 0xb8000 4000 \"{}\"", vga.display()).unwrap();
    writeln!(monitor, "pmemsave 0x450 2 \"{}\"", bda.display()).unwrap();
    writeln!(monitor, "quit").unwrap();
    let _ = child.0.wait();
    let vga = std::fs::read(vga).expect("QEMU saved the screen");
    let cursor = std::fs::read(bda).expect("QEMU saved the cursor");
    let seabios = decode_screen(&vga);
    assert_eq!(seabios, TEXT_SCREEN);
    assert_eq!((cursor[1], cursor[0]), (5, 3), "cursor row, column");
    // Side by side: the same program (halting, too) on the builtin VMM.
    if kvm_or_skip("text_program_screen_matches_qemu_seabios (builtin side)") {
        let (mut vm, _) = hard_disk_vm(&text_program(false));
        assert_eq!(vm.run().unwrap(), ExitReason::Halted);
        assert_eq!(vm.screen_text().trim_end_matches('\n'), seabios);
    }
}

/// Writes `s` straight to COM1's THR.
fn com1_str(a: &mut CodeAssembler, s: &[u8]) -> R {
    a.mov(dx, 0x3f8)?;
    s.iter().try_for_each(|&c| {
        a.mov(al, u32::from(c))?;
        a.out(dx, al)
    })
}

/// (b): mode 13h, `rep stosw` into A0000, `unsupported` (a mode the BIOS lacks) refused,
/// 40x25 text, back to 80x25 text. The verdict goes to COM1 too: `OK`, or `X` and the
/// letter of the failed check.
fn mode13h_program(unsupported: u8) -> Vec<u8> {
    boot_sector(
        |a| {
            let mut fail = a.create_label();
            let get_mode = |a: &mut CodeAssembler| -> R {
                a.mov(ah, 0x0f)?;
                a.int(0x10)
            };
            tty_str(a, b"pre")?;
            a.mov(ax, 0x0013)?;
            a.int(0x10)?;
            a.cmp(al, 0x20)?; // SeaBIOS's AL for modes above 7
            a.mov(si, 1)?;
            a.jne(fail)?;
            get_mode(a)?;
            a.cmp(ax, 0x2813)?; // 40 columns, mode 13h
            a.mov(si, 2)?;
            a.jne(fail)?;
            // Ten lines of colour 15, as drawing code does it.
            a.mov(ax, 0xa000)?;
            a.mov(es, ax)?;
            a.xor(di, di)?;
            a.mov(ax, 0x0f0f)?;
            a.mov(cx, 1600)?;
            a.cld()?;
            a.rep().stosw()?;
            a.cmp(word_ptr(3198).es(), 0x0f0f)?;
            a.mov(si, 3)?;
            a.jne(fail)?;
            a.cmp(word_ptr(3200).es(), 0)?; // cleared by the mode set
            a.mov(si, 4)?;
            a.jne(fail)?;
            // Text in a graphics mode moves the cursor but reaches no terminal (SeaBIOS).
            tty_str(a, b"gfx")?;
            // An unsupported mode changes nothing.
            a.mov(ax, u32::from(unsupported))?;
            a.int(0x10)?;
            get_mode(a)?;
            a.cmp(al, 0x13)?;
            a.mov(si, 5)?;
            a.jne(fail)?;
            // (Pixel row 9: below the glyphs a VGA BIOS draws for "gfx".)
            a.cmp(word_ptr(9 * 320).es(), 0x0f0f)?;
            a.mov(si, 6)?;
            a.jne(fail)?;
            // 40x25 text, then 80x25 text again.
            a.mov(ax, 0x0001)?;
            a.int(0x10)?;
            get_mode(a)?;
            a.cmp(ax, 0x2801)?;
            a.mov(si, 7)?;
            a.jne(fail)?;
            a.mov(ax, 0x0003)?;
            a.int(0x10)?;
            a.cmp(al, 0x30)?;
            a.mov(si, 8)?;
            a.jne(fail)?;
            get_mode(a)?;
            a.cmp(ax, 0x5003)?;
            a.mov(si, 9)?;
            a.jne(fail)?;
            tty_str(a, b"mode 13h ok\r\n")?;
            com1_str(a, b"OK")?;
            s5(a)?;
            a.set_label(&mut fail)?;
            tty_str(a, b"FAIL")?;
            // X and the failed check's letter (B = the first), then power off.
            com1_str(a, b"X")?;
            a.mov(ax, si)?;
            a.add(al, u32::from(b'A'))?;
            a.out(dx, al)?;
            s5(a)
        },
        0x1f0,
        &[],
    )
}

/// (b) on the builtin VMM, refusing mode 12h (640x480x16 planar, which it lacks).
#[test]
fn mode13h_program_draws_and_returns_to_text() {
    if !kvm_or_skip("mode13h_program_draws_and_returns_to_text") {
        return;
    }
    let sector = mode13h_program(0x12);
    let (r, text) = run_to_end(
        VmConfig::default(),
        Box::new(MemDisk::new(disk_image(&sector, 1 << 20))),
    );
    assert_eq!(r.unwrap(), ExitReason::PoweredOff, "console: {text:?}");
    // Each clearing mode set starts the mirrored screen on a fresh terminal line.
    assert_eq!(text, "pre\r\nmode 13h ok\r\nOK");
}

/// (b) passes the same checks on QEMU + SeaBIOS's VGA BIOS as on the builtin VMM, side by
/// side (refusing mode 14h, which the VGA BIOS lacks too).
#[test]
fn mode13h_program_passes_on_qemu_seabios() {
    let sector = mode13h_program(0x14);
    assert_eq!(run_on_qemu(&sector, None), "OK");
    if kvm_or_skip("mode13h_program_passes_on_qemu_seabios (builtin side)") {
        assert_eq!(run_on_builtin(&sector, None), "OK");
    }
}

/// (c): int 14h on COM1: AH=00h at 1200 baud (checked in the UART's registers), a banner
/// through AH=01h, one byte through AH=02h sent back in brackets, AH=03h status, then COM2
/// (absent) must fail with CF (and, `strict`, AH=80h as the builtin BIOS reports it;
/// SeaBIOS leaves AH as it was). Prints `X` on COM1 and powers off on any failure.
fn int14_program(strict: bool) -> Vec<u8> {
    const MSG: u16 = 0x7c00 + 0x1c0;
    boot_sector(
        |a| {
            let mut fail = a.create_label();
            let mut send = a.create_label();
            let mut sent = a.create_label();
            let mut putc = a.create_label();
            let mut start = a.create_label();
            a.jmp(start)?;
            // putc: AL out through int 14h AH=01h; must succeed and keep AL.
            a.set_label(&mut putc)?;
            a.mov(bl, al)?;
            a.xor(dx, dx)?;
            a.mov(ah, 0x01)?;
            a.int(0x14)?;
            a.jc(fail)?;
            a.test(ah, 0x80)?;
            a.jnz(fail)?;
            a.cmp(al, bl)?;
            a.jne(fail)?;
            a.ret()?;
            a.set_label(&mut start)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            // 1200 baud, no parity, 1 stop bit, 8 bits.
            a.xor(dx, dx)?;
            a.mov(ax, 0x0083)?;
            a.int(0x14)?;
            a.jc(fail)?;
            a.test(ah, 0x80)?;
            a.jnz(fail)?;
            // The UART has LCR = 03h and divisor 96.
            a.mov(dx, 0x3fb)?;
            a.in_(al, dx)?;
            a.cmp(al, 0x03)?;
            a.jne(fail)?;
            a.mov(al, 0x83)?;
            a.out(dx, al)?;
            a.mov(dx, 0x3f8)?;
            a.in_(ax, dx)?; // DLL, DLM
            a.cmp(ax, 96)?;
            a.jne(fail)?;
            a.mov(dx, 0x3fb)?;
            a.mov(al, 0x03)?;
            a.out(dx, al)?;
            // Banner.
            a.mov(si, MSG as u32)?;
            a.set_label(&mut send)?;
            a.lodsb()?;
            a.test(al, al)?;
            a.jz(sent)?;
            a.call(putc)?;
            a.jmp(send)?;
            a.set_label(&mut sent)?;
            // Wait for a byte and send it back in brackets.
            a.xor(dx, dx)?;
            a.mov(ah, 0x02)?;
            a.int(0x14)?;
            a.jc(fail)?;
            a.test(ah, 0x80)?;
            a.jnz(fail)?;
            a.mov(cl, al)?;
            a.mov(al, b'[' as u32)?;
            a.call(putc)?;
            a.mov(al, cl)?;
            a.call(putc)?;
            a.mov(al, b']' as u32)?;
            a.call(putc)?;
            // Status: transmitter empty, nothing more received.
            a.xor(dx, dx)?;
            a.mov(ah, 0x03)?;
            a.int(0x14)?;
            a.jc(fail)?;
            a.and(ah, 0x61)?;
            a.cmp(ah, 0x60)?;
            a.jne(fail)?;
            // COM2 does not exist: timeout, CF set.
            a.mov(dx, 1)?;
            a.mov(ax, 0x0158)?;
            a.int(0x14)?;
            a.jnc(fail)?;
            if strict {
                a.cmp(ah, 0x80)?;
                a.jne(fail)?;
            }
            a.mov(al, b'.' as u32)?;
            a.call(putc)?;
            s5(a)?;
            a.set_label(&mut fail)?;
            com1_str(a, b"X")?;
            s5(a)
        },
        0x1c0,
        b"int14 hi\r\n\0",
    )
}

/// (c) on the builtin VMM: exactly that output, and no exits while AH=02h waits.
#[test]
fn int14_initialises_sends_and_receives_on_com1() {
    if !kvm_or_skip("int14_initialises_sends_and_receives_on_com1") {
        return;
    }
    let sector = int14_program(true);
    let out = Capture::default();
    let config = VmConfig {
        video: VideoOutput::VgaOnly,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(
        config,
        Box::new(MemDisk::new(disk_image(&sector, 1 << 20))),
        Box::new(out.clone()),
    )
    .expect("create VM");
    let h = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    out.wait_for("int14 hi\r\n", Duration::from_secs(10));
    // Blocked in AH=02h: 300 ms must cost (almost) no exits.
    let before = h.counters();
    std::thread::sleep(Duration::from_millis(300));
    let waiting = h.counters().total - before.total;
    assert!(waiting <= 5, "{waiting} exits while waiting for a byte");
    h.send_input(b"k");
    let watchdog = h.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        watchdog.kill();
    });
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::PoweredOff);
    assert_eq!(out.text(), "int14 hi\r\n[k].");
}

/// (d): a guest reading and writing 256 unclaimed ports and four pages of unclaimed MMIO
/// (through unreal mode) gets all-ones and one warning per 16 ports and per page.
#[test]
fn unknown_ports_and_mmio_are_logged_once_per_region() {
    if !kvm_or_skip("unknown_ports_and_mmio_are_logged_once_per_region") {
        return;
    }
    const GDT: u16 = 0x7c00 + 0x1c0;
    const GDTR: u16 = GDT + 16;
    let mut data = vec![0u8; 8];
    data.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0x92, 0xcf, 0]); // flat 4 GiB data
    data.extend_from_slice(&15u16.to_le_bytes());
    data.extend_from_slice(&u32::from(GDT).to_le_bytes());
    let sector = boot_sector(
        |a| {
            let mut ports = a.create_label();
            let mut pages = a.create_label();
            let mut fail = a.create_label();
            a.cli()?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(dx, 0x100)?;
            a.set_label(&mut ports)?;
            a.in_(al, dx)?;
            a.cmp(al, 0xff)?;
            a.jne(fail)?;
            a.out(dx, al)?;
            a.inc(dx)?;
            a.cmp(dx, 0x200)?;
            a.jne(ports)?;
            // Unreal mode: DS with a 4 GiB limit.
            a.lgdt(ptr(u32::from(GDTR)))?;
            a.mov(eax, cr0)?;
            a.inc(ax)?;
            a.mov(cr0, eax)?;
            a.push(8)?;
            a.pop(ds)?;
            a.dec(ax)?;
            a.mov(cr0, eax)?;
            a.mov(esi, 0xe000_0000u32)?;
            a.set_label(&mut pages)?;
            a.mov(al, byte_ptr(esi))?;
            a.cmp(al, 0xff)?;
            a.jne(fail)?;
            a.mov(byte_ptr(esi), al)?;
            a.add(esi, 0x100)?;
            a.cmp(esi, 0xe000_4000u32)?;
            a.jb(pages)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            tty(a, b'O')?;
            tty(a, b'K')?;
            s5(a)?;
            a.set_label(&mut fail)?;
            tty(a, b'X')?;
            a.hlt()
        },
        0x1c0,
        &data,
    );
    let warnings = common::Warnings::default();
    let (mut vm, out) = hard_disk_vm(&sector);
    let r = tracing::subscriber::with_default(warnings.clone(), || vm.run());
    assert_eq!(r.unwrap(), ExitReason::PoweredOff, "{:?}", out.text());
    assert_eq!(out.text(), "OK");
    let c = vm.counters();
    assert!(c.mmio >= 128, "{c:?}");
    let logged = warnings.0.lock().unwrap().clone();
    let pio = logged
        .iter()
        .filter(|w| w.contains("unhandled pio"))
        .count();
    let mmio = logged
        .iter()
        .filter(|w| w.contains("unhandled mmio"))
        .count();
    assert_eq!((pio, mmio), (16, 4), "{logged:#?}");
    assert!(
        logged.iter().any(|w| w.contains("0xe0003000-0xe0003fff")),
        "{logged:#?}"
    );
}

/// What a [`qemu_pc`] connects to its standard input and output.
enum Stdio {
    /// The human monitor (to read guest memory with `xp`).
    Monitor,
    /// COM1.
    Serial,
}

/// Starts QEMU's pc machine (TCG, SeaBIOS, 16 MiB, standard VGA, no display) booting `sector`
/// from a 1 MiB IDE disk, with `stdio` on piped standard input and output. The directory holds
/// the disk for as long as QEMU runs.
fn qemu_pc(sector: &[u8], stdio: Stdio) -> (tempfile::TempDir, KillOnDrop) {
    let qemu = require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("boot.img");
    std::fs::write(&img, disk_image(sector, 1 << 20)).unwrap();
    let (monitor, serial) = match stdio {
        Stdio::Monitor => ("stdio", "none"),
        Stdio::Serial => ("none", "stdio"),
    };
    let child = std::process::Command::new(qemu)
        .args(["-machine", "pc", "-accel", "tcg", "-m", "16", "-nodefaults"])
        .args(["-vga", "std", "-display", "none", "-monitor", monitor])
        .args(["-serial", serial, "-no-reboot", "-drive"])
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start QEMU");
    (dir, KillOnDrop(child))
}

/// Boots `sector` on QEMU (pc, TCG) with SeaBIOS until it powers off and returns what it
/// wrote to COM1; when `answer` is `(after, byte)`, sends `byte` as soon as the output ends
/// with `after`.
fn run_on_qemu(sector: &[u8], answer: Option<(&str, u8)>) -> String {
    use std::io::{Read, Write};
    let (_dir, mut child) = qemu_pc(sector, Stdio::Serial);
    let mut input = child.0.stdin.take().unwrap();
    let mut stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            let _ = tx.send(buf[..n].to_vec());
        }
    });
    let mut out = Vec::new();
    let mut answer = answer;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
        if let Some((after, byte)) = answer {
            if out.ends_with(after.as_bytes()) {
                input.write_all(&[byte]).unwrap();
                input.flush().unwrap();
                answer = None;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU did not power off; serial so far: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (c) prints the same on COM1 on QEMU + SeaBIOS as on the builtin VMM, side by side
/// (SeaBIOS's AH=02h gives up after about half a second, so the byte is sent as soon as the
/// banner is out).
#[test]
fn int14_program_matches_qemu_seabios() {
    let sector = int14_program(false);
    let answer = Some(("int14 hi\r\n", b'k'));
    let seabios = run_on_qemu(&sector, answer);
    assert_eq!(seabios, "int14 hi\r\n[k].");
    if kvm_or_skip("int14_program_matches_qemu_seabios (builtin side)") {
        assert_eq!(run_on_builtin(&sector, answer), seabios);
    }
}

/// Boots `sector` on the builtin VMM (console: COM1 only) until it powers off and returns
/// its COM1 output, answering like [`run_on_qemu`].
fn run_on_builtin(sector: &[u8], answer: Option<(&str, u8)>) -> String {
    let out = Capture::default();
    let config = VmConfig {
        video: VideoOutput::VgaOnly,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(
        config,
        Box::new(MemDisk::new(disk_image(sector, 1 << 20))),
        Box::new(out.clone()),
    )
    .expect("create VM");
    let h = vm.handle();
    let watchdog = h.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        watchdog.kill();
    });
    let runner = std::thread::spawn(move || vm.run());
    if let Some((after, byte)) = answer {
        out.wait_for(after, Duration::from_secs(10));
        h.send_input(&[byte]);
    }
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::PoweredOff);
    out.text()
}
