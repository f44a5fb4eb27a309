//! kiln's QEMU engine.
//!
//! [`QemuConfig`] (pc, q35) and [`MicrovmConfig`] describe a machine and turn it into a
//! [`Launch`] (a `qemu-system-x86_64` command line);
//! [`QemuVm`] runs it under supervision with a [`Qmp`] connection, so kiln can press the ACPI
//! power button and learn *why* QEMU stopped (guest power-off, host quit, kill), and pause it,
//! save its state to a file and load it again ([`StateFormat`]).

mod accel;
mod config;
mod microvm;
mod qmp;
mod state;
mod vm;

pub use accel::{host_has_hw_virt, kvm_usable, Accel};
pub use config::{
    BiosConsole, Drive, DriveFormat, Machine, Media, QemuConfig, SerialMode, SERCON_PORT,
};
pub use microvm::{
    default_kernel_cmdline, host_tsc_khz, MicrovmConfig, MicrovmDisk, MicrovmNet, NetBackend,
};
pub use qmp::{Qmp, QmpError};
pub use state::{StateFormat, INCOMING};
pub use vm::{Launch, QemuIo, QemuVm, VmEnd};

use std::path::PathBuf;

/// Errors of the QEMU engine. Each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot start {binary}: {source} (install it with `apt-get install qemu-system-x86`)")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("QEMU exited before its QMP socket {path} came up: {detail}")]
    EarlyExit { path: PathBuf, detail: String },
    #[error("QMP socket {path}: {source}")]
    Qmp { path: PathBuf, source: QmpError },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}
