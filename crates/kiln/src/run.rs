//! `kiln run`: boot an image and supervise it until it ends.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_image::Format;
use kiln_qemu::{Accel, Drive, DriveFormat, Machine, Media, QemuConfig, QemuVm, SerialMode, VmEnd};

use crate::control::{Incoming, Reply, Request};

/// What `kiln run` boots and how.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub image: PathBuf,
    pub machine: Machine,
    /// How the guest sees the image; detected from the image when `None`.
    pub media: Option<Media>,
    /// Serial only, without the BIOS screen mirrored onto the terminal.
    pub serial_only: bool,
    pub ram_mib: u32,
    /// How long `stop` waits for the guest to power off before killing it.
    pub stop_timeout: Duration,
    /// Forced accelerator; detected when `None`.
    pub accel: Option<Accel>,
    pub name: Option<String>,
    /// Serve the serial console on this Unix socket instead of the terminal.
    pub console_socket: Option<PathBuf>,
}

/// How a supervised VM ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `powered-off`, `killed`, `quit`, `reset`, or the engine's own reason.
    pub reason: String,
    /// One line for people.
    pub description: String,
    /// The guest (or the user at the console) ended the VM cleanly.
    pub success: bool,
}

impl Outcome {
    fn killed(description: String) -> Outcome {
        Outcome {
            reason: "killed".into(),
            description,
            success: false,
        }
    }
}

impl From<VmEnd> for Outcome {
    fn from(end: VmEnd) -> Outcome {
        let reason = match end.reason.as_str() {
            _ if end.guest_powered_off() => "powered-off",
            "host-qmp-quit" | "host-ui" => "quit",
            "guest-reset" => "reset",
            other => other,
        };
        Outcome {
            reason: reason.to_string(),
            description: end.describe(),
            success: end.guest_initiated || reason == "quit",
        }
    }
}

/// A running VM as the supervisor sees it, whatever the engine.
pub trait Supervised {
    /// Presses the ACPI power button.
    fn power_button(&mut self) -> anyhow::Result<()>;
    /// Waits up to `timeout` for the VM to end.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<Outcome>;
    /// Ends the VM at once.
    fn kill(&mut self) -> Outcome;
}

impl Supervised for QemuVm {
    fn power_button(&mut self) -> anyhow::Result<()> {
        Ok(QemuVm::power_button(self)?)
    }
    fn wait_timeout(&mut self, timeout: Duration) -> Option<Outcome> {
        QemuVm::wait_timeout(self, Some(timeout)).map(Outcome::from)
    }
    fn kill(&mut self) -> Outcome {
        QemuVm::kill(self).into()
    }
}

/// What reaches a supervisor while its VM runs.
pub enum Event {
    /// SIGTERM or SIGHUP: the first acts as `kiln stop`, a second kills.
    Signal(i32),
    /// A `kiln stop` / `kiln kill` from the control socket.
    Control(Incoming),
    /// The VM has ended (posted by its engine, so the supervisor need not poll).
    Ended,
}

