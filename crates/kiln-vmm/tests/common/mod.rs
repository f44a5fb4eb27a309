//! Shared helpers for kiln-vmm integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::CodeAssembler;

/// Returns false (test should skip) when /dev/kvm is unusable, unless KILN_REQUIRE_KVM=1.
pub fn kvm_or_skip(test: &str) -> bool {
    match kiln_vmm::kvm_available() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("KILN_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: KVM required (KILN_REQUIRE_KVM=1) but unavailable: {e}");
            }
            eprintln!("SKIP {test}: KVM unavailable: {e}");
            false
        }
    }
}

/// A console sink tests can read while the VM runs.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// Waits until the output contains `needle`; panics with the output after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if self.text().contains(needle) {
                return Instant::now();
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {needle:?}; console so far: {:?}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Assembles 16-bit code at 0x7C00 with `body`, appends `data` at sector offset
/// `data_off` (address 0x7C00 + data_off) and the 55AA signature.
pub fn boot_sector(
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    data_off: usize,
    data: &[u8],
) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    body(&mut a).unwrap();
    let code = a.assemble(0x7c00).unwrap();
    assert!(
        code.len() <= data_off,
        "code ({} bytes) overlaps data",
        code.len()
    );
    assert!(data_off + data.len() <= 510);
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(&code);
    s[data_off..data_off + data.len()].copy_from_slice(data);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// A raw disk image of `size` bytes starting with `sector0`.
pub fn disk_image(sector0: &[u8], size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..sector0.len()].copy_from_slice(sector0);
    d
}

/// A console sink that records the time and exit counters at the moment the output
/// first contains `needle` (for measuring time/exits to the banner).
#[derive(Clone)]
pub struct BannerProbe {
    pub capture: Capture,
    needle: &'static str,
    pub handle: Arc<std::sync::OnceLock<kiln_vmm::VmHandle>>,
    pub hit: Arc<std::sync::OnceLock<(Instant, kiln_vmm::ExitCounters)>>,
}

impl BannerProbe {
    pub fn new(needle: &'static str) -> BannerProbe {
        BannerProbe {
            capture: Capture::default(),
            needle,
            handle: Arc::default(),
            hit: Arc::default(),
        }
    }
}

impl Write for BannerProbe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.capture.write(buf)?;
        if self.hit.get().is_none() && self.capture.text().contains(self.needle) {
            let now = Instant::now();
            if let Some(h) = self.handle.get() {
                let _ = self.hit.set((now, h.counters()));
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prints the NUL-terminated string at SI with int 10h (clobbers AX, BX, SI); returns the
/// subroutine's label for `call`.
pub fn print_si(
    a: &mut iced_x86::code_asm::CodeAssembler,
) -> Result<iced_x86::code_asm::CodeLabel, iced_x86::IcedError> {
    use iced_x86::code_asm::*;
    let mut l = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.mov(ah, 0x0e)?;
    a.mov(bx, 7)?;
    a.int(0x10)?;
    a.jmp(l)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(l)
}

/// Powers the VM off through PM1a_CNT (SLP_EN | S5), then halts.
pub fn s5(a: &mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError> {
    use iced_x86::code_asm::*;
    a.mov(dx, 0x604)?;
    a.mov(ax, 0x2000)?;
    a.out(dx, ax)?;
    a.cli()?;
    a.hlt()
}

/// Runs a VM to its end and returns the result with the console text. A watchdog kills it after
/// 20 s so a broken guest fails the test instead of hanging it.
pub fn run_to_end(
    config: kiln_vmm::VmConfig,
    disk: Box<dyn kiln_vmm::Disk>,
) -> (Result<kiln_vmm::ExitReason, kiln_vmm::VmmError>, String) {
    let out = Capture::default();
    let mut vm = kiln_vmm::Vm::new(config, disk, Box::new(out.clone())).expect("create VM");
    let handle = vm.handle();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(20));
        handle.kill();
    });
    let r = vm.run();
    (r, out.text())
}

/// Builds an int 13h extensions disk address packet at 0:7E10 for one sector at `lba` into
/// 0:`buf`, and points DS:SI at it.
pub fn disk_address_packet(
    a: &mut iced_x86::code_asm::CodeAssembler,
    buf: u32,
    lba: u32,
) -> Result<(), iced_x86::IcedError> {
    use iced_x86::code_asm::*;
    a.mov(word_ptr(0x7e10), 0x0010)?; // size 16, reserved 0
    a.mov(word_ptr(0x7e12), 1)?; // one sector
    a.mov(word_ptr(0x7e14), buf)?; // offset
    a.mov(word_ptr(0x7e16), 0)?; // segment
    a.mov(dword_ptr(0x7e18), lba)?;
    a.mov(dword_ptr(0x7e1c), 0)?;
    a.mov(si, 0x7e10)
}

