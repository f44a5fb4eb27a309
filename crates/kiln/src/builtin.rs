//! The builtin engine (kiln-vmm) behind `kiln run`: any image kiln-image opens becomes the boot
//! disk, the terminal becomes COM1, and the VM runs on its own thread under [`supervise`].
//!
//! [`supervise`]: crate::run::supervise

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use kiln_image::{Format, ImageDevice, ImageReader};
use kiln_vmm::{BootDevice, ExitReason, VideoOutput, Vm, VmConfig, VmHandle};

use crate::run::{Outcome, Supervised};

/// Ctrl-A, the console escape (as in QEMU): Ctrl-A X quits, Ctrl-A Ctrl-A sends Ctrl-A.
const ESCAPE: u8 = 0x01;

/// A kiln-image disk as the VMM's int 13h sees it: writable where kiln-image can update the
/// format in place, read-only otherwise (an ISO, a VDI).
enum ImageDisk {
    Writable(Box<dyn ImageDevice>),
    ReadOnly(Box<dyn ImageReader>),
}

fn io_error(e: kiln_image::ImageError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl ImageDisk {
    fn reader(&self) -> &dyn ImageReader {
        match self {
            ImageDisk::Writable(d) => d.as_ref(),
            ImageDisk::ReadOnly(r) => r.as_ref(),
        }
    }
}

impl kiln_vmm::Disk for ImageDisk {
    fn size(&self) -> u64 {
        self.reader().virtual_size()
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match self {
            ImageDisk::Writable(d) => d.read_at(buf, off),
            ImageDisk::ReadOnly(r) => r.read_at(buf, off),
        }
        .map_err(io_error)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let ImageDisk::Writable(image) = self else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        };
        image.write_at(buf, off).map_err(io_error)?;
        // The guest has no flush; make each BIOS write durable so a killed VM loses nothing.
        image.flush().map_err(io_error)
    }
}

/// What `kiln run --engine builtin` boots and how.
#[derive(Clone, Debug)]
pub struct BuiltinOptions {
    pub image: std::path::PathBuf,
    /// Detected from the image when `None`.
    pub boot: Option<BootDevice>,
    pub ram_mib: u32,
    /// Serial only: int 10h text goes to the VGA buffer, not the terminal.
    pub serial_only: bool,
    /// Serve the console on this Unix socket instead of stdin/stdout.
    pub console_socket: Option<std::path::PathBuf>,
}

