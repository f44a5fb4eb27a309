//! Boots the real program in QEMU (TCG) as a disk and as a CD and drives it:
//! banner on COM1, the reversing REPL, and ACPI power-off via QMP
//! `system_powerdown`. Needs `qemu-system-x86_64` (and `xorriso` for the CD).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::disk_image;

const QEMU: &str = "qemu-system-x86_64";

struct Guest {
    child: Child,
    stdin: ChildStdin,
    serial: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    qmp: PathBuf,
}

impl Guest {
    fn boot(dir: &Path, machine: &str, media: &[String]) -> Guest {
        let qmp = dir.join(format!("qmp-{machine}.sock"));
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-machine",
            machine,
            "-accel",
            "tcg",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp.display()))
        .args(media)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {QEMU} (is it installed?): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, serial) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            stdin,
            serial,
            pending: Vec::new(),
            qmp,
        }
    }

    /// Serial output up to and including `pat`.
    fn expect(&mut self, pat: &[u8], timeout: Duration) -> Vec<u8> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.windows(pat.len()).position(|w| w == pat) {
                let rest = self.pending.split_off(i + pat.len());
                return std::mem::replace(&mut self.pending, rest);
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.serial.recv_timeout(left) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(_) => panic!(
                    "timed out waiting for {:?}; serial so far: {:?}",
                    String::from_utf8_lossy(pat),
                    String::from_utf8_lossy(&self.pending)
                ),
            }
        }
    }

    /// Send `input` and require exactly `reply` as the next serial output.
    fn roundtrip(&mut self, input: &[u8], reply: &[u8]) {
        self.stdin.write_all(input).expect("write to guest serial");
        self.stdin.flush().expect("flush guest serial");
        let got = self.expect(reply, Duration::from_secs(20));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(reply),
            "reply to {:?}",
            String::from_utf8_lossy(input)
        );
    }

    /// QMP `system_powerdown`; returns the SHUTDOWN event and how long QEMU took to exit.
    fn powerdown(mut self) -> (serde_json::Value, Duration) {
        let stream = UnixStream::connect(&self.qmp).expect("connect QMP socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("QMP timeout");
        let mut writer = stream.try_clone().expect("clone QMP socket");
        let mut lines = BufReader::new(stream).lines();
        let mut next = || -> Option<serde_json::Value> {
            let line = lines.next()?.ok()?;
            Some(serde_json::from_str(&line).expect("QMP sends JSON"))
        };
        next().expect("QMP greeting");
        writer
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .expect("QMP write");
        assert!(next().expect("capabilities reply").get("return").is_some());
        let mut hmp = |cmd: &str| -> String {
            let req = serde_json::json!({"execute": "human-monitor-command", "arguments": {"command-line": cmd}});
            writer
                .write_all(format!("{req}\n").as_bytes())
                .expect("QMP write");
            loop {
                let msg = next().expect("HMP reply");
                if let Some(text) = msg.get("return") {
                    return text.as_str().unwrap_or_default().to_owned();
                }
            }
        };
        // The FADT discovery leaves EDI on the DSDT's "_S5_" name and BP/SI on
        // PM1a_EVT_BLK/PM1a_CNT_BLK read from the FADT (QEMU + SeaBIOS: 0x600/0x604).
        // The program idles in hlt with interrupts on, so a snapshot may catch the CPU in a
        // BIOS interrupt handler: take one while it runs the program's own code.
        let in_program = |regs: &str| -> bool {
            let hex = |s: Option<&str>| s.and_then(|s| u64::from_str_radix(s, 16).ok());
            // `CS =SEL BASE LIMIT FLAGS` and `EIP=XXXXXXXX`.
            let cs_base = regs
                .find("CS =")
                .and_then(|at| hex(regs[at + 4..].split_whitespace().nth(1)));
            let eip = regs
                .find("EIP=")
                .and_then(|at| hex(regs[at + 4..].get(..8)));
            match (cs_base, eip) {
                (Some(base), Some(ip)) => (0x7C00..0x7D00).contains(&(base + ip)),
                _ => false,
            }
        };
        let mut regs = hmp("info registers");
        for _ in 0..200 {
            if in_program(&regs) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            regs = hmp("info registers");
        }
        assert!(
            in_program(&regs),
            "never caught the CPU in the program: {regs}"
        );
        let reg = |name: &str| -> u64 {
            let at = regs
                .find(&format!("{name}="))
                .unwrap_or_else(|| panic!("no {name} in {regs}"));
            let hex = &regs[at + name.len() + 1..][..8];
            u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{name}={hex}: {e}"))
        };
        assert_eq!(reg("EBP"), 0x600, "PM1a_EVT_BLK");
        assert_eq!(reg("ESI"), 0x604, "PM1a_CNT_BLK");
        // BL holds the high byte of the PM1a_CNT word; BH stays 0 (the video page).
        assert_eq!(reg("EBX"), 0x20, "SLP_EN | SLP_TYP(S5 = 0) >> 8");
        let s5 = hmp(&format!("xp /4bx {:#x}", reg("EDI")));
        assert!(
            s5.contains("0x5f 0x53 0x35 0x5f"),
            "EDI does not point at _S5_: {s5}"
        );
        let start = Instant::now();
        writer
            .write_all(b"{\"execute\":\"system_powerdown\"}\n")
            .expect("QMP write");
        let mut shutdown = None;
        while let Some(msg) = next() {
            if msg["event"] == "SHUTDOWN" {
                shutdown = Some(msg);
                break;
            }
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for QEMU") {
                break status;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                panic!("QEMU still running 10 s after system_powerdown");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = start.elapsed();
        assert!(status.success(), "QEMU exit status {status}");
        (shutdown.expect("a SHUTDOWN event"), took)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Only reached on failure paths (powerdown consumes a passing guest
        // after QEMU exited); make sure no QEMU outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the program prints for a typed line whose kept characters are `kept`: the echo,
/// CR LF, the line reversed, CR LF and the prompt.
fn answer(kept: &[u8]) -> Vec<u8> {
    let mut want = kept.to_vec();
    want.extend_from_slice(b"\r\n");
    want.extend(kept.iter().rev());
    want.extend_from_slice(b"\r\n$ ");
    want
}

fn exercise(dir: &Path, machine: &str, media: &[String]) {
    let mut g = Guest::boot(dir, machine, media);
    let banner = g.expect(b"$ ", Duration::from_secs(30));
    assert_eq!(banner, format!("{}\r\n$ ", kiln_boot::BANNER).as_bytes());
    g.roundtrip(b"hello\r", &answer(b"hello"));
    g.roundtrip(b"hello\n", &answer(b"hello"));
    // The LF of a CR LF pair is an empty line and prints nothing.
    g.roundtrip(b"hello\r\n", &answer(b"hello"));
    g.roundtrip(b"\r\n\nab\r", &answer(b"ab"));
    let line80: Vec<u8> = (0..80u32).map(|i| b'!' + ((i * 7) % 90) as u8).collect();
    let mut input = line80.clone();
    input.push(b'\r');
    g.roundtrip(&input, &answer(&line80));
    // 100 characters: only the first 80 are kept (and echoed).
    let line100: Vec<u8> = (0..100u32).map(|i| b'0' + ((i * 11) % 70) as u8).collect();
    let mut input = line100.clone();
    input.push(b'\n');
    g.roundtrip(&input, &answer(&line100[..80]));

    let (event, took) = g.powerdown();
    assert_eq!(event["data"]["guest"], true, "{event}");
    assert_eq!(event["data"]["reason"], "guest-shutdown", "{event}");
    assert!(took < Duration::from_secs(3), "power-off took {took:?}");
}

#[test]
fn boots_from_disk_on_pc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = disk_image(dir.path());
    exercise(
        dir.path(),
        "pc",
        &[
            "-drive".into(),
            format!("file={},format=raw", img.display()),
        ],
    );
}

#[test]
fn boots_from_disk_on_q35() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = disk_image(dir.path());
    exercise(
        dir.path(),
        "q35",
        &[
            "-drive".into(),
            format!("file={},format=raw", img.display()),
        ],
    );
}

fn boot_cd(machine: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("iso");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(
        root.join("boot.bin"),
        kiln_boot::program().expect("program"),
    )
    .expect("write boot.bin");
    let iso = dir.path().join("boot.iso");
    let out = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-b",
            "boot.bin",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-o",
        ])
        .arg(&iso)
        .arg(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run xorriso (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "xorriso failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exercise(
        dir.path(),
        machine,
        &["-cdrom".into(), iso.display().to_string()],
    );
}

/// El Torito no-emulation boot: SeaBIOS jumps to 07C0:0000 with the CD drive in DL.
#[test]
fn boots_from_cd_on_pc() {
    boot_cd("pc");
}

#[test]
fn boots_from_cd_on_q35() {
    boot_cd("q35");
}
