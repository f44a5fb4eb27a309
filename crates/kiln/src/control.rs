//! The control plane of VMs started by `kiln run`: each running VM has a name, a lock, an info
//! file and a control socket in kiln's runtime directory, so `kiln stop NAME` and `kiln ps` work
//! the same for every engine.
//!
//! Protocol: one JSON request line per connection (`{"op":"stop","timeout_s":30}` or
//! `{"op":"kill"}`), answered by one JSON line once the VM has ended
//! (`{"outcome":"powered-off","description":"guest powered off"}`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// kiln's runtime directory: `$KILN_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/kiln`, else
/// `/run/kiln` for root, else `/tmp/kiln-UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_RUNTIME_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("kiln");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        "/run/kiln".into()
    } else {
        std::env::temp_dir().join(format!("kiln-{uid}"))
    }
}

/// What `kiln ps` shows of a running VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunningVm {
    pub name: String,
    /// The supervising `kiln run` process.
    pub pid: u32,
    pub engine: String,
    pub image: PathBuf,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub control_socket: PathBuf,
}

/// A request to a running VM's supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Press the ACPI power button; kill after `timeout_s`.
    Stop { timeout_s: f64 },
    /// End the VM at once.
    Kill,
}

/// The supervisor's answer, sent when the VM has ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    /// `powered-off`, `killed`, or the engine's reason.
    pub outcome: String,
    pub description: String,
}

/// A request that arrived on the control socket, with the way back to its client.
pub struct Incoming {
    pub request: Request,
    pub reply: UnixStream,
}

impl Incoming {
    pub fn answer(mut self, reply: &Reply) {
        if let Ok(mut line) = serde_json::to_string(reply) {
            line.push('\n');
            let _ = self.reply.write_all(line.as_bytes());
        }
    }
}

/// A VM's claim on its name in the runtime directory; released on drop.
pub struct Registration {
    info: RunningVm,
    info_path: PathBuf,
    _lock: File,
}

impl Registration {
    /// Claims `name` (exactly one of two racing claims wins), writes its info file and starts
    /// accepting control requests, which arrive on `requests`.
    pub fn claim(
        name: &str,
        engine: &str,
        image: &Path,
        deliver: impl Fn(Incoming) -> bool + Send + 'static,
    ) -> anyhow::Result<Registration> {
        let dir = runtime_dir();
        fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create the runtime directory", dir.display()))?;
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("{}: cannot open", lock_path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("a VM named '{name}' is already running (see `kiln ps`)");
        }
        let socket = dir.join(format!("{name}.sock"));
        let _ = fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("{}: cannot listen", socket.display()))?;
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let mut line = String::new();
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                if BufReader::new(reader).read_line(&mut line).is_err() {
                    continue;
                }
                match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        if !deliver(Incoming {
                            request,
                            reply: conn,
                        }) {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = (&conn)
                            .write_all(format!("{{\"error\":\"bad request: {e}\"}}\n").as_bytes());
                    }
                }
            }
        });
        let info = RunningVm {
            name: name.to_string(),
            pid: std::process::id(),
            engine: engine.to_string(),
            image: image.canonicalize().unwrap_or_else(|_| image.to_path_buf()),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            control_socket: socket,
        };
        let info_path = dir.join(format!("{name}.json"));
        crate::write_atomic(
            &info_path,
            serde_json::to_string_pretty(&info)?.as_bytes(),
            None,
        )?;
        Ok(Registration {
            info,
            info_path,
            _lock: lock,
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.info.control_socket);
        let _ = fs::remove_file(&self.info_path);
    }
}

/// Whether a VM holds `name` now (its lock is taken by a live process).
fn is_running(dir: &Path, name: &str) -> bool {
    let Ok(f) = File::open(dir.join(format!("{name}.lock"))) else {
        return false;
    };
    // SAFETY: flock on an fd we own; a lock we get is released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// The VMs running now, by name. Leftovers of crashed supervisors are ignored.
pub fn list() -> Vec<RunningVm> {
    let dir = runtime_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut vms: Vec<RunningVm> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice::<RunningVm>(&fs::read(e.path()).ok()?).ok())
        .filter(|vm| is_running(&dir, &vm.name))
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    vms
}

/// A name not in use, in the style `calm-otter`.
pub fn free_name() -> String {
    let dir = runtime_dir();
    kiln_host::generate_name(|n| is_running(&dir, n))
}

/// Sends `request` to the VM named `name` and waits for its reply (the VM has ended by then).
pub fn send(name: &str, request: &Request, wait: Duration) -> anyhow::Result<Reply> {
    kiln_host::validate_name(name)?;
    let dir = runtime_dir();
    if !is_running(&dir, name) {
        bail!("no running VM named '{name}' (see `kiln ps`)");
    }
    let socket = dir.join(format!("{name}.sock"));
    let mut conn = UnixStream::connect(&socket)
        .with_context(|| format!("{}: cannot connect", socket.display()))?;
    conn.set_read_timeout(Some(wait))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    conn.write_all(line.as_bytes())
        .with_context(|| format!("{}: cannot send", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .with_context(|| format!("VM '{name}' did not answer within {} s", wait.as_secs()))?;
    if answer.is_empty() {
        bail!("VM '{name}' closed its control socket without an answer");
    }
    serde_json::from_str(&answer)
        .with_context(|| format!("VM '{name}': unreadable answer {answer:?}"))
}