/// A VM of the builtin engine running on its own thread.
pub struct BuiltinVm {
    handle: VmHandle,
    ended: Receiver<Result<ExitReason, kiln_vmm::VmmError>>,
    quit: Receiver<()>,
    end: Option<Outcome>,
    _terminal: Option<RawTerminal>,
    /// The console socket, removed when the VM is gone.
    console_socket: Option<PathBuf>,
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        if let Some(path) = &self.console_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl BuiltinVm {
    /// Opens the image, builds the VM and starts it, with the console on stdin/stdout.
    /// `on_end` runs (on the vCPU thread) once the VM has ended, however it ended.
    pub fn start(
        opts: &BuiltinOptions,
        on_end: Box<dyn FnOnce() + Send>,
    ) -> anyhow::Result<BuiltinVm> {
        let format = kiln_image::detect(&opts.image)?;
        let disk = if format == Format::Iso {
            ImageDisk::ReadOnly(kiln_image::open(&opts.image)?)
        } else {
            match kiln_image::open_rw(&opts.image) {
                Ok(image) => ImageDisk::Writable(image),
                // Formats kiln cannot update in place still boot; the guest's writes fail.
                Err(kiln_image::ImageError::Unsupported { .. }) => {
                    tracing::warn!(
                        "{}: {} images open read-only here; guest disk writes will fail",
                        opts.image.display(),
                        format.name()
                    );
                    ImageDisk::ReadOnly(kiln_image::open(&opts.image)?)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let boot = opts.boot.unwrap_or(match format {
            Format::Iso => BootDevice::Cdrom,
            Format::Raw if kiln_image::is_floppy_size(disk.reader().virtual_size()) => {
                BootDevice::Floppy
            }
            _ => BootDevice::HardDisk,
        });
        let config = VmConfig {
            ram_mib: opts.ram_mib,
            boot,
            video: if opts.serial_only {
                VideoOutput::VgaOnly
            } else {
                VideoOutput::Console
            },
        };
        let (quit_tx, quit) = mpsc::channel();
        let (console, socket): (Box<dyn Write + Send>, _) = match &opts.console_socket {
            None => (Box::new(Console), None),
            Some(path) => {
                let socket = SocketConsole::bind(path)?;
                (Box::new(socket.clone()), Some(socket))
            }
        };
        let mut vm = Vm::new(config, Box::new(disk), console)
            .with_context(|| format!("{}: cannot start the VM", opts.image.display()))?;
        let handle = vm.handle();
        let terminal = match socket {
            Some(socket) => {
                socket.serve(handle.clone());
                None
            }
            None => {
                let input = handle.clone();
                thread::spawn(move || forward_input(&input, &quit_tx));
                RawTerminal::enter()
            }
        };
        let (tx, ended) = mpsc::channel();
        thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let _ = tx.send(vm.run());
                on_end();
            })
            .context("cannot start the vCPU thread")?;
        Ok(BuiltinVm {
            handle,
            ended,
            quit,
            end: None,
            _terminal: terminal,
            console_socket: opts.console_socket.clone(),
        })
    }

    /// VM-exit counters so far.
    pub fn counters(&self) -> kiln_vmm::ExitCounters {
        self.handle.counters()
    }
}

fn outcome_of(result: Result<ExitReason, kiln_vmm::VmmError>) -> Outcome {
    let (reason, description, success) = match result {
        Ok(ExitReason::PoweredOff) => ("powered-off", "guest powered off".to_string(), true),
        Ok(ExitReason::Reset) => (
            "reset",
            "guest reset (reboot ends the VM)".to_string(),
            true,
        ),
        Ok(ExitReason::Killed) => ("killed", "killed".to_string(), false),
        Ok(ExitReason::Halted) => (
            "halted",
            "guest halted with interrupts off; it can never continue".to_string(),
            false,
        ),
        Err(e) => ("error", format!("VM failed: {e}"), false),
    };
    Outcome {
        reason: reason.into(),
        description,
        success,
    }
}

impl Supervised for BuiltinVm {
    fn power_button(&mut self) -> anyhow::Result<()> {
        self.handle.press_power_button();
        Ok(())
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<Outcome> {
        if let Some(end) = &self.end {
            return Some(end.clone());
        }
        if self.quit.try_recv().is_ok() {
            self.handle.kill();
            let _ = self.ended.recv();
            self.end = Some(Outcome {
                reason: "quit".into(),
                description: "quit from the console".into(),
                success: true,
            });
            return self.end.clone();
        }
        let result = self.ended.recv_timeout(timeout).ok()?;
        self.end = Some(outcome_of(result));
        self.end.clone()
    }

    fn kill(&mut self) -> Outcome {
        if self.end.is_none() {
            self.handle.kill();
            let _ = self.ended.recv();
            self.end = Some(Outcome {
                reason: "killed".into(),
                description: "killed".into(),
                success: false,
            });
        }
        self.end
            .clone()
            .unwrap_or_else(|| outcome_of(Ok(ExitReason::Killed)))
    }
}

/// The guest's console output: straight to stdout, flushed per write so a pipe sees it at once.
struct Console;

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// The console served on a Unix socket: one client at a time gets the output (starting with a
/// replay of the last [`BACKLOG`] bytes, so a client that connects late still sees the banner)
/// and its input goes to the guest.
#[derive(Clone)]
struct SocketConsole {
    listener: Arc<UnixListener>,
    state: Arc<Mutex<SocketState>>,
}

#[derive(Default)]
struct SocketState {
    backlog: VecDeque<u8>,
    client: Option<UnixStream>,
}

/// How much recent output a newly connected console client is shown.
const BACKLOG: usize = 64 << 10;

impl SocketConsole {
    fn bind(path: &Path) -> anyhow::Result<SocketConsole> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("{}: cannot listen", path.display()))?;
        Ok(SocketConsole {
            listener: Arc::new(listener),
            state: Arc::default(),
        })
    }

    /// Accepts clients one after another, each replacing the previous one.
    fn serve(self, vm: VmHandle) {
        thread::spawn(move || {
            for conn in self.listener.incoming().map_while(Result::ok) {
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                {
                    let Ok(mut state) = self.state.lock() else {
                        return;
                    };
                    let (a, b) = state.backlog.as_slices();
                    let mut w = &conn;
                    if w.write_all(a).and_then(|_| w.write_all(b)).is_err() {
                        continue;
                    }
                    state.client = Some(conn);
                }
                let vm = vm.clone();
                thread::spawn(move || {
                    let mut reader = reader;
                    let mut buf = [0u8; 512];
                    while let Ok(n @ 1..) = reader.read(&mut buf) {
                        vm.send_input(&buf[..n]);
                    }
                });
            }
        });
    }
}

impl Write for SocketConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("console lock poisoned"))?;
        state.backlog.extend(buf);
        let excess = state.backlog.len().saturating_sub(BACKLOG);
        state.backlog.drain(..excess);
        if let Some(client) = &state.client {
            let mut w = client;
            if w.write_all(buf).is_err() {
                // The client went away; output keeps filling the backlog for the next one.
                state.client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies stdin to the guest, handling the Ctrl-A escape; ends at EOF or Ctrl-A X.
fn forward_input(vm: &VmHandle, quit: &mpsc::Sender<()>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 512];
    let mut escaped = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            match (escaped, b) {
                (false, ESCAPE) => escaped = true,
                (true, b'x' | b'X') => {
                    if !out.is_empty() {
                        vm.send_input(&out);
                    }
                    let _ = quit.send(());
                    // Ending the VM wakes the supervisor, which then finds the quit.
                    vm.kill();
                    return;
                }
                (true, b) => {
                    escaped = false;
                    out.push(b);
                }
                (false, b) => out.push(b),
            }
        }
        if !out.is_empty() {
            vm.send_input(&out);
        }
    }
}

/// A terminal on stdin put in raw mode while the VM runs; restored on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: termios calls on fd 0 with structs we own.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing off too: the guest sends CR LF itself.
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores what `enter` read from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}
