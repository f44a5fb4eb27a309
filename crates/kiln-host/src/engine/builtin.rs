//! kiln's own VMM (kiln-vmm) behind the engine interface: any image kiln-image opens becomes
//! the boot disk, and the VM runs on a vCPU thread of this process.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kiln_image::{BootMedia, ImageDevice, ImageReader};
use kiln_sys::process::EndHook;
use kiln_vmm::{BootDevice, ExitReason, VideoOutput, Vm, VmConfig, VmHandle};

use super::{Engine, Restore, Running};
use crate::console::{SocketConsole, TerminalConsole};
use crate::{Boot, ConsoleSpec, End, EngineKind, HostError, VmSpec};

/// The builtin VMM as a kiln engine (firmware guests, KVM).
pub struct BuiltinEngine;

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

fn open_disk(spec: &VmSpec) -> Result<ImageDisk, HostError> {
    let disk = &spec.disks[0];
    if disk.read_only || disk.format == kiln_image::Format::Iso {
        return Ok(ImageDisk::ReadOnly(kiln_image::open(&disk.path)?));
    }
    match kiln_image::open_rw(&disk.path) {
        Ok(image) => Ok(ImageDisk::Writable(image)),
        // Formats kiln cannot update in place still boot; the guest's writes fail.
        Err(kiln_image::ImageError::Unsupported { .. }) => {
            tracing::warn!(
                "{}: {} images open read-only here; guest disk writes will fail",
                disk.path.display(),
                disk.format.name()
            );
            Ok(ImageDisk::ReadOnly(kiln_image::open(&disk.path)?))
        }
        Err(e) => Err(e.into()),
    }
}

impl Engine for BuiltinEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Builtin
    }

    /// The VM writes into its image in place: a snapshot copies the image, which must be one
    /// file (not a VMDK descriptor with extents elsewhere).
    fn writable_disks(&self, spec: &VmSpec) -> Result<Vec<(String, PathBuf)>, HostError> {
        let mut out = Vec::new();
        for d in spec.disks.iter().filter(|d| !d.read_only) {
            let files = kiln_image::inspect(&d.path)?.files;
            if files.len() != 1 {
                return Err(HostError::invalid(
                    "snapshot",
                    d.path.display(),
                    format!(
                        "the disk's data is in {} files; `kiln convert` it to a one-file format to snapshot the VM",
                        files.len()
                    ),
                ));
            }
            out.push((d.device.clone(), d.path.clone()));
        }
        Ok(out)
    }

    fn command_line(&self, _spec: &VmSpec) -> Vec<String> {
        Vec::new()
    }

    fn start(
        &self,
        spec: &VmSpec,
        restore: Option<&Restore>,
    ) -> Result<Box<dyn Running>, HostError> {
        if let Some(r) = restore.filter(|r| r.format != kiln_vmm::persist::FORMAT) {
            return Err(HostError::invalid(
                "snapshot",
                r.machine.display(),
                format!(
                    "its machine state is in {:?}, not the builtin VMM's",
                    r.format
                ),
            ));
        }
        let Boot::Firmware { media } = spec.boot else {
            return Err(HostError::invalid(
                "engine",
                "builtin",
                "the builtin VMM boots firmware guests only",
            ));
        };
        // No separate KVM probe: on a paravirtual KVM creating a VM costs milliseconds, and
        // `Vm::new` says clearly why KVM cannot be used.
        let disk = open_disk(spec)?;
        let bios = spec.console.bios();
        let config = VmConfig {
            ram_mib: spec.ram_mib,
            boot: match media {
                BootMedia::Disk => BootDevice::HardDisk,
                BootMedia::Cdrom => BootDevice::Cdrom,
                BootMedia::Floppy => BootDevice::Floppy,
            },
            video: if bios {
                VideoOutput::Console
            } else {
                VideoOutput::VgaOnly
            },
        };
        // The console is a socket server whatever it is shown on: a terminal is one more client.
        let socket = match &spec.console {
            ConsoleSpec::Terminal { .. } => {
                SocketConsole::bind(&spec.dir.join(crate::state::TERMINAL_SOCKET), None)?
            }
            ConsoleSpec::Socket { path, log, .. } => SocketConsole::bind(path, log.as_deref())?,
        };
        let mut vm = match restore {
            Some(r) => Vm::restore(config, Box::new(disk), Box::new(socket.clone()), &r.machine)?,
            None => Vm::new(config, Box::new(disk), Box::new(socket.clone()))?,
        };
        let handle = vm.handle();
        let input = handle.clone();
        socket.serve(move |bytes| input.send_input(bytes));
        let terminal = match &spec.console {
            ConsoleSpec::Terminal { .. } => {
                let vm = handle.clone();
                // Ending the VM wakes the supervisor, which then finds the quit.
                Some(TerminalConsole::attach(&socket, move || vm.kill())?)
            }
            ConsoleSpec::Socket { .. } => None,
        };
        let (tx, ended) = mpsc::channel();
        let notify: Arc<EndHook> = Arc::default();
        let on_end = Arc::clone(&notify);
        thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let _ = tx.send(vm.run());
                on_end.fire();
            })
            .map_err(|e| HostError::io("cannot start the vCPU thread", e))?;
        Ok(Box::new(RunningBuiltin {
            handle,
            ended,
            end: None,
            notify,
            terminal,
        }))
    }
}