/// Runs `vm` until it ends, answering signals and control requests: a stop presses the power
/// button and kills the VM if it is still running `stop_timeout` later.
pub fn supervise(
    vm: &mut dyn Supervised,
    events: &Receiver<Event>,
    stop_timeout: Duration,
) -> Outcome {
    let mut deadline: Option<(Instant, Duration)> = None;
    let mut waiting: Vec<Incoming> = Vec::new();
    let outcome = 'run: loop {
        // Block until something happens: an event, the VM's end (its engine posts
        // `Event::Ended`), or the stop deadline. The 1 s cap is a safety net, not a poll.
        let wait = deadline
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let first = match events.recv_timeout(wait) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            // Nobody can send any more; only the VM's own end is left to wait for.
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(end) = vm.wait_timeout(Duration::from_secs(1)) {
                    break end;
                }
                None
            }
        };
        if let Some(end) = vm.wait_timeout(Duration::ZERO) {
            if let Some(Event::Control(incoming)) = first {
                waiting.push(incoming);
            }
            break end;
        }
        for event in first
            .into_iter()
            .chain(std::iter::from_fn(|| events.try_recv().ok()))
        {
            // Everything but a kill presses the button (once) with this timeout.
            let timeout = match event {
                Event::Ended => continue,
                Event::Signal(_) if deadline.is_some() => {
                    let mut end = vm.kill();
                    end.description = "killed (second signal)".into();
                    break 'run end;
                }
                Event::Signal(_) => stop_timeout,
                Event::Control(incoming) => {
                    let what = incoming.request.clone();
                    waiting.push(incoming);
                    match what {
                        Request::Kill => break 'run vm.kill(),
                        Request::Stop { timeout_s } => Duration::from_secs_f64(timeout_s.max(0.0)),
                    }
                }
            };
            if deadline.is_none() {
                tracing::info!("pressing the ACPI power button");
                if let Err(e) = vm.power_button() {
                    tracing::warn!("power button: {e:#}");
                }
                deadline = Some((Instant::now() + timeout, timeout));
            }
        }
        if let Some((at, timeout)) = deadline {
            if Instant::now() > at {
                vm.kill();
                break Outcome::killed(format!(
                    "guest did not power off within {} s of the power button; killed",
                    timeout.as_secs_f64()
                ));
            }
        }
    };
    let reply = Reply {
        outcome: outcome.reason.clone(),
        description: outcome.description.clone(),
    };
    for w in waiting {
        w.answer(&reply);
    }
    outcome
}

/// The QEMU drive for an image of any format kiln reads.
pub fn drive_for(image: &Path, media: Option<Media>) -> anyhow::Result<Drive> {
    // Opening validates the image (and a VMDK's extents) before QEMU is given it.
    let reader = kiln_image::open(image)?;
    let size = reader.virtual_size();
    let (format, detected_media) = match reader.format() {
        Format::Raw if kiln_image::is_floppy_size(size) => (DriveFormat::Raw, Media::Floppy),
        Format::Raw => (DriveFormat::Raw, Media::Disk),
        Format::Iso => (DriveFormat::Raw, Media::Cdrom),
        Format::Qcow2 => (DriveFormat::Qcow2, Media::Disk),
        Format::Vmdk => (DriveFormat::Vmdk, Media::Disk),
        Format::Vhd => (DriveFormat::Vpc, Media::Disk),
        Format::Vdi => (DriveFormat::Vdi, Media::Disk),
    };
    Ok(Drive {
        path: image.to_path_buf(),
        format,
        media: media.unwrap_or(detected_media),
        read_only: false,
    })
}

/// Boots `opts.image` on QEMU with the serial console on this process's stdin/stdout, and
/// supervises it until it ends (see [`supervise`]).
pub fn run_qemu(
    opts: &RunOptions,
    events: &Receiver<Event>,
    notify: Sender<Event>,
) -> anyhow::Result<Outcome> {
    let drive = drive_for(&opts.image, opts.media)?;
    let runtime = tempfile::Builder::new()
        .prefix("kiln-run-")
        .tempdir()
        .context("cannot create a runtime directory")?;
    let mut config = QemuConfig::firmware(drive, runtime.path().join("qmp.sock"));
    config.machine = opts.machine;
    config.memory_mib = opts.ram_mib;
    config.name = opts.name.clone();
    if let Some(accel) = opts.accel {
        config.accel = accel;
    }
    config.serial = match &opts.console_socket {
        Some(path) => SerialMode::UnixSocket(path.clone()),
        None => SerialMode::Terminal {
            bios_console: !opts.serial_only,
        },
    };
    tracing::info!(
        "booting {} on qemu {} ({})",
        opts.image.display(),
        config.machine.name(),
        config.accel.name()
    );
    let mut vm = QemuVm::spawn(&config)?;
    vm.on_exit(Box::new(move || {
        let _ = notify.send(Event::Ended);
    }));
    Ok(supervise(&mut vm, events, opts.stop_timeout))
}
