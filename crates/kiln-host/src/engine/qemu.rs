//! QEMU behind the engine interface: pc and q35 with SeaBIOS for firmware guests, microvm for
//! Linux guests. All of them start through the one [`QemuVm`].

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use kiln_image::{BootMedia, Format};
use kiln_qemu::{
    BiosConsole, Drive, DriveFormat, Launch, Machine, Media, MicrovmConfig, MicrovmDisk,
    QemuConfig, QemuIo, QemuVm, SerialMode, VmEnd,
};
use kiln_vmm::{ConsoleMerge, MergeOrder};

use super::{Engine, Restore, Running};
use crate::console::{SocketConsole, TerminalConsole};
use crate::{Boot, ConsoleSpec, End, EngineKind, HostError, VmSpec};

/// QEMU as a kiln engine.
pub struct QemuEngine {
    kind: EngineKind,
    binary: String,
}

impl QemuEngine {
    /// `$KILN_QEMU` or `qemu-system-x86_64` as `kind` (qemu-pc, qemu-q35 or qemu-microvm).
    pub fn new(kind: EngineKind) -> QemuEngine {
        QemuEngine {
            kind,
            binary: std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
        }
    }

    /// QEMU's command line for `spec`; `net_fd` is the network descriptor QEMU inherits (none
    /// for the command line recorded for running by hand).
    fn launch(&self, spec: &VmSpec, net_fd: Option<i32>) -> Result<(Launch, QemuIo), HostError> {
        let qmp_socket = spec.dir.join(crate::state::QMP_SOCKET);
        let engine_log = spec.dir.join("engine.log");
        match &spec.boot {
            Boot::Firmware { media } => {
                let disk = &spec.disks[0];
                let drive = Drive {
                    path: firmware_drive(spec),
                    format: DriveFormat::Raw,
                    media: match media {
                        BootMedia::Disk => Media::Disk,
                        BootMedia::Cdrom => Media::Cdrom,
                        BootMedia::Floppy => Media::Floppy,
                    },
                    read_only: disk.read_only,
                };
                let serial = SerialMode::Connect {
                    path: serial_socket(spec),
                    bios_console: spec.console.bios().then(|| bios_console(spec)),
                };
                let mut config = QemuConfig::firmware(drive, qmp_socket, serial);
                config.binary = self.binary.clone();
                config.machine = if self.kind == EngineKind::QemuQ35 {
                    Machine::Q35
                } else {
                    Machine::Pc
                };
                config.accel = spec.accelerator;
                config.memory_mib = spec.ram_mib;
                config.vcpus = spec.vcpu;
                config.name = Some(spec.name.clone());
                // The console is kiln's, on a terminal too: QEMU never touches the terminal.
                let io = QemuIo::Detached { log: engine_log };
                Ok((config.launch(), io))
            }
            Boot::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let ConsoleSpec::Socket { .. } = &spec.console else {
                    return Err(HostError::invalid(
                        "console",
                        "terminal",
                        "a Linux microVM's console is a socket",
                    ));
                };
                let disks = spec
                    .disks
                    .iter()
                    .map(|d| {
                        Ok(MicrovmDisk {
                            path: d.path.clone(),
                            format: match (d.format, &d.backing) {
                                (Format::Raw, None) => DriveFormat::Raw,
                                (Format::Qcow2, Some(_)) => DriveFormat::Qcow2,
                                _ => {
                                    return Err(HostError::invalid(
                                        "disks",
                                        d.path.display(),
                                        "QEMU is given raw disks and QCOW2 overlays over a raw base only",
                                    ))
                                }
                            },
                            read_only: d.read_only,
                            backing: d.backing.clone(),
                            serial: d.serial.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, HostError>>()?;
                let config = MicrovmConfig {
                    binary: self.binary.clone(),
                    accel: spec.accelerator,
                    memory_mib: spec.ram_mib,
                    vcpus: spec.vcpu,
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone(),
                    disks,
                    serial_socket: serial_socket(spec),
                    qmp_socket,
                    net: spec.net.backend(&spec.dir, net_fd),
                    name: Some(spec.name.clone()),
                    extra_args: Vec::new(),
                };
                Ok((config.launch(), QemuIo::Detached { log: engine_log }))
            }
        }
    }
}

/// The socket QEMU connects its serial port to: the supervisor listens there and serves the
/// console (with its backlog and log) to clients itself, the same for every engine.
fn serial_socket(spec: &VmSpec) -> std::path::PathBuf {
    spec.dir.join(crate::state::SERIAL_SOCKET)
}

/// SeaBIOS's serial console on COM2, connected to the supervisor like COM1.
fn bios_console(spec: &VmSpec) -> BiosConsole {
    BiosConsole {
        socket: spec.dir.join(crate::state::VIDEO_SOCKET),
        port_file: spec.dir.join(SERCON_PORT_FILE),
    }
}

/// The fw_cfg file that points SeaBIOS's serial console at COM2.
const SERCON_PORT_FILE: &str = "sercon-port";

/// What QEMU boots for a firmware disk: a raw image or ISO as it is (raw data names no other
/// file), any other format as a private raw copy in the VM's directory, written by kiln's own
/// reader. QEMU never parses a VMDK descriptor, a VHD, a VDI or a QCOW2 header itself, so no
/// difference between its parser and kiln's can make it open a file kiln did not check. The
/// guest's writes to a copy stay in the copy.
fn firmware_drive(spec: &VmSpec) -> PathBuf {
    let disk = &spec.disks[0];
    if needs_copy(disk.format) {
        spec.dir.join(FIRMWARE_COPY)
    } else {
        disk.path.clone()
    }
}

/// The private raw copy of a firmware disk in another format.
const FIRMWARE_COPY: &str = "disk.raw";

fn needs_copy(format: Format) -> bool {
    !matches!(format, Format::Raw | Format::Iso)
}

/// Makes the disks QEMU is handed out of what kiln validated: the raw copy of a firmware disk
/// (see [`firmware_drive`]; a resumed VM's is the snapshot's, put back by kiln); a Linux VM's
/// overlays are checked (their backing file is passed by path, see [`MicrovmDisk::backing`]).
fn prepare_disks(spec: &VmSpec, restoring: bool) -> Result<(), HostError> {
    match &spec.boot {
        Boot::Firmware { .. } => {
            let disk = &spec.disks[0];
            // Opening validates the image before anything else reads it.
            let mut reader = kiln_image::open(&disk.path)?;
            if needs_copy(disk.format) && !restoring {
                kiln_image::write_image_with(
                    reader.as_mut(),
                    &firmware_drive(spec),
                    Format::Raw,
                    &kiln_image::WriteOptions { fsync: false },
                    &mut |_, _| {},
                )?;
            }
        }
        Boot::Linux { .. } => {
            for d in spec.disks.iter().filter(|d| d.backing.is_some()) {
                kiln_image::validate_overlay(&d.path)?;
            }
        }
    }
    Ok(())
}

impl Engine for QemuEngine {
    fn kind(&self) -> EngineKind {
        self.kind
    }

    fn command_line(&self, spec: &VmSpec) -> Vec<String> {
        self.launch(spec, None)
            .map(|(l, _)| l.command_line())
            .unwrap_or_default()
    }

    fn writable_disks(&self, spec: &VmSpec) -> Result<Vec<(String, PathBuf)>, HostError> {
        Ok(spec
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| {
                let path = match spec.boot {
                    Boot::Firmware { .. } => firmware_drive(spec),
                    Boot::Linux { .. } => d.path.clone(),
                };
                (d.device.clone(), path)
            })
            .collect())
    }

    fn start(
        &self,
        spec: &VmSpec,
        restore: Option<&Restore>,
    ) -> Result<Box<dyn Running>, HostError> {
        let format = restore
            .map(|r| {
                kiln_qemu::StateFormat::from_name(&r.format).ok_or_else(|| {
                    HostError::invalid(
                        "snapshot",
                        r.machine.display(),
                        format!("its machine state is in {:?}, not a QEMU format", r.format),
                    )
                })
            })
            .transpose()?;
        prepare_disks(spec, restore.is_some())?;
        // The network first: QEMU inherits its descriptor.
        let mut net = crate::net::attach(&spec.net, &spec.dir.join("engine.log"))?;
        let (mut launch, io) = self.launch(spec, net.fd())?;
        if restore.is_some() {
            launch
                .args
                .extend(kiln_qemu::INCOMING.iter().map(Into::into));
        }
        // The console server and the sockets QEMU's serial ports connect to exist before QEMU.
        let server = match &spec.console {
            ConsoleSpec::Socket { path, log, .. } => SocketConsole::bind(path, log.as_deref())?,
            ConsoleSpec::Terminal { .. } => {
                SocketConsole::bind(&spec.dir.join(crate::state::TERMINAL_SOCKET), None)?
            }
        };
        let com1 = Listener::bind(serial_socket(spec))?;
        let bios = match &spec.boot {
            Boot::Firmware { .. } if spec.console.bios() => {
                let bios = bios_console(spec);
                bios.write_port_file().map_err(|e| {
                    HostError::io(format!("{}: cannot write", bios.port_file.display()), e)
                })?;
                Some(Listener::bind(bios.socket)?)
            }
            _ => None,
        };
        tracing::info!(
            "{}: starting {} ({})",
            spec.name,
            self.kind.name(),
            spec.accelerator.name()
        );
        let mut vm = QemuVm::spawn(&launch, &io)?;
        net.started(&spec.dir.join("engine.log"))?;
        // QEMU connects while it initialises its devices, before its QMP greeting.
        let com1 = com1.accept("its serial port")?;
        let com2 = bios.map(|l| l.accept("its BIOS console")).transpose()?;
        let pumped = pump(com1, com2, server.clone())?;
        let terminal = match &spec.console {
            ConsoleSpec::Terminal { .. } => {
                let pid = vm.pid();
                Some(TerminalConsole::attach(&server, move || {
                    // Ending QEMU wakes the supervisor, which then finds the quit.
                    kiln_sys::process::signal(pid, libc::SIGKILL);
                })?)
            }
            ConsoleSpec::Socket { .. } => None,
        };
        if let (Some(restore), Some(format)) = (restore, format) {
            vm.load_state(&restore.machine, format, STATE_TIMEOUT)?;
        }
        Ok(Box::new(RunningQemu {
            vm,
            dir: spec.dir.clone(),
            pumped,
            terminal,
            quit: false,
            net,
        }))
    }
}

/// The longest a machine state may take to save or load (32 GiB of RAM at disk speed).
const STATE_TIMEOUT: Duration = Duration::from_secs(600);

/// A socket QEMU connects one of its serial ports to.
struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    fn bind(path: PathBuf) -> Result<Listener, HostError> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| HostError::io(format!("{}: cannot listen", path.display()), e))?;
        Ok(Listener { listener, path })
    }

    /// QEMU's connection (the socket file is removed: nobody else may connect).
    fn accept(self, what: &str) -> Result<UnixStream, HostError> {
        let stream = accept_within(&self.listener, Duration::from_secs(5)).map_err(|e| {
            HostError::io(
                format!("{}: QEMU did not connect {what}", self.path.display()),
                e,
            )
        })?;
        let _ = std::fs::remove_file(&self.path);
        Ok(stream)
    }
}

