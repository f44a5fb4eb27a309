//! One v86 machine under Node (`web/src/v86.mjs`): what `kiln boot` runs and what `kiln
//! prepare --warm` boots to save a state. kiln writes the job (options it checked, files it
//! wrote or checked) into a private scratch directory, starts Node with the serial console on
//! its stdin/stdout, a control socket and optionally a network socket (passt's peer), and
//! turns everything Node reports into [`Event`]s on one channel.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::assets::{self, Assets};
use crate::{Result, WebError};

/// What a machine needs.
#[derive(Debug, Default)]
pub struct Job {
    /// Plain v86 options (memory sizes, cmdline, ...), checked by the caller.
    pub options: serde_json::Map<String, Value>,
    /// v86 options given as whole files: `bios`, `vga_bios`, `bzimage`, `initrd`, `hda`,
    /// `fda`, `cdrom`, `initial_state`.
    pub files: BTreeMap<&'static str, PathBuf>,
    /// The 9p filesystem: kiln's index (absent when restoring a state, which holds it) and
    /// the directory of content files.
    pub filesystem: Option<(Option<PathBuf>, PathBuf)>,
    /// The guest's network card is connected to this socket (passt's peer).
    pub net: Option<UnixStream>,
}

/// What the machine reports.
#[derive(Debug)]
pub enum Event {
    /// Bytes the guest wrote to COM1.
    Serial(Vec<u8>),
    /// v86 finished loading (and restoring) and runs; milliseconds since Node started.
    Loaded(u64),
    /// A state was written (its raw size).
    Saved(u64),
    /// Node reported an error, or ended.
    Failed(String),
    Exited,
}

/// A running machine.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    ctl: UnixStream,
    events: Receiver<Event>,
    scratch: kiln_sys::temp::TempDir,
}

impl Session {
    /// Starts `job` under Node (`$KILN_NODE`, else `node`).
    pub fn start(assets: &Assets, job: Job) -> Result<Session> {
        let libv86 = assets.libv86_mjs();
        if !libv86.is_file() {
            return Err(WebError::MissingAsset {
                name: "libv86.mjs".into(),
                path: libv86,
                hint: "install the page's npm packages with `npm ci` in kiln's web/ directory"
                    .into(),
            });
        }
        let wasm = assets.npm_file("v86/build/v86.wasm");
        // A scratch directory that records this process: one left by a killed session is swept
        // by the next.
        let base = std::env::temp_dir().join("kiln-v86");
        let scratch = kiln_sys::temp::TempDir::beside(&base)
            .map_err(|e| WebError::io(&base, "create temp dir", e))?;
        let script = scratch.path().join("v86.mjs");
        std::fs::write(&script, assets::V86_MJS).map_err(|e| WebError::io(&script, "write", e))?;
        let (ctl, ctl_child) =
            UnixStream::pair().map_err(|e| WebError::io(&base, "socket pair", e))?;
        let ctl_child: OwnedFd = ctl_child.into();
        let net_child: Option<OwnedFd> = job.net.map(Into::into);
        let mut fs_json = Value::Null;
        if let Some((index, dir)) = &job.filesystem {
            let mut base = dir.to_string_lossy().into_owned();
            if !base.ends_with('/') {
                base.push('/');
            }
            fs_json = serde_json::json!({ "basefs": index, "baseurl": base });
        }
        let spec = serde_json::json!({
            "libv86": libv86,
            "wasm": wasm,
            "options": job.options,
            "files": job.files,
            "filesystem": fs_json,
            "ctl_fd": ctl_child.as_raw_fd(),
            "net_fd": net_child.as_ref().map(|f| f.as_raw_fd()),
        });
        let job_file = scratch.path().join("job.json");
        std::fs::write(&job_file, spec.to_string())
            .map_err(|e| WebError::io(&job_file, "write", e))?;

        let node = std::env::var_os("KILN_NODE").unwrap_or_else(|| "node".into());
        let mut cmd = Command::new(&node);
        cmd.arg(&script)
            .arg(&job_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut keep = vec![ctl_child.as_raw_fd()];
        keep.extend(net_child.as_ref().map(|f| f.as_raw_fd()));
        kiln_sys::process::configure(
            &mut cmd,
            kiln_sys::process::ChildSetup {
                die_with_parent: true,
                new_session: false,
                keep_fds: keep,
            },
        );
        let mut child = cmd.spawn().map_err(|e| WebError::Warm {
            image: PathBuf::from(&node),
            msg: format!("cannot run it: {e}; v86 runs under Node.js (apt-get install nodejs)"),
        })?;
        drop(ctl_child);
        drop(net_child);
        let (tx, events) = mpsc::channel();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let t = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if t.send(Event::Serial(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = t.send(Event::Exited);
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let t = tx.clone();
        std::thread::spawn(move || {
            // Node's own errors (a crash before the control socket says anything): the last
            // line that is not v86's chatter.
            let mut last = String::new();
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if !line.trim().is_empty() {
                    last = line;
                }
            }
            if !last.is_empty() {
                let _ = t.send(Event::Failed(format!("Node: {}", last.trim())));
            }
        });
        let reader = ctl
            .try_clone()
            .map_err(|e| WebError::io(&base, "socket", e))?;
        std::thread::spawn(move || {
            for line in BufReader::new(reader.take(64 << 20)).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let ev = match v["ev"].as_str() {
                    Some("loaded") => Event::Loaded(v["ms"].as_u64().unwrap_or(0)),
                    Some("saved") => Event::Saved(v["bytes"].as_u64().unwrap_or(0)),
                    Some("error") => {
                        Event::Failed(v["message"].as_str().unwrap_or("unknown").to_string())
                    }
                    _ => continue,
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Ok(Session {
            stdin: child.stdin.take(),
            child,
            ctl,
            events,
            scratch,
        })
    }

    /// The next event, or None after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Event> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Event::Exited),
        }
    }

    /// Types `bytes` on the guest's COM1.
    pub fn send_serial(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Ok(());
        };
        stdin
            .write_all(bytes)
            .and_then(|_| stdin.flush())
            .map_err(|e| WebError::io("v86", "send serial input", e))
    }

    fn command(&mut self, cmd: Value) -> Result<()> {
        let mut line = cmd.to_string();
        line.push('\n');
        self.ctl
            .write_all(line.as_bytes())
            .map_err(|e| WebError::io("v86", "send a command", e))
    }

    /// Stops the machine and returns its raw state; serial output that arrives meanwhile is
    /// given to `serial`. The machine stays stopped ([`Session::run`] resumes it).
    pub fn save(&mut self, timeout: Duration, serial: &mut dyn FnMut(&[u8])) -> Result<Vec<u8>> {
        let path = self.scratch.path().join("state.bin");
        let _ = std::fs::remove_file(&path);
        self.command(serde_json::json!({ "cmd": "save", "path": path }))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(Event::Saved(_)) => break,
                Some(Event::Serial(b)) => serial(&b),
                Some(Event::Loaded(_)) => {}
                Some(Event::Failed(m)) => {
                    return Err(WebError::bad(
                        "v86",
                        format!("saving the state failed: {m}"),
                    ))
                }
                Some(Event::Exited) => {
                    return Err(WebError::bad("v86", "Node ended while saving the state"))
                }
                None => {
                    return Err(WebError::bad(
                        "v86",
                        format!("saving the state took more than {} s", timeout.as_secs()),
                    ))
                }
            }
        }
        std::fs::read(&path).map_err(|e| WebError::io(&path, "read the saved state", e))
    }

