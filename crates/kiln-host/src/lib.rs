//! kiln's Linux microVM lifecycle on one host.
//!
//! A [`Host`] is a state directory (`$KILN_HOME`, default `~/.local/share/kiln`) holding
//! `vms/NAME/` for each VM: `vm.json` (written atomically), the copy-on-write root overlay
//! (a QCOW2 file whose backing file is the read-only base rootfs), the VM's own ext4 disks for
//! `/home` and `/var`, `serial.log`, and the console and QMP sockets.
//!
//! [`Host::run`] validates a [`RunRequest`], claims the name (exactly one of two racing runs
//! wins), prepares storage and starts the VM through an [`Engine`] under a small supervisor
//! process that records how the VM ended. [`Host::stop`] presses the ACPI power button and
//! kills after a timeout; [`Host::kill`], [`Host::remove`] and [`Host::list`] do the rest.

mod console;
mod engine;
mod error;
mod image;
mod lock;
mod name;
mod proc;
mod run;
mod size;
mod state;
mod storage;

pub use console::{attach_console, ConsoleEnd, DETACH_KEY};
pub use engine::{Ended, Engine, LaunchDisk, LaunchSpec, QemuMicrovm, ShutdownWatch, Started};
pub use error::HostError;
pub use image::{ImageManifest, IMAGE_MANIFEST};
pub use kiln_image::create_overlay;
pub use name::{generate_name, validate_name};
pub use proc::rss_kib;
pub use run::{
    Host, RunRequest, StopReport, DEFAULT_RAM_MIB, DEFAULT_VCPUS, MAX_RAM_MIB, MAX_VCPUS,
};
pub use size::{format_size, parse_size, DEFAULT_DISK_SIZE};
pub use state::{now_rfc3339, VmConfig, VmDisk, VmMeta, VmRecord, VmState};
pub use storage::{extract_dir, make_ext4_disk};

/// Result alias for this crate.
pub type Result<T, E = HostError> = std::result::Result<T, E>;