/// Accepts one connection on `listener`, waiting at most `timeout`.
fn accept_within(listener: &UnixListener, timeout: Duration) -> std::io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
}

/// The most bytes one read from a QEMU serial socket takes.
const CHUNK: usize = 4096;

/// Copies the guest's serial output from QEMU into the console server, and what the server's
/// clients type back to QEMU. With `com2` (SeaBIOS's serial console), keys go to both ports and
/// the two outputs are merged into one stream by a [`ConsoleMerge`] in streams order. The
/// receiver returned is disconnected once all of QEMU's output is in the server.
fn pump(
    com1: UnixStream,
    com2: Option<UnixStream>,
    mut server: SocketConsole,
) -> Result<Receiver<()>, HostError> {
    let (pumping, pumped) = std::sync::mpsc::channel::<()>();
    let clone = |s: &UnixStream| {
        s.try_clone()
            .map_err(|e| HostError::io("cannot clone QEMU's serial socket", e))
    };
    let to_com1 = std::sync::Arc::new(clone(&com1)?);
    let to_com2 = com2
        .as_ref()
        .map(clone)
        .transpose()?
        .map(std::sync::Arc::new);
    server.serve(move |bytes| {
        let _ = (&*to_com1).write_all(bytes);
        if let Some(com2) = &to_com2 {
            let _ = (&**com2).write_all(bytes);
        }
    });
    let Some(com2) = com2 else {
        std::thread::spawn(move || {
            let _pumping = pumping;
            let mut com1 = com1;
            let mut buf = [0u8; CHUNK];
            while let Ok(n @ 1..) = com1.read(&mut buf) {
                let _ = server.write_all(&buf[..n]);
            }
        });
        return Ok(pumped);
    };
    // Each chunk with the time it was read: the merge's clock is when bytes arrived, not
    // when a busy host got round to merging them.
    enum Port {
        Com1(Instant, Vec<u8>),
        Com2(Instant, Vec<u8>),
        Com1Closed,
    }
    // Bounded: a guest that prints faster than the console takes waits in QEMU.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Port>(64);
    let read = |mut from: UnixStream, tx: std::sync::mpsc::SyncSender<Port>, com1: bool| {
        std::thread::spawn(move || {
            let mut buf = [0u8; CHUNK];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let (at, data) = (Instant::now(), buf[..n].to_vec());
                let port = if com1 {
                    Port::Com1(at, data)
                } else {
                    Port::Com2(at, data)
                };
                if tx.send(port).is_err() {
                    return;
                }
            }
            if com1 {
                let _ = tx.send(Port::Com1Closed);
            }
        });
    };
    read(com1, tx.clone(), true);
    read(com2, tx, false);
    std::thread::spawn(move || {
        let _pumping = pumping;
        let mut merge = ConsoleMerge::new(MergeOrder::Streams);
        let mut out = Vec::new();
        loop {
            let event = match merge.deadline() {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx
                    .recv()
                    .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
            };
            let done = match event {
                Ok(Port::Com1(at, data)) => {
                    merge.tick(at, &mut out);
                    merge.serial(&data, at, &mut out);
                    false
                }
                Ok(Port::Com2(at, data)) => {
                    merge.tick(at, &mut out);
                    merge.video(&data, at, &mut out);
                    false
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    merge.tick(Instant::now(), &mut out);
                    false
                }
                Ok(Port::Com1Closed) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    merge.flush(&mut out);
                    true
                }
            };
            if !out.is_empty() {
                let _ = server.write_all(&out);
                out.clear();
            }
            if done {
                return;
            }
        }
    });
    Ok(pumped)
}

