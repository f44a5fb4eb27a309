//! Shared helpers for kiln's end-to-end tests: a built image set and a serial session driver.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

pub mod debian;
pub mod netns;

/// A runtime directory of this test process's own, so `kiln ps` sees only its VMs.
pub fn runtime_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("kiln-test-rt-{}", std::process::id())))
}

/// A `$KILN_HOME` of this test process's own, so `kiln ps` sees only its VMs.
pub fn kiln_home() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("kiln-test-home-{}", std::process::id())))
}

/// `kiln` with the test's own state directory.
pub fn kiln_command() -> Command {
    let mut c = Command::new(KILN);
    c.env("KILN_RUNTIME_DIR", runtime_dir());
    c.env("KILN_HOME", kiln_home());
    c
}

/// The registry the `kiln` commands of this test process use, as a library.
pub fn host() -> kiln_host::Host {
    kiln_host::Host::new(kiln_home().to_path_buf()).with_supervisor(KILN)
}

/// Runs kiln with `args` and returns its output.
pub fn kiln(args: &[&str]) -> Output {
    kiln_command()
        .args(args)
        .output()
        .expect("kiln binary runs")
}

/// `kiln build` once per test process; returns the output directory.
pub fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-test-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = kiln(&["build", "--out", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "kiln build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// Fails the test with a clear message when an external tool is missing.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run .ci/run's setup (apt-get install qemu-system-x86 qemu-utils xorriso)");
}