/// A VM booting `sector` from a 1 MiB hard disk, with its console captured.
pub fn hard_disk_vm(sector: &[u8]) -> (kiln_vmm::Vm, Capture) {
    let out = Capture::default();
    let vm = kiln_vmm::Vm::new(
        kiln_vmm::VmConfig::default(),
        Box::new(kiln_vmm::MemDisk::new(disk_image(sector, 1 << 20))),
        Box::new(out.clone()),
    )
    .expect("create VM");
    (vm, out)
}

/// A small terminal: renders console bytes (UTF-8 text, CR, LF, BS and the ANSI cursor
/// moves, erase and colour sequences SeaBIOS and kiln-vmm send) into the screen a
/// `width`-column terminal would show, with xterm's deferred wrap at the last column.
pub struct Term {
    width: usize,
    rows: Vec<Vec<char>>,
    /// Cursor (row, col).
    pub cursor: (usize, usize),
    wrap_pending: bool,
}

impl Term {
    pub fn new(width: usize) -> Term {
        Term {
            width,
            rows: vec![Vec::new()],
            cursor: (0, 0),
            wrap_pending: false,
        }
    }

    /// Renders `bytes` on a fresh terminal `width` columns wide.
    pub fn render(bytes: &[u8], width: usize) -> Term {
        let mut t = Term::new(width);
        t.feed(bytes);
        t
    }

    fn row_mut(&mut self, row: usize) -> &mut Vec<char> {
        while self.rows.len() <= row {
            self.rows.push(Vec::new());
        }
        &mut self.rows[row]
    }

    fn put(&mut self, c: char) {
        if self.wrap_pending {
            self.cursor = (self.cursor.0 + 1, 0);
            self.wrap_pending = false;
        }
        let (r, col) = self.cursor;
        let row = self.row_mut(r);
        while row.len() <= col {
            row.push(' ');
        }
        row[col] = c;
        if col + 1 == self.width {
            self.wrap_pending = true;
        } else {
            self.cursor.1 += 1;
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    self.cursor.1 = 0;
                    self.wrap_pending = false;
                }
                '\n' => {
                    self.cursor.0 += 1;
                    self.wrap_pending = false;
                }
                '\x08' => {
                    self.cursor.1 = self.cursor.1.saturating_sub(1);
                    self.wrap_pending = false;
                }
                '\x07' => {}
                '\x1b' => {
                    assert_eq!(chars.next(), Some('['), "unknown escape in {text:?}");
                    let mut params = String::new();
                    let cmd = loop {
                        match chars.next() {
                            Some(c @ ('0'..='9' | ';' | '?')) => params.push(c),
                            Some(c) => break c,
                            None => panic!("unterminated escape in {text:?}"),
                        }
                    };
                    let nums: Vec<usize> =
                        params.split(';').map(|p| p.parse().unwrap_or(0)).collect();
                    let n = nums.first().copied().unwrap_or(0).max(1);
                    self.wrap_pending = false;
                    match cmd {
                        'A' => self.cursor.0 = self.cursor.0.saturating_sub(n),
                        'B' => self.cursor.0 += n,
                        'C' => self.cursor.1 = (self.cursor.1 + n).min(self.width - 1),
                        'D' => self.cursor.1 = self.cursor.1.saturating_sub(n),
                        'H' => {
                            let col = nums.get(1).copied().unwrap_or(1).max(1);
                            self.cursor = (n - 1, col - 1);
                        }
                        'J' if nums.first() == Some(&2) => {
                            self.rows.iter_mut().for_each(|r| r.clear());
                        }
                        'm' => {}
                        other => panic!("unexpected escape {params:?}{other} in {text:?}"),
                    }
                }
                c if (c as u32) < 0x20 => panic!("raw control {:#x} in {text:?}", c as u32),
                c => self.put(c),
            }
        }
    }

    /// The screen: rows joined by newlines, trailing blanks and blank last rows trimmed.
    pub fn text(&self) -> String {
        let mut lines: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .collect::<String>()
                    .trim_end_matches(' ')
                    .to_string()
            })
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines.join("\n")
    }
}

/// A tracing subscriber that keeps WARN messages (and nothing else), for checking how
/// much the VMM logs; use with `tracing::subscriber::with_default` on the vCPU thread.
#[derive(Clone, Default)]
pub struct Warnings(pub Arc<Mutex<Vec<String>>>);

struct MessageVisitor(String);

impl tracing::field::Visit for MessageVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut v = MessageVisitor(String::new());
            event.record(&mut v);
            self.0.lock().unwrap().push(v.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