struct RunningQemu {
    vm: QemuVm,
    /// The VM's directory: QEMU writes its screendump there, never where the user asked.
    dir: PathBuf,
    /// Disconnected once QEMU's output is all in the console.
    pumped: Receiver<()>,
    /// A foreground VM's terminal relay.
    terminal: Option<TerminalConsole>,
    /// The user pressed Ctrl-A X on it.
    quit: bool,
    /// The VM's network, detached when this is dropped (after QEMU: fields drop in order).
    net: crate::net::Attached,
}

impl Drop for RunningQemu {
    /// QEMU ends first, then its last output reaches the console, then (as the fields drop)
    /// a terminal relay shows it.
    fn drop(&mut self) {
        self.vm.kill();
        let _ = self.pumped.recv_timeout(Duration::from_secs(1));
    }
}

/// What QEMU's account of its end means.
fn end_of(e: VmEnd) -> End {
    match e.reason.as_str() {
        "killed" => End::Killed,
        "guest-shutdown" if e.guest_initiated => End::PoweredOff,
        "guest-reset" => End::Reset,
        "host-qmp-quit" | "host-ui" => End::Quit,
        "guest-panic" => End::Crashed {
            reason: "guest panicked".into(),
        },
        other => {
            let how = match (e.exit_code, e.signal) {
                (_, Some(sig)) => format!("QEMU died from signal {sig}"),
                (Some(code), _) => format!("QEMU exited with status {code}"),
                _ => "QEMU ended".into(),
            };
            let said = if e.last_words.is_empty() {
                String::new()
            } else {
                format!(": {}", e.last_words)
            };
            End::Crashed {
                reason: format!("{how} ({other}){said}"),
            }
        }
    }
}