/// A VM of the builtin engine running on its vCPU thread.
struct RunningBuiltin {
    handle: VmHandle,
    ended: Receiver<Result<ExitReason, kiln_vmm::VmmError>>,
    end: Option<End>,
    notify: Arc<EndHook>,
    /// A foreground VM's terminal relay.
    terminal: Option<TerminalConsole>,
}

fn end_of(result: Result<ExitReason, kiln_vmm::VmmError>) -> End {
    match result {
        Ok(ExitReason::PoweredOff) => End::PoweredOff,
        Ok(ExitReason::Reset) => End::Reset,
        Ok(ExitReason::Killed) => End::Killed,
        Ok(ExitReason::Halted) => End::Crashed {
            reason: "guest halted with interrupts off; it can never continue".into(),
        },
        Err(e) => End::Crashed {
            reason: format!("VM failed: {e}"),
        },
    }
}

impl RunningBuiltin {
    fn finish(&mut self, end: End) -> End {
        self.handle.kill();
        let _ = self.ended.recv();
        self.end = Some(end.clone());
        end
    }
}

impl Running for RunningBuiltin {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn power_button(&mut self) -> Result<(), HostError> {
        self.handle.press_power_button();
        Ok(())
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<End> {
        if let Some(end) = &self.end {
            return Some(end.clone());
        }
        if self.terminal.as_ref().is_some_and(|t| t.quit_pressed()) {
            return Some(self.finish(End::Quit));
        }
        let result = self.ended.recv_timeout(timeout).ok()?;
        let end = end_of(result);
        self.end = Some(end.clone());
        Some(end)
    }

    fn kill(&mut self) -> End {
        match &self.end {
            Some(end) => end.clone(),
            None => self.finish(End::Killed),
        }
    }

    fn on_end(&mut self, notify: Box<dyn FnOnce() + Send>) {
        self.notify.set(notify);
    }

    fn screendump(&mut self, path: &std::path::Path) -> Result<(), HostError> {
        let shot = self.handle.screenshot();
        super::write_png(path, shot.width, shot.height, &shot.rgb)
    }

    fn pause(&mut self) -> Result<(), HostError> {
        self.handle
            .pause(Duration::from_secs(5))
            .map_err(HostError::from)
    }

    fn save_state(&mut self, path: &std::path::Path) -> Result<String, HostError> {
        self.handle.save(path).map_err(HostError::from)?;
        Ok(kiln_vmm::persist::FORMAT.to_string())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.handle.resume();
        Ok(())
    }

    fn statistics(&self) -> Option<String> {
        let c = self.handle.counters();
        Some(format!(
            "VM exits: {} total ({} port I/O, {} BIOS calls, {} MMIO, {} hlt)",
            c.total, c.io, c.bios, c.mmio, c.hlt
        ))
    }
}
