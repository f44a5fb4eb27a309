//! kiln's one VM model: one launch spec, one engine interface, one registry, one supervisor.
//!
//! - [`VmSpec`] (`spec`) is everything an engine needs to start a VM: name, resources, boot
//!   (a firmware disk with its media, or a Linux kernel + initrd + cmdline + disks), console,
//!   network. Requests ([`DiskRequest`], [`RunRequest`]) are validated into one.
//! - [`Engine`] (`engine/`) starts a spec and returns a [`Running`] handle: power button,
//!   wait, kill. Three engines: the builtin VMM, QEMU pc/q35, QEMU microvm.
//! - [`End`] says how a VM ended and maps it to the exit code every command uses.
//! - [`Host`] is the registry: `$KILN_HOME/vms/NAME/vm.json` for every VM, foreground or
//!   background, and the operations on it (run, list, stop, kill, rm, logs).
//! - The supervisor (`supervisor`) runs every VM: in the `kiln run` process for a foreground
//!   VM, in a re-executed `kiln __supervise` ([`supervise_main`]) for a background one.

mod clone;
mod console;
mod end;
mod engine;
mod error;
mod host;
mod linux;
mod name;
mod net;
pub mod snapshot;
mod spec;
mod ssh;
mod state;
mod supervisor;

pub use clone::CloneRequest;
pub use console::{
    attach_console, escape_help, ConsoleEnd, Escape, EscapeAction, SocketConsole, ESCAPE,
};
pub use end::End;
pub use engine::{engine, Engine, Restore, Running};
pub use error::HostError;
pub use host::{supervise_main, DiskRequest, Host, SUPERVISE_COMMAND};
pub use linux::{RunRequest, DEFAULT_RAM_MIB, DEFAULT_VCPUS};
pub use name::{generate_name, validate_name};
pub use net::{GuestAddress, NetMeta, NetMode, NetRequest, NetSpec, NetStatus, UserStack, VmNet};
pub use spec::{
    default_firmware_engine, Boot, ConsoleSpec, EngineKind, VmDisk, VmSpec, FIRMWARE_RAM_MIB,
    MAX_RAM_MIB, MAX_VCPUS, MIN_LINUX_RAM_MIB,
};
pub use state::{BrokenVm, VmEntry, VmKind, VmMeta, VmRecord, VmState, VM_JSON};
pub use supervisor::{Start, DEFAULT_STOP_TIMEOUT};

/// Result alias for this crate.
pub type Result<T, E = HostError> = std::result::Result<T, E>;