    /// Waits until `marker` appears in the guest's serial output (each chunk also goes to
    /// `serial`), then 50 ms more for the rest of its line; returns the output so far.
    pub fn wait_for(
        &mut self,
        marker: &str,
        timeout: Duration,
        serial: &mut dyn FnMut(&[u8]),
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<u8> = Vec::new();
        let mut found: Option<Instant> = None;
        loop {
            let until = found.map_or(deadline, |t| t + Duration::from_millis(50));
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(Event::Serial(b)) => {
                    serial(&b);
                    seen.extend_from_slice(&b);
                    if found.is_none()
                        && String::from_utf8_lossy(
                            &seen[seen.len().saturating_sub(b.len() + marker.len())..],
                        )
                        .contains(marker)
                    {
                        found = Some(Instant::now());
                    }
                }
                Some(Event::Loaded(_) | Event::Saved(_)) => {}
                Some(Event::Failed(m)) => return Err(WebError::bad("v86", m)),
                Some(Event::Exited) => {
                    return Err(WebError::bad(
                        "v86",
                        "Node ended before the marker appeared",
                    ))
                }
                None if found.is_some() => return Ok(String::from_utf8_lossy(&seen).into_owned()),
                None => {
                    let tail = String::from_utf8_lossy(&seen[seen.len().saturating_sub(200)..])
                        .into_owned();
                    return Err(WebError::bad(
                        "v86",
                        format!(
                            "{marker:?} did not appear on serial within {} s; serial so far ends {tail:?}",
                            timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    /// Resumes a stopped machine.
    pub fn run(&mut self) -> Result<()> {
        self.command(serde_json::json!({ "cmd": "run" }))
    }

    /// Ends the machine and Node.
    pub fn quit(mut self) {
        let _ = self.command(serde_json::json!({ "cmd": "quit" }));
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The scratch directory (removed with the session).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
