//! `kiln run`: boot an image and supervise it until it ends.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_image::Format;
use kiln_qemu::{Accel, Drive, DriveFormat, Machine, Media, QemuConfig, QemuVm, SerialMode, VmEnd};

/// Raw image sizes that boot as a floppy (360K .. 2.88M).
const FLOPPY_SIZES: [u64; 5] = [368_640, 737_280, 1_228_800, 1_474_560, 2_949_120];

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
}

/// How a supervised VM ended.
#[derive(Debug)]
pub enum RunOutcome {
    Ended(VmEnd),
    /// The guest ignored the power button for the whole timeout.
    Killed {
        timeout: Duration,
    },
}

impl RunOutcome {
    pub fn describe(&self) -> String {
        match self {
            RunOutcome::Ended(end) => end.describe(),
            RunOutcome::Killed { timeout } => format!(
                "guest did not power off within {} s of the power button; killed",
                timeout.as_secs_f64()
            ),
        }
    }

    /// Success means the guest (or the user at the console) ended the VM cleanly.
    pub fn success(&self) -> bool {
        matches!(self, RunOutcome::Ended(end) if end.guest_initiated
            || matches!(end.reason.as_str(), "host-qmp-quit" | "host-ui"))
    }
}

/// The QEMU drive for an image of any format kiln reads.
pub fn drive_for(image: &Path, media: Option<Media>) -> anyhow::Result<Drive> {
    // Opening validates the image (and a VMDK's extents) before QEMU is given it.
    let reader = kiln_image::open(image)?;
    let size = reader.virtual_size();
    let (format, detected_media) = match reader.format() {
        Format::Raw if FLOPPY_SIZES.contains(&size) => (DriveFormat::Raw, Media::Floppy),
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

/// Boots `opts.image` on QEMU with the serial console on this process's stdin/stdout.
///
/// Every signal number arriving on `signals` acts as `kiln stop`: the first presses the ACPI power
/// button and waits `stop_timeout` for the guest; a second kills the VM at once.
pub fn run_qemu(opts: &RunOptions, signals: &Receiver<i32>) -> anyhow::Result<RunOutcome> {
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
    config.serial = SerialMode::Terminal {
        bios_console: !opts.serial_only,
    };
    tracing::info!(
        "booting {} on qemu {} ({})",
        opts.image.display(),
        config.machine.name(),
        config.accel.name()
    );
    let mut vm = QemuVm::spawn(&config)?;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        if let Some(end) = vm.wait_timeout(Some(Duration::from_millis(50))) {
            return Ok(RunOutcome::Ended(end));
        }
        if signals.try_recv().is_ok() {
            if stop_deadline.is_some() {
                vm.kill();
                return Ok(RunOutcome::Ended(VmEnd {
                    exit_code: None,
                    signal: None,
                    reason: "killed".into(),
                    guest_initiated: false,
                }));
            }
            tracing::info!("pressing the ACPI power button");
            vm.power_button()?;
            stop_deadline = Some(Instant::now() + opts.stop_timeout);
        }
        if stop_deadline.is_some_and(|d| Instant::now() > d) {
            vm.kill();
            return Ok(RunOutcome::Killed {
                timeout: opts.stop_timeout,
            });
        }
    }
}
