//! The engines behind one interface: every engine takes a [`VmSpec`] and returns a
//! [`Running`] handle that the one supervisor drives.

mod builtin;
mod qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{End, EngineKind, HostError, VmSpec};

pub use builtin::BuiltinEngine;
pub use qemu::QemuEngine;

/// A way to run VMs.
pub trait Engine: Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// The command line that runs the VM, for vm.json and for running it by hand (empty for
    /// engines that run inside kiln).
    fn command_line(&self, spec: &VmSpec) -> Vec<String>;
    /// Starts the VM, from `restore`'s machine state instead of booting when given (its disks
    /// already hold the snapshot's content); returns once it runs. The engine's process, if
    /// it has one, dies with the thread that called this.
    fn start(
        &self,
        spec: &VmSpec,
        restore: Option<&Restore>,
    ) -> Result<Box<dyn Running>, HostError>;
    /// The files the guest's writable disks live in while it runs, by device: what a snapshot
    /// copies and a resume puts back. An error when a disk cannot be copied as one file.
    fn writable_disks(&self, spec: &VmSpec) -> Result<Vec<(String, PathBuf)>, HostError> {
        Ok(spec
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| (d.device.clone(), d.path.clone()))
            .collect())
    }
}

/// A machine state to start from: a checked snapshot's (see [`crate::snapshot`]).
#[derive(Clone, Debug)]
pub struct Restore {
    /// The state file.
    pub machine: PathBuf,
    /// How the engine wrote it ([`Running::save_state`]'s answer).
    pub format: String,
}

/// The error of an engine that cannot take snapshots.
pub(crate) fn no_snapshots(what: &str) -> HostError {
    HostError::invalid(
        "snapshot",
        what,
        "this VM's engine cannot save or restore a running machine",
    )
}

/// A running VM, whatever its engine.
pub trait Running: Send {
    /// The process that runs the guest (QEMU's, or this one for the builtin VMM).
    fn pid(&self) -> u32;
    /// The process that runs the VM's network (passt), if it has one.
    fn network_pid(&self) -> Option<u32> {
        None
    }
    /// Called once the start has been reported: finish what need not delay it.
    fn settle(&mut self) {}
    /// Presses the ACPI power button.
    fn power_button(&mut self) -> Result<(), HostError>;
    /// Waits up to `timeout` for the VM to end.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<End>;
    /// Ends the VM at once.
    fn kill(&mut self) -> End;
    /// Runs `notify` (on any thread) once the VM has ended; at once if it already has.
    fn on_end(&mut self, notify: Box<dyn FnOnce() + Send>);
    /// Writes a PNG picture of the VM's screen to `path` (atomically).
    fn screendump(&mut self, path: &std::path::Path) -> Result<(), HostError> {
        Err(HostError::invalid(
            "screendump",
            path.display(),
            "this engine has no screen to show",
        ))
    }
    /// Pauses the guest; its writable disks are a consistent point in time on the host until
    /// [`Running::resume`].
    fn pause(&mut self) -> Result<(), HostError> {
        Err(no_snapshots("pause"))
    }
    /// Writes the paused machine (vCPUs, devices, memory) to the new file `path`; returns the
    /// name of the format it wrote, which [`Engine::start`] gets back in a [`Restore`].
    fn save_state(&mut self, path: &Path) -> Result<String, HostError> {
        Err(no_snapshots(&path.display().to_string()))
    }
    /// Lets a paused guest run again.
    fn resume(&mut self) -> Result<(), HostError> {
        Err(no_snapshots("resume"))
    }
    /// Engine statistics worth a log line when the VM has ended.
    fn statistics(&self) -> Option<String> {
        None
    }
}

/// Writes an RGB picture (`width * height * 3` bytes) to `path` as PNG, atomically.
pub(crate) fn write_png(
    path: &std::path::Path,
    width: u32,
    height: u32,
    rgb: &[u8],
) -> Result<(), HostError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(rgb))
        .map_err(|e| {
            HostError::invalid(
                "screendump",
                path.display(),
                format!("cannot encode PNG: {e}"),
            )
        })?;
    kiln_sys::temp::write_atomic(path, &bytes, None, 0o644)
        .map_err(|e| HostError::io(format!("{}: cannot write", path.display()), e))
}

/// The engine of `kind`.
pub fn engine(kind: EngineKind) -> Box<dyn Engine> {
    match kind {
        EngineKind::Builtin => Box::new(BuiltinEngine),
        other => Box::new(QemuEngine::new(other)),
    }
}
