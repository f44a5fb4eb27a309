//! The end-to-end test of the program kiln's replaces, as its users run it: plain QEMU
//! (`-machine pc-i440fx-7.2 -display none -no-reboot`), COM1 on a Unix socket, the HMP monitor
//! on another. Read for 2 s: `ClientAPI` and `$ `; type `hello\r` one character every 50 ms:
//! `olleh` within 2 s; `system_powerdown` on the monitor: QEMU exits within 5 s. Plus what the
//! original does better than kiln's used to: an idle guest costs (almost) no host CPU.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Qemu {
    child: Child,
    serial: UnixStream,
    monitor: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(dir: &Path) -> Qemu {
    let img = common::disk_image(dir);
    let (serial, monitor) = (dir.join("serial.sock"), dir.join("monitor.sock"));
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc-i440fx-7.2",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw", img.display()))
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=on", serial.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 runs (install qemu-system-x86)");
    let deadline = Instant::now() + Duration::from_secs(10);
    let serial = loop {
        match UnixStream::connect(&serial) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("QEMU's serial socket: {e}"),
        }
    };
    serial
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    Qemu {
        child,
        serial,
        monitor,
    }
}

impl Qemu {
    /// Everything COM1 says within `window`.
    fn read_for(&mut self, window: Duration) -> Vec<u8> {
        let (mut out, mut buf, end) = (Vec::new(), [0u8; 4096], Instant::now() + window);
        while Instant::now() < end {
            if let Ok(n) = self.serial.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
        }
        out
    }

    /// COM1's output until `want` appears, within `timeout`.
    fn read_until(&mut self, want: &[u8], timeout: Duration) -> Vec<u8> {
        let (mut out, mut buf, end) = (Vec::new(), [0u8; 4096], Instant::now() + timeout);
        while Instant::now() < end && !out.windows(want.len()).any(|w| w == want) {
            if let Ok(n) = self.serial.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
        }
        out
    }

    /// CPU time (user + system) QEMU has used so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / tick)
    }

    fn powerdown_exits_within(mut self, limit: Duration) {
        let mut m = UnixStream::connect(&self.monitor).expect("HMP monitor socket");
        m.write_all(b"system_powerdown\n").unwrap();
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("QEMU still runs {limit:?} after system_powerdown");
    }
}

#[test]
fn the_originals_end_to_end_test_passes() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = boot(dir.path());
    let said = q.read_for(Duration::from_secs(2));
    let text = String::from_utf8_lossy(&said);
    assert!(
        text.contains("ClientAPI") && text.contains("$ "),
        "{text:?}"
    );
    for c in b"hello\r" {
        q.serial.write_all(&[*c]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = q.read_until(b"olleh", Duration::from_secs(2));
    assert!(
        said.windows(5).any(|w| w == b"olleh"),
        "{:?}",
        String::from_utf8_lossy(&said)
    );
    q.powerdown_exits_within(Duration::from_secs(5));
}

#[test]
fn an_idle_guest_costs_no_cpu_and_loses_no_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = boot(dir.path());
    let said = q.read_until(b"$ ", Duration::from_secs(30));
    assert!(
        said.ends_with(b"$ "),
        "{:?}",
        String::from_utf8_lossy(&said)
    );
    let before = q.cpu();
    std::thread::sleep(Duration::from_secs(5));
    let used = q.cpu() - before;
    eprintln!("idle for 5 s: QEMU used {used:?} of CPU");
    assert!(used < Duration::from_millis(500), "idle QEMU used {used:?}");
    // A pasted 80-character line, at full speed, comes back whole.
    let line: Vec<u8> = (0..80u8).map(|i| b'A' + i % 26).collect();
    let mut input = line.clone();
    input.push(b'\r');
    q.serial.write_all(&input).unwrap();
    let reversed: Vec<u8> = line.iter().rev().copied().collect();
    let said = q.read_until(&reversed, Duration::from_secs(20));
    assert!(
        said.windows(80).any(|w| w == reversed),
        "{:?}",
        String::from_utf8_lossy(&said)
    );
    q.powerdown_exits_within(Duration::from_secs(5));
}