impl Running for RunningQemu {
    fn pid(&self) -> u32 {
        self.vm.pid()
    }

    fn network_pid(&self) -> Option<u32> {
        self.net.passt_pid()
    }

    /// QEMU's own `screendump` (PNG) into the VM's directory, then copied to `path` by kiln,
    /// so QEMU never opens a file the user named.
    fn screendump(&mut self, path: &std::path::Path) -> Result<(), HostError> {
        let shot = self.dir.join("screendump.png");
        let _ = std::fs::remove_file(&shot);
        self.vm
            .qmp()
            .execute(
                "screendump",
                Some(serde_json::json!({"filename": shot, "format": "png"})),
            )
            .map_err(|e| HostError::invalid("screendump", path.display(), format!("QEMU: {e}")))?;
        let bytes = std::fs::read(&shot)
            .map_err(|e| HostError::io(format!("{}: cannot read", shot.display()), e));
        let _ = std::fs::remove_file(&shot);
        kiln_sys::temp::write_atomic(path, &bytes?, None, 0o644)
            .map_err(|e| HostError::io(format!("{}: cannot write", path.display()), e))
    }

    fn settle(&mut self) {
        if let Err(e) = self.vm.negotiate() {
            tracing::debug!("QMP negotiation: {e}");
        }
    }

    fn power_button(&mut self) -> Result<(), HostError> {
        Ok(self.vm.power_button()?)
    }

    fn pause(&mut self) -> Result<(), HostError> {
        Ok(self.vm.pause()?)
    }

    fn save_state(&mut self, path: &std::path::Path) -> Result<String, HostError> {
        Ok(self.vm.save_state(path, STATE_TIMEOUT)?.name().to_string())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        Ok(self.vm.resume()?)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<End> {
        if !self.quit && self.terminal.as_ref().is_some_and(|t| t.quit_pressed()) {
            self.quit = true;
            self.vm.kill();
        }
        if self.quit {
            return Some(End::Quit);
        }
        self.vm.wait_timeout(Some(timeout)).map(end_of)
    }

    fn kill(&mut self) -> End {
        let end = end_of(self.vm.kill());
        if self.quit {
            End::Quit
        } else {
            end
        }
    }

    fn on_end(&mut self, notify: Box<dyn FnOnce() + Send>) {
        self.vm.on_exit(notify);
    }
}
