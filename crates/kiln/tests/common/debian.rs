//! The cached Debian test image and guest shell sessions over the console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// True when tests that need root and a real guest must fail instead of skipping.
pub fn required() -> bool {
    std::env::var("KILN_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// The Debian image, built once per machine under `$KILN_TEST_CACHE` (default /var/tmp) and
/// reused. `None` (with a message) when not root, unless KILN_REQUIRE_KVM=1.
pub fn debian_image() -> Option<PathBuf> {
    cached_image(&kiln_rootfs::DebianOptions::default())
}

/// The i386 Debian image for v86 (`kiln image debian --arch i386`), cached like the amd64 one.
#[allow(dead_code)]
pub fn debian_i386_image() -> Option<PathBuf> {
    cached_image(&kiln_rootfs::DebianOptions {
        arch: kiln_rootfs::tree::Arch::I386,
        ..kiln_rootfs::DebianOptions::default()
    })
}

fn cached_image(opts: &kiln_rootfs::DebianOptions) -> Option<PathBuf> {
    if !kiln_sys::process::is_root() {
        assert!(
            !required(),
            "KILN_REQUIRE_KVM=1 but not root: building the Debian image needs root"
        );
        eprintln!("SKIP: building the Debian test image needs root (debootstrap)");
        return None;
    }
    let cache = std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let t0 = Instant::now();
    let dir = kiln_rootfs::cached_debian_image(opts, &cache, &mut |s| eprintln!("image: {s}"))
        .unwrap_or_else(|e| panic!("building the Debian test image failed: {e}"));
    eprintln!("image {} ready in {:?}", dir.display(), t0.elapsed());
    Some(dir)
}

/// Waits until `log` contains `needle`.
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            let tail: String = text
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(format!(
                "'{needle}' not in {} after {timeout:?}; last lines:\n{tail}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A root shell on a guest's serial console.
pub struct Shell {
    stream: UnixStream,
    seq: u32,
}

impl Shell {
    pub fn connect(socket: &Path) -> Shell {
        let stream =
            UnixStream::connect(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Shell { stream, seq: 0 }
    }

    /// Runs `cmd` in the guest shell and returns its output (stdout and stderr).
    pub fn run(&mut self, cmd: &str) -> String {
        self.seq += 1;
        let n = self.seq;
        // Markers are split in the typed line so the terminal's echo of it never matches;
        // the output is what lies between the printed start and end markers.
        let line = format!("echo \"__KS\"\"_{n}__\"; {cmd} 2>&1; echo \"__KE\"\"_{n}__\"\n");
        self.stream.write_all(line.as_bytes()).unwrap();
        let (start, end) = (format!("__KS_{n}__"), format!("__KE_{n}__"));
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let (Some(a), Some(b)) = (text.find(&start), text.find(&end)) {
                if a < b {
                    return without_kernel_messages(&strip_ansi(&text[a + start.len()..b]))
                        .trim()
                        .to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no answer to `{cmd}` within 60 s; got: {text}"
            );
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("console closed while running `{cmd}`; got: {text}"),
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("console read: {e}"),
            }
        }
    }
}

/// `s` without the kernel's own console messages (`[   42.26] clocksource: ...`), which the
/// kernel prints on the serial console whenever it likes (a loaded host makes TCG guests warn
/// about their TSC), in the middle of a command's output.
fn without_kernel_messages(s: &str) -> String {
    s.lines()
        .filter(|l| {
            let t = l.trim_start();
            let Some(rest) = t.strip_prefix('[') else {
                return true;
            };
            let stamp = rest.split(']').next().unwrap_or_default().trim();
            !(rest.contains(']')
                && !stamp.is_empty()
                && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && stamp.contains('.'))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// sha256 of a file (sha256sum).
pub fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
