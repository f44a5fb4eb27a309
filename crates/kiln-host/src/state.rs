//! `vm.json`: what kiln knows about one VM, written atomically (temp file + rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{proc, HostError};

/// A VM's lifecycle state as recorded; [`VmRecord::effective_state`] also checks the pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Storage is being prepared or QEMU is starting.
    Creating,
    Running,
    Stopped,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
        }
    }
}

/// Runtime facts about a VM: identity, process, sockets, files, state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMeta {
    /// A random 128-bit id (hex), unique across re-used names.
    pub id: String,
    pub name: String,
    /// The engine's process (QEMU) while it runs.
    pub pid: Option<u32>,
    /// The process start time (clock ticks after boot): guards against pid reuse.
    pub pid_start: Option<u64>,
    /// The kiln supervisor that waits for the VM and records how it ended.
    pub supervisor_pid: Option<u32>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub stopped_at: Option<String>,
    /// The guest's IP address on its network, when it has one.
    pub guest_ip: Option<String>,
    /// `none`, or `user` (QEMU user-mode networking).
    pub net: String,
    /// Host port on 127.0.0.1 forwarded to the guest's SSH port (user networking).
    pub ssh_port: Option<u16>,
    /// QMP socket for control commands (power button, quit).
    pub control_socket: PathBuf,
    /// The serial console's socket (`kiln vm console`).
    pub console_socket: PathBuf,
    /// The serial log.
    pub log: PathBuf,
    /// The image directory the VM came from, when `--image` was used.
    pub image: Option<PathBuf>,
    /// The read-only base root filesystem (the overlay's backing file).
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The VM's copy-on-write root: a QCOW2 file backed by `rootfs`.
    pub overlay: PathBuf,
    /// The VM's own /home disk.
    pub home_disk: PathBuf,
    /// The VM's own /var disk.
    pub var_disk: PathBuf,
    pub state: VmState,
    /// How the VM ended (`guest powered off`, `killed`, ...), once stopped.
    pub exit_reason: Option<String>,
}

/// One disk as the machine sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// The guest device (`/dev/vda`).
    pub device: String,
    /// What the guest mounts it on (`/`, `/home`, `/var`).
    pub mount: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub read_only: bool,
}

/// The effective machine configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpu: u32,
    pub ram_mib: u32,
    pub disks: Vec<VmDisk>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The engine (`qemu-microvm`).
    pub engine: String,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// The engine's full command line, for reproducing the VM by hand.
    pub command: Vec<String>,
}

/// The content of `vm.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub meta: VmMeta,
    pub config: VmConfig,
}

impl VmRecord {
    /// The state with liveness checked: a recorded `running` VM whose process is gone is
    /// `stopped`.
    pub fn effective_state(&self) -> VmState {
        match self.meta.state {
            VmState::Running if !self.is_alive() => VmState::Stopped,
            s => s,
        }
    }

    /// True when the engine process recorded in `pid` still runs.
    pub fn is_alive(&self) -> bool {
        self.meta
            .pid
            .is_some_and(|pid| proc::alive(pid, self.meta.pid_start))
    }

    /// Reads `path` (a `vm.json`).
    pub fn load(path: &Path) -> Result<VmRecord, HostError> {
        let text = fs::read_to_string(path)
            .map_err(|e| HostError::io(format!("{}: cannot read", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| HostError::State {
            path: path.to_path_buf(),
            why: format!("not a valid vm.json: {e}"),
        })
    }

    /// Writes `path` atomically: a temp file in the same directory, then rename.
    pub fn save(&self, path: &Path) -> Result<(), HostError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| HostError::State {
            path: path.to_path_buf(),
            why: format!("cannot encode: {e}"),
        })?;
        write_atomic(path, &json)
    }
}

/// Writes `bytes` to `path` through a temp file and rename: readers see the old or new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(b"\n")?;
        // No fsync: rename makes the update atomic for readers, and ext4 flushes a file
        // renamed over another before the rename commits; an fsync here costs milliseconds
        // on every state change.
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HostError::io(format!("{}: cannot write", path.display()), e)
    })
}

/// Now as RFC 3339 UTC (`2025-01-31T12:34:56.789Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc_with_millis() {
        let now = now_rfc3339();
        assert_eq!(now.len(), "2025-01-31T12:34:56.789Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
        assert!(humantime::parse_rfc3339(&now).is_ok(), "{now}");
    }
}