/// Runs an external tool and returns (success, stdout+stderr).
pub fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    require_tool(cmd);
    let out = Command::new(cmd).args(args).output().expect("tool runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A `kiln run` process whose serial console is driven through pipes.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// How much of `out` earlier `expect`s consumed.
    seen: usize,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Session {
    pub fn start(args: &[&str]) -> Session {
        let mut child = kiln_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln run starts");
        let stdin = child.stdin.take().unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Session {
            child,
            stdin,
            out,
            err,
            seen: 0,
        }
    }

    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` appears in serial output after what earlier calls consumed.
    pub fn expect(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                let hay = &out[self.seen.min(out.len())..];
                if let Some(pos) = hay
                    .windows(needle.len())
                    .position(|w| w == needle.as_bytes())
                {
                    self.seen += pos + needle.len();
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?}\nserial so far: {:?}\nstderr: {}",
                    self.serial(),
                    self.stderr()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // One more look: output may have arrived just before the exit.
                thread::sleep(Duration::from_millis(100));
                let out = self.serial();
                if out[self.seen.min(out.len())..].contains(needle) {
                    continue;
                }
                panic!(
                    "kiln exited ({status}) before {needle:?} appeared\nserial: {out:?}\nstderr: {}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `needle` appears after what earlier calls consumed, then until the output
    /// has been quiet for `quiet` (so a late duplicate has every chance to show); returns, and
    /// consumes, everything after what earlier calls consumed.
    pub fn settle_until(&mut self, needle: &str, timeout: Duration, quiet: Duration) -> String {
        let from = self.seen;
        self.expect(needle, timeout);
        let mut len = self.out.lock().unwrap().len();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            thread::sleep(Duration::from_millis(10));
            let now = self.out.lock().unwrap().len();
            if now != len {
                len = now;
                since = Instant::now();
            }
        }
        let out = self.out.lock().unwrap();
        self.seen = out.len();
        String::from_utf8_lossy(&out[from.min(out.len())..]).into_owned()
    }

    pub fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// kiln's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        kiln_sys::process::signal(self.child.id(), sig);
    }

    /// Waits up to `timeout` for kiln to exit; returns its status or None.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the pipe readers drain.
                thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An 80-character test line and its reverse.
pub fn line80() -> (String, String) {
    let line: String = (0..80)
        .map(|i| b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[i % 62] as char)
        .collect();
    let rev: String = line.chars().rev().collect();
    (line, rev)
}

/// True when /dev/kvm can run the builtin engine. Otherwise the test skips with a message, or
/// fails when `KILN_REQUIRE_KVM=1` (CI sets it).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("KILN_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm cannot be opened ({e}) and KILN_REQUIRE_KVM=1");
            }
            eprintln!("SKIPPED {test}: /dev/kvm cannot be opened ({e}); set KILN_REQUIRE_KVM=1 to fail instead");
            false
        }
    }
}

/// One file a traced QEMU opened: the path and whether it asked for writing.
#[derive(Debug)]
pub struct Open {
    pub path: PathBuf,
    pub write: bool,
}

/// A `qemu-system-x86_64` wrapper in `dir` (for `$KILN_QEMU`) that runs QEMU under
/// `strace -f`, logging every file each QEMU opens to its own log in `dir`; returns the wrapper
/// and the directory to give [`opens`]. QEMU still dies with its parent (strace), as kiln
/// arranges for an untraced one.
pub fn traced_qemu(dir: &Path) -> (PathBuf, PathBuf) {
    require_tool("strace");
    let qemu = dir.join("traced-qemu");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\nexec strace --seccomp-bpf -f -qq -e trace=open,openat,openat2,creat -o '{}/strace.'$$'.log' setpriv --pdeathsig KILL qemu-system-x86_64 \"$@\"\n",
            dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    (qemu, dir.to_path_buf())
}

/// The files every [`traced_qemu`] (and its threads) opened, from the logs in `dir`.
pub fn opens(dir: &Path) -> Vec<Open> {
    let mut text = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("strace.") && name.ends_with(".log") {
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    text.lines()
        .filter(|l| l.contains("open"))
        .filter_map(|l| {
            let start = l.find('"')? + 1;
            let end = start + l[start..].find('"')?;
            let flags = &l[end..];
            Some(Open {
                path: PathBuf::from(&l[start..end]),
                write: flags.contains("O_RDWR")
                    || flags.contains("O_WRONLY")
                    || flags.contains("O_CREAT"),
            })
        })
        .collect()
}

/// Runs kiln with `KILN_HOME=home` and returns its output.
pub fn kiln_in(home: &Path, args: &[&str]) -> Output {
    Command::new(KILN)
        .env("KILN_HOME", home)
        .args(args)
        .output()
        .expect("kiln binary runs")
}

/// [`kiln_in`] of a command that must succeed; returns its stdout.
pub fn kiln_in_ok(home: &Path, args: &[&str]) -> String {
    let out = kiln_in(home, args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A firmware VM started in the background under `home` on `engine` (`qemu` or `builtin`).
pub fn start_disk_vm(home: &Path, name: &str, engine: &str) -> kiln_host::VmRecord {
    // A disk of its own: a VM writes to its disk, and QEMU locks it to one writer.
    let disk = home.join(format!("{name}.img"));
    std::fs::copy(built().join("boot.img"), &disk).unwrap();
    let out = kiln_in(
        home,
        &[
            "vm",
            "run",
            "--disk",
            disk.to_str().unwrap(),
            "--engine",
            engine,
            "--name",
            name,
        ],
    );
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(&format!("{name} ")), "{said}");
    kiln_host::Host::new(home.to_path_buf()).get(name).unwrap()
}

/// Kills every VM under its `KILN_HOME` when a test ends, passing or failing: background VMs
/// outlive their creator by design, so a failed assertion must not leave them running. VMs
/// still being created and broken ones are removed with `--force` (which kills their proven
/// supervisors).
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        end_vms(&self.0, None);
    }
}

/// [`KillOnDrop`] for one VM of a `KILN_HOME` that other tests share.
pub struct KillVmOnDrop(pub PathBuf, pub String);

impl Drop for KillVmOnDrop {
    fn drop(&mut self) {
        end_vms(&self.0, Some(&self.1));
    }
}

/// Ends every VM under `home` (or only `name`): running ones are killed; ones still being
/// created and broken ones are removed with `--force`.
fn end_vms(home: &Path, name: Option<&str>) {
    let host = kiln_host::Host::new(home.to_path_buf()).with_supervisor(KILN);
    for entry in host.entries().unwrap_or_default() {
        if name.is_some_and(|n| n != entry.name()) {
            continue;
        }
        match entry.record() {
            Some(rec) if rec.is_alive() => {
                let _ = host.kill(&rec.meta.name);
            }
            Some(rec) if rec.effective_state() != kiln_host::VmState::Creating => {}
            _ => {
                let _ = host.remove(entry.name(), true);
            }
        }
    }
}

/// Waits up to `timeout` for `ok`, failing the test with `what` otherwise.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes whose command line mentions `text` (a VM's directory: its supervisor is
/// `kiln __supervise HOME NAME`, its QEMU names sockets in it), as (pid, command line).
pub fn processes_mentioning(text: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || kiln_sys::process::start_time(pid).is_none() {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(text) {
            found.push((pid, line));
        }
    }
    found
}

/// `kiln build --program` of `program` into `dir` (as `dir/NAME.bin` and every image of it).
pub fn build_program(dir: &Path, name: &str, program: &[u8]) {
    let prog_path = dir.join(format!("{name}.bin"));
    std::fs::write(&prog_path, program).unwrap();
    let out = kiln(&[
        "build",
        "--program",
        prog_path.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
