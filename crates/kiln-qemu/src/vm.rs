//! A supervised QEMU process: spawn, QMP, power button, wait, kill. The one place kiln starts
//! QEMU, for firmware machines (pc, q35) and microVMs alike.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_sys::process::{self, ChildSetup, EndHook};

use crate::{QemuError, Qmp};

/// A QEMU process to start: the binary, its arguments and the QMP socket they make it serve.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: String,
    pub args: Vec<OsString>,
    pub qmp_socket: PathBuf,
    /// Descriptors QEMU inherits under their numbers (a TAP device, a passt socket), named in
    /// `args`; the caller keeps them open until QEMU has started.
    pub keep_fds: Vec<std::os::fd::RawFd>,
}

impl Launch {
    /// The command line as strings (for vm.json and for running it by hand).
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.binary.clone())
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }
}

/// Where QEMU's standard streams go.
#[derive(Clone, Debug)]
pub enum QemuIo {
    /// No terminal (kiln relays the console itself): stdin is /dev/null, stdout is appended
    /// to `log`, stderr is passed on to kiln's.
    Detached { log: PathBuf },
}

/// How QEMU ended, as QEMU tells it.
#[derive(Clone, Debug)]
pub struct VmEnd {
    /// QEMU's exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended QEMU, if any.
    pub signal: Option<i32>,
    /// QEMU's shutdown reason from the QMP `SHUTDOWN` event (`guest-shutdown`, `host-qmp-quit`,
    /// `guest-reset`, `host-signal`, ...), `killed` when kiln killed it, else `exited`.
    pub reason: String,
    /// True when the guest itself asked to stop (ACPI S5, reset).
    pub guest_initiated: bool,
    /// The last thing QEMU printed on stderr, for a crash report.
    pub last_words: String,
}

/// A running QEMU VM. Dropping it kills QEMU.
pub struct QemuVm {
    pid: u32,
    exited: Receiver<ExitStatus>,
    exit_hook: Arc<EndHook>,
    end: Option<VmEnd>,
    qmp: Qmp,
    negotiated: bool,
    qmp_socket: PathBuf,
    killed: bool,
    stderr_tail: Arc<Mutex<String>>,
}

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

