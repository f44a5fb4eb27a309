//! A supervised QEMU process: spawn, QMP, power button, wait, kill.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{QemuConfig, QemuError, Qmp};

/// How a VM ended.
#[derive(Clone, Debug)]
pub struct VmEnd {
    /// QEMU's exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended QEMU, if any.
    pub signal: Option<i32>,
    /// QEMU's shutdown reason from the QMP `SHUTDOWN` event (`guest-shutdown`, `host-qmp-quit`,
    /// `guest-reset`, `host-signal`, ...), or `killed` when kiln killed it.
    pub reason: String,
    /// True when the guest itself asked to stop (ACPI S5, reset).
    pub guest_initiated: bool,
}

impl VmEnd {
    /// True when the guest powered itself off (ACPI S5).
    pub fn guest_powered_off(&self) -> bool {
        self.guest_initiated && self.reason == "guest-shutdown"
    }

    /// A one-line human description.
    pub fn describe(&self) -> String {
        match self.reason.as_str() {
            "guest-shutdown" => "guest powered off".into(),
            "guest-reset" => "guest reset (reboot ends the VM)".into(),
            "guest-panic" => "guest panicked".into(),
            "host-qmp-quit" | "host-ui" => "quit from the console".into(),
            "host-signal" => "QEMU was stopped by a signal".into(),
            "killed" => "killed".into(),
            other => match (self.exit_code, self.signal) {
                (_, Some(sig)) => format!("QEMU died from signal {sig} ({other})"),
                (Some(code), _) => format!("QEMU exited with status {code} ({other})"),
                _ => format!("QEMU ended ({other})"),
            },
        }
    }
}

/// A callback to run once a process has exited, whichever of the two comes first.
#[derive(Default)]
pub(crate) struct ExitHook {
    exited: bool,
    notify: Option<Box<dyn FnOnce() + Send>>,
}

impl ExitHook {
    /// Registers `notify`, or runs it now if the exit already happened.
    pub(crate) fn set(hook: &Mutex<ExitHook>, notify: Box<dyn FnOnce() + Send>) {
        let mut h = hook.lock().unwrap_or_else(|e| e.into_inner());
        if h.exited {
            drop(h);
            notify();
        } else {
            h.notify = Some(notify);
        }
    }

    /// Records the exit and runs a registered callback.
    pub(crate) fn fire(hook: &Mutex<ExitHook>) {
        let notify = {
            let mut h = hook.lock().unwrap_or_else(|e| e.into_inner());
            h.exited = true;
            h.notify.take()
        };
        if let Some(f) = notify {
            f();
        }
    }
}

/// A running QEMU VM.
pub struct QemuVm {
    pid: i32,
    exited: Receiver<ExitStatus>,
    exit_hook: Arc<Mutex<ExitHook>>,
    end: Option<VmEnd>,
    qmp: Qmp,
    qmp_socket: PathBuf,
    killed: bool,
    terminal: Option<libc::termios>,
}

impl QemuVm {
    /// Starts QEMU with kiln's own stdin/stdout (the serial console) and connects QMP.
    pub fn spawn(config: &QemuConfig) -> Result<QemuVm, QemuError> {
        Self::spawn_with(config, Stdio::inherit(), Stdio::inherit())
    }

    /// Starts QEMU with the given stdin/stdout and connects QMP.
    pub fn spawn_with(
        config: &QemuConfig,
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<QemuVm, QemuError> {
        let _ = std::fs::remove_file(&config.qmp_socket);
        // QEMU puts a terminal stdin in raw mode; if it dies hard we put it back.
        let terminal = saved_terminal();
        tracing::debug!("{} {:?}", config.binary, config.args());
        let mut command = Command::new(&config.binary);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            command.pre_exec(|| {
                // If kiln dies (even by SIGKILL), QEMU must not live on as an orphan.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .args(config.args())
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: config.binary.clone(),
                source,
            })?;
        let pid = child.id() as i32;
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = writeln!(std::io::stderr(), "{line}");
                    if let Ok(mut t) = tail.lock() {
                        t.push_str(&line);
                        t.push('\n');
                    }
                }
            });
        }
        let (tx, exited) = mpsc::channel();
        let exit_hook = Arc::new(Mutex::new(ExitHook::default()));
        let hook = Arc::clone(&exit_hook);
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
            ExitHook::fire(&hook);
        });

        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            match exited.recv_timeout(Duration::from_millis(5)) {
                Ok(status) => {
                    // Let the stderr thread drain what QEMU said before it died.
                    thread::sleep(Duration::from_millis(50));
                    let said = stderr_tail
                        .lock()
                        .map(|t| t.trim().to_string())
                        .unwrap_or_default();
                    restore_terminal(terminal.as_ref());
                    return Err(QemuError::EarlyExit {
                        path: config.qmp_socket.clone(),
                        detail: if said.is_empty() {
                            status.to_string()
                        } else {
                            said
                        },
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    restore_terminal(terminal.as_ref());
                    return Err(QemuError::Config("lost track of the QEMU process".into()));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if config.qmp_socket.exists() {
                match Qmp::connect(&config.qmp_socket) {
                    Ok(q) => break q,
                    Err(e) if Instant::now() > deadline => {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        restore_terminal(terminal.as_ref());
                        return Err(QemuError::Qmp {
                            path: config.qmp_socket.clone(),
                            source: e,
                        });
                    }
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                restore_terminal(terminal.as_ref());
                return Err(QemuError::EarlyExit {
                    path: config.qmp_socket.clone(),
                    detail: "QMP socket did not appear within 10 s".into(),
                });
            }
        };
        Ok(QemuVm {
            pid,
            exited,
            exit_hook,
            end: None,
            qmp,
            qmp_socket: config.qmp_socket.clone(),
            killed: false,
            terminal,
        })
    }

    /// Calls `notify` (on another thread) once QEMU has exited; at once if it already has. A
    /// supervisor uses it to wait for "exited or asked to stop" without polling.
    pub fn on_exit(&self, notify: Box<dyn FnOnce() + Send>) {
        ExitHook::set(&self.exit_hook, notify);
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The QMP session, for commands kiln does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Presses the ACPI power button (`system_powerdown`).
    pub fn power_button(&self) -> Result<(), QemuError> {
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
        restore_terminal(self.terminal.as_ref());
        // The QMP reader may still be parsing the SHUTDOWN event QEMU sent just before exiting.
        let mut event = self.qmp.shutdown_event();
        let settle = Instant::now() + Duration::from_millis(200);
        while event.is_none() && !self.killed && Instant::now() < settle {
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
        };
        self.end = Some(end.clone());
        Some(end)
    }

    /// Waits until QEMU exits.
    pub fn wait(&mut self) -> VmEnd {
        self.wait_timeout(None).unwrap_or_else(|| VmEnd {
            exit_code: None,
            signal: None,
            reason: "exited".into(),
            guest_initiated: false,
        })
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> VmEnd {
        if self.end.is_none() {
            self.killed = true;
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        self.wait()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.end.is_none() {
            self.kill();
        }
        let _ = std::fs::remove_file(&self.qmp_socket);
    }
}

fn saved_terminal() -> Option<libc::termios> {
    // SAFETY: isatty/tcgetattr only read the state of fd 0 into a zeroed struct.
    unsafe {
        if libc::isatty(0) != 1 {
            return None;
        }
        let mut t: libc::termios = std::mem::zeroed();
        (libc::tcgetattr(0, &mut t) == 0).then_some(t)
    }
}

fn restore_terminal(saved: Option<&libc::termios>) {
    if let Some(t) = saved {
        // SAFETY: restores attributes previously read from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}
