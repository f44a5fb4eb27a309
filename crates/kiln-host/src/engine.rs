//! The engine that runs a Linux VM: QEMU's microvm machine here, the builtin VMM elsewhere.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_qemu::{Accel, DriveFormat, MicrovmConfig, MicrovmDisk, Qmp, UserNet, VmEnd};

use crate::HostError;

/// One disk of a [`LaunchSpec`], in guest order.
#[derive(Clone, Debug)]
pub struct LaunchDisk {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub qcow2: bool,
}

/// Everything an engine needs to start one VM. All paths are absolute.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub name: String,
    pub vcpus: u32,
    pub ram_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// `/dev/vda`, `/dev/vdb`, ... in this order.
    pub disks: Vec<LaunchDisk>,
    /// The serial console's Unix socket.
    pub console_socket: PathBuf,
    /// The serial port's output is appended here.
    pub serial_log: PathBuf,
    /// Control socket for commands (power button).
    pub control_socket: PathBuf,
    /// A second control socket held by the supervisor to learn how the VM ends.
    pub supervisor_socket: PathBuf,
    /// The engine's own diagnostics go here.
    pub engine_log: PathBuf,
    /// User-mode networking with SSH on this host port, when set.
    pub ssh_port: Option<u16>,
}

/// How a VM ended.
#[derive(Clone, Debug)]
pub struct Ended {
    /// The engine's reason code (`guest-shutdown`, `guest-reset`, `killed`, ...).
    pub reason: String,
    /// One line for people: `guest powered off`, `killed`, ...
    pub description: String,
    /// True when the guest powered itself off (ACPI S5).
    pub guest_powered_off: bool,
}

/// A started VM, owned by the supervisor.
pub trait Started {
    /// The engine process's id.
    fn pid(&self) -> u32;
    /// Blocks until the VM ends.
    fn wait(self: Box<Self>) -> Ended;
}

/// Something that watches for a VM's shutdown after the power button was pressed.
pub trait ShutdownWatch {
    /// `(guest_initiated, reason)` once the engine announced the shutdown.
    fn shutdown(&self) -> Option<(bool, String)>;
}

/// A way to run Linux VMs (QEMU microvm here; the builtin VMM implements the same trait).
pub trait Engine: Send + Sync {
    /// `qemu-microvm`.
    fn name(&self) -> &'static str;
    /// `kvm` or `tcg`.
    fn accelerator(&self) -> &'static str;
    /// The command line that [`Engine::start`] runs.
    fn command_line(&self, spec: &LaunchSpec) -> Vec<String>;
    /// Starts the VM detached from any terminal; returns once it runs.
    fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn Started>, HostError>;
    /// Presses the ACPI power button through the control socket.
    fn power_button(&self, control_socket: &Path) -> Result<Box<dyn ShutdownWatch>, HostError>;
}

/// QEMU's `microvm` machine (virtio-mmio), KVM with hardware virtualization, TCG otherwise.
#[derive(Clone, Debug)]
pub struct QemuMicrovm {
    pub binary: String,
    pub accel: Accel,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        QemuMicrovm {
            binary: std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            accel: Accel::detect(),
        }
    }
}

impl QemuMicrovm {
    fn config(&self, spec: &LaunchSpec) -> MicrovmConfig {
        MicrovmConfig {
            binary: self.binary.clone(),
            accel: self.accel,
            memory_mib: spec.ram_mib,
            vcpus: spec.vcpus,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
            disks: spec
                .disks
                .iter()
                .map(|d| MicrovmDisk {
                    path: d.path.clone(),
                    format: if d.qcow2 {
                        DriveFormat::Qcow2
                    } else {
                        DriveFormat::Raw
                    },
                    read_only: false,
                })
                .collect(),
            console_socket: spec.console_socket.clone(),
            serial_log: spec.serial_log.clone(),
            qmp_sockets: vec![spec.control_socket.clone(), spec.supervisor_socket.clone()],
            net: spec.ssh_port.map(|p| UserNet { ssh_host_port: p }),
            name: Some(spec.name.clone()),
            extra_args: Vec::new(),
        }
    }
}

struct QemuStarted {
    child: Child,
    qmp: Qmp,
}