impl QemuVm {
    /// Starts QEMU and returns as soon as its QMP greeting arrives (QEMU runs). QEMU gets
    /// SIGKILL if the thread that started it dies, so it never outlives its supervisor.
    /// Capabilities are negotiated by [`QemuVm::negotiate`] (or the first command), since QEMU
    /// answers commands only tens of milliseconds after its greeting under TCG.
    pub fn spawn(launch: &Launch, io: &QemuIo) -> Result<QemuVm, QemuError> {
        let _ = fs::remove_file(&launch.qmp_socket);
        tracing::debug!("{} {:?}", launch.binary, launch.args);
        let mut command = Command::new(&launch.binary);
        command.args(&launch.args);
        process::configure(
            &mut command,
            ChildSetup {
                die_with_parent: true,
                new_session: false,
                keep_fds: launch.keep_fds.clone(),
            },
        );
        match io {
            QemuIo::Detached { log } => {
                let open = || {
                    fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(log)
                        .map_err(|source| QemuError::Io {
                            what: format!("{}: cannot open", log.display()),
                            source,
                        })
                };
                command.stdin(Stdio::null()).stdout(open()?);
            }
        }
        command.stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| QemuError::Spawn {
            binary: launch.binary.clone(),
            source,
        })?;
        let pid = child.id();
        // QEMU's stderr is passed on to ours (the terminal, or a supervisor's log) and its tail
        // kept for the error report.
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if is_expected_warning(&line) {
                        continue;
                    }
                    let _ = writeln!(std::io::stderr(), "{line}");
                    if let Ok(mut t) = tail.lock() {
                        // Keep only the last few lines: QEMU's stderr is not bounded.
                        if t.len() > 4096 {
                            let cut = t.len() - 2048;
                            t.drain(..cut);
                        }
                        t.push_str(&line);
                        t.push('\n');
                    }
                }
            });
        }
        let (tx, exited) = mpsc::channel();
        let exit_hook = Arc::new(EndHook::default());
        let hook = Arc::clone(&exit_hook);
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
            hook.fire();
        });
        let fail = |e: QemuError| {
            process::signal(pid, libc::SIGKILL);
            e
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let qmp = loop {
            match exited.recv_timeout(Duration::from_millis(2)) {
                Ok(status) => {
                    // Let the stderr thread drain what QEMU said before it died.
                    thread::sleep(Duration::from_millis(50));
                    let said = last_line(&stderr_tail);
                    return Err(fail(QemuError::EarlyExit {
                        path: launch.qmp_socket.clone(),
                        detail: if said.is_empty() {
                            status.to_string()
                        } else {
                            said
                        },
                    }));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(fail(QemuError::Config(
                        "lost track of the QEMU process".into(),
                    )))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if launch.qmp_socket.exists() {
                match Qmp::open(&launch.qmp_socket) {
                    Ok(q) => break q,
                    Err(e) if Instant::now() > deadline => {
                        return Err(fail(QemuError::Qmp {
                            path: launch.qmp_socket.clone(),
                            source: e,
                        }))
                    }
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                return Err(fail(QemuError::EarlyExit {
                    path: launch.qmp_socket.clone(),
                    detail: format!(
                        "QMP socket did not appear within {} s",
                        START_TIMEOUT.as_secs()
                    ),
                }));
            }
        };
        Ok(QemuVm {
            pid,
            exited,
            exit_hook,
            end: None,
            qmp,
            negotiated: false,
            qmp_socket: launch.qmp_socket.clone(),
            killed: false,
            stderr_tail,
        })
    }

    /// Leaves QMP's negotiation mode, so commands work and the `SHUTDOWN` event that tells how
    /// the VM ended is delivered. Idempotent.
    pub fn negotiate(&mut self) -> Result<(), QemuError> {
        if !self.negotiated {
            self.qmp.negotiate().map_err(|source| QemuError::Qmp {
                path: self.qmp_socket.clone(),
                source,
            })?;
            self.negotiated = true;
        }
        Ok(())
    }

    /// Calls `notify` (on another thread) once QEMU has exited; at once if it already has. A
    /// supervisor uses it to wait for "exited or asked to stop" without polling.
    pub fn on_exit(&self, notify: Box<dyn FnOnce() + Send>) {
        self.exit_hook.set(notify);
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The error of a failed QMP exchange on this VM's socket.
    pub(crate) fn qmp_error(&self, source: crate::QmpError) -> QemuError {
        QemuError::Qmp {
            path: self.qmp_socket.clone(),
            source,
        }
    }

    /// The QMP session, for commands kiln does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Presses the ACPI power button (`system_powerdown`).
    pub fn power_button(&mut self) -> Result<(), QemuError> {
        self.negotiate()?;
        self.qmp
            .execute("system_powerdown", None)
            .map(|_| ())
            .map_err(|source| QemuError::Qmp {
                path: self.qmp_socket.clone(),
                source,
            })
    }

    /// Waits for QEMU to exit, at most `timeout` (forever with `None`).
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Option<VmEnd> {
        if let Some(end) = &self.end {
            return Some(end.clone());
        }
        let status = match timeout {
            None => self.exited.recv().ok(),
            Some(t) => match self.exited.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        // The QMP reader may still be parsing the SHUTDOWN event QEMU sent just before exiting.
        let mut event = self.qmp.shutdown_event();
        let settle = Instant::now() + Duration::from_millis(200);
        while event.is_none() && self.negotiated && !self.killed && Instant::now() < settle {
            thread::sleep(Duration::from_millis(5));
            event = self.qmp.shutdown_event();
        }
        use std::os::unix::process::ExitStatusExt;
        let end = VmEnd {
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            reason: if self.killed {
                "killed".into()
            } else {
                event
                    .as_ref()
                    .and_then(|e| e["reason"].as_str())
                    .unwrap_or("exited")
                    .to_string()
            },
            guest_initiated: !self.killed
                && event
                    .as_ref()
                    .and_then(|e| e["guest"].as_bool())
                    .unwrap_or(false),
            last_words: last_line(&self.stderr_tail),
        };
        self.end = Some(end.clone());
        Some(end)
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> VmEnd {
        if self.end.is_none() {
            self.killed = true;
            process::signal(self.pid, libc::SIGKILL);
        }
        self.wait_timeout(None).unwrap_or_else(|| VmEnd {
            exit_code: None,
            signal: None,
            reason: "killed".into(),
            guest_initiated: false,
            last_words: String::new(),
        })
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.end.is_none() {
            self.kill();
        }
        let _ = fs::remove_file(&self.qmp_socket);
    }
}

fn last_line(tail: &Mutex<String>) -> String {
    tail.lock()
        .map(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// QEMU warns about every fw_cfg name outside `opt/`, including SeaBIOS's own
/// `etc/sercon-port` that kiln sets on purpose (see [`crate::BiosConsole`]).
fn is_expected_warning(line: &str) -> bool {
    line.contains("name=etc/sercon-port") && line.contains("should be prefixed with \"opt/\"")
}
