//! The engines behind one interface: every engine takes a [`VmSpec`] and returns a
//! [`Running`] handle that the one supervisor drives.

mod builtin;
mod qemu;

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
    /// Starts the VM; returns once it runs. The engine's process, if it has one, dies with the
    /// thread that called this.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Running>, HostError>;
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