impl Started for QemuStarted {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(mut self: Box<Self>) -> Ended {
        use std::os::unix::process::ExitStatusExt;
        // Events (SHUTDOWN) flow only after negotiation. If QEMU is already gone this fails, and
        // the exit status alone tells how it ended.
        if let Err(e) = self.qmp.negotiate() {
            tracing::debug!("QMP negotiation: {e}");
        }
        let status = self.child.wait().ok();
        // The QMP reader may still be parsing the SHUTDOWN event QEMU sent just before exiting.
        let settle = Instant::now() + Duration::from_millis(300);
        let mut event = self.qmp.shutdown_event();
        while event.is_none() && Instant::now() < settle {
            thread::sleep(Duration::from_millis(10));
            event = self.qmp.shutdown_event();
        }
        let signal = status.and_then(|s| s.signal());
        let end = VmEnd {
            exit_code: status.and_then(|s| s.code()),
            signal,
            reason: match (&event, signal) {
                (Some(e), _) => e["reason"].as_str().unwrap_or("exited").to_string(),
                (None, Some(9)) => "killed".into(),
                _ => "exited".into(),
            },
            guest_initiated: event
                .as_ref()
                .and_then(|e| e["guest"].as_bool())
                .unwrap_or(false),
        };
        Ended {
            reason: end.reason.clone(),
            description: end.describe(),
            guest_powered_off: end.guest_powered_off(),
        }
    }
}

struct QmpWatch(Qmp);

impl ShutdownWatch for QmpWatch {
    fn shutdown(&self) -> Option<(bool, String)> {
        self.0.shutdown_event().map(|d| {
            (
                d["guest"].as_bool().unwrap_or(false),
                d["reason"].as_str().unwrap_or("").to_string(),
            )
        })
    }
}

impl Engine for QemuMicrovm {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    fn accelerator(&self) -> &'static str {
        self.accel.name()
    }

    fn command_line(&self, spec: &LaunchSpec) -> Vec<String> {
        let config = self.config(spec);
        std::iter::once(config.binary.clone())
            .chain(
                config
                    .args()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned()),
            )
            .collect()
    }

    fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn Started>, HostError> {
        let config = self.config(spec);
        for s in [
            &spec.console_socket,
            &spec.control_socket,
            &spec.supervisor_socket,
        ] {
            let _ = fs::remove_file(s);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.engine_log)
            .map_err(|e| HostError::io(format!("{}: cannot open", spec.engine_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HostError::io(format!("{}: cannot open", spec.engine_log.display()), e))?;
        let mut child = Command::new(&config.binary)
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| HostError::Tool {
                tool: config.binary.clone(),
                detail: if e.kind() == std::io::ErrorKind::NotFound {
                    "not installed (apt-get install qemu-system-x86)".into()
                } else {
                    e.to_string()
                },
            })?;
        let t0 = Instant::now();
        tracing::debug!("{}: QEMU spawned (pid {})", spec.name, child.id());
        let deadline = t0 + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let said = fs::read_to_string(&spec.engine_log).unwrap_or_default();
                let last = said.lines().rev().find(|l| !l.trim().is_empty());
                return Err(HostError::Start {
                    name: spec.name.clone(),
                    detail: format!(
                        "{} exited ({status}): {}",
                        config.binary,
                        last.unwrap_or("no message")
                    ),
                });
            }
            if spec.supervisor_socket.exists() {
                // The greeting says QEMU runs; capabilities are negotiated in `wait`, after the
                // caller has been told, since QEMU answers commands only tens of ms later.
                if let Ok(qmp) = Qmp::open(&spec.supervisor_socket) {
                    tracing::debug!("{}: QMP up {:?} after spawn", spec.name, t0.elapsed());
                    return Ok(Box::new(QemuStarted { child, qmp }));
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HostError::Start {
                    name: spec.name.clone(),
                    detail: format!(
                        "QMP socket {} did not come up within 15 s",
                        spec.supervisor_socket.display()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn power_button(&self, control_socket: &Path) -> Result<Box<dyn ShutdownWatch>, HostError> {
        let qerr = |source| {
            HostError::Qemu(kiln_qemu::QemuError::Qmp {
                path: control_socket.to_path_buf(),
                source,
            })
        };
        let qmp = Qmp::connect(control_socket).map_err(qerr)?;
        qmp.execute("system_powerdown", None).map_err(qerr)?;
        Ok(Box::new(QmpWatch(qmp)))
    }
}
