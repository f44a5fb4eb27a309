//! `vm.json`: what kiln knows about one VM, written atomically (temp file + rename), the
//! locks that say whether anyone still looks after it, and the sockets that are stale once
//! nobody does.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use kiln_sys::lock::{is_locked, recorded_holder, FileLock};
use serde::{Deserialize, Serialize};

use crate::{End, HostError, VmSpec};

/// The record's file name in a VM's directory.
pub const VM_JSON: &str = "vm.json";
/// Serialises read-modify-write updates of `vm.json`.
pub(crate) const LOCK: &str = "lock";
/// Held by the process creating the VM (storage, start) for as long as that takes.
pub(crate) const CREATE_LOCK: &str = "create.lock";
/// Held by the VM's supervisor for as long as it runs: the VM is alive exactly while it is.
pub(crate) const SUPERVISOR_LOCK: &str = "supervisor.lock";
/// The supervisor's control socket (stop, kill, quit).
pub(crate) const CONTROL_SOCKET: &str = "control.sock";
/// The serial console a background VM's supervisor serves (`kiln vm console`).
pub(crate) const CONSOLE_SOCKET: &str = "console.sock";
/// Where QEMU's serial port connects to the supervisor (while QEMU starts).
pub(crate) const SERIAL_SOCKET: &str = "serial.sock";
/// Where QEMU's COM2, SeaBIOS's serial console (the BIOS screen), connects to the supervisor
/// (while QEMU starts).
pub(crate) const VIDEO_SOCKET: &str = "video.sock";
/// The console a foreground VM's terminal relay connects to (until it has connected).
pub(crate) const TERMINAL_SOCKET: &str = "terminal.sock";
/// QEMU's QMP socket.
pub(crate) const QMP_SOCKET: &str = "qmp.sock";
/// Every socket a VM's processes serve in its directory: stale once its supervisor is gone.
const SOCKETS: [&str; 6] = [
    CONTROL_SOCKET,
    CONSOLE_SOCKET,
    SERIAL_SOCKET,
    VIDEO_SOCKET,
    TERMINAL_SOCKET,
    QMP_SOCKET,
];

/// A VM's lifecycle state as recorded; [`VmRecord::effective_state`] also checks the locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Storage is being prepared or the engine is starting.
    Creating,
    Running,
    Stopped,
    /// Its creator died before the VM ran (`kiln vm rm` removes it). Never recorded: a
    /// `creating` VM whose creator and supervisor are both gone is shown so.
    Failed,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }
}

/// What kind of guest a VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// A BIOS guest booted from a disk image.
    Firmware,
    /// A Linux kernel booted directly.
    Linux,
}

/// Runtime facts about a VM: identity, processes, sockets, files, state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmMeta {
    /// A random 128-bit id (hex), unique across re-used names.
    pub id: String,
    pub name: String,
    pub kind: VmKind,
    /// Runs in the foreground of a `kiln run` and is removed when it ends.
    #[serde(default)]
    pub foreground: bool,
    /// The engine's process (QEMU; the supervisor itself for the builtin VMM) while it runs.
    pub pid: Option<u32>,
    /// The process start time (clock ticks after boot): guards against pid reuse.
    pub pid_start: Option<u64>,
    /// The kiln supervisor that runs the VM and records how it ended.
    pub supervisor_pid: Option<u32>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub stopped_at: Option<String>,
    /// The VM's network: mode, TAP, MAC, guest address, gateway, resolvers, published ports,
    /// where SSH answers, passt's pid.
    #[serde(default, deserialize_with = "crate::net::net_meta_compat")]
    pub net: crate::NetMeta,
    /// The private key `kiln vm ssh` logs in with (kiln's own, or beside `--ssh-key`).
    #[serde(default)]
    pub ssh_identity: Option<PathBuf>,
    /// The supervisor's control socket (stop, kill, quit).
    pub control_socket: PathBuf,
    /// The serial console's socket (`kiln vm console`), when it has one.
    pub console_socket: Option<PathBuf>,
    /// The serial log, when it has one.
    pub log: Option<PathBuf>,
    /// The image directory or disk image the VM came from.
    pub image: Option<PathBuf>,
    /// The read-only base root filesystem (the overlay's backing file).
    pub rootfs: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The VM's copy-on-write root: a QCOW2 file backed by `rootfs`.
    pub overlay: Option<PathBuf>,
    /// The VM's own /home disk.
    pub home_disk: Option<PathBuf>,
    /// The VM's own /var disk.
    pub var_disk: Option<PathBuf>,
    pub state: VmState,
    /// The snapshot this run resumed from (`kiln vm resume`), if it did not boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
    /// How the VM ended, once stopped.
    pub end: Option<End>,
    /// How the VM ended, for people (`guest powered off`, `killed`, ...).
    pub exit_reason: Option<String>,
}

/// The content of `vm.json`: runtime facts and the launch spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub meta: VmMeta,
    pub config: VmSpec,
}

impl VmMeta {
    /// Started as a clone of another VM's snapshot: `resumed_from` is `VM:TAG` (a tag of its
    /// own has no colon).
    pub fn cloned(&self) -> bool {
        self.resumed_from
            .as_deref()
            .is_some_and(|f| f.contains(':'))
    }
}

impl VmRecord {
    /// The state with liveness checked through the locks: a VM whose supervisor (or creator)
    /// is gone is no longer running (or creating), whatever the file says.
    pub fn effective_state(&self) -> VmState {
        let dir = &self.config.dir;
        match self.meta.state {
            VmState::Running if !is_locked(&dir.join(SUPERVISOR_LOCK)) => VmState::Stopped,
            VmState::Creating
                if !is_locked(&dir.join(CREATE_LOCK)) && !is_locked(&dir.join(SUPERVISOR_LOCK)) =>
            {
                VmState::Failed
            }
            s => s,
        }
    }

    /// True while the VM's supervisor runs it.
    pub fn is_alive(&self) -> bool {
        self.effective_state() == VmState::Running
    }

    /// How the VM ended, including "its supervisor died" for a VM nobody recorded an end for.
    pub fn end(&self) -> Option<End> {
        match self.effective_state() {
            VmState::Stopped => Some(self.meta.end.clone().unwrap_or_else(|| End::Crashed {
                reason: format!(
                    "its supervisor (pid {}) died",
                    self.meta.supervisor_pid.unwrap_or(0)
                ),
            })),
            VmState::Failed => Some(creator_died(&self.config.dir)),
            _ => None,
        }
    }

    /// This record as `ls --json` shows it: effective state and end filled in.
    pub fn effective(mut self) -> VmRecord {
        self.meta.state = self.effective_state();
        if let Some(end) = self.end() {
            self.meta.exit_reason.get_or_insert_with(|| end.to_string());
            self.meta.end = Some(end);
        }
        self
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
        // No fsync: rename makes the update atomic for readers, and ext4 flushes a file renamed
        // over another before the rename commits; an fsync costs milliseconds per update.
        kiln_rootfs::write_atomic(path, &json)?;
        Ok(())
    }
}

/// How a VM ended whose creator died while creating it (the creator named in `dir`'s
/// creation lock).
pub(crate) fn creator_died(dir: &Path) -> End {
    End::Crashed {
        reason: match recorded_holder(&dir.join(CREATE_LOCK)) {
            Some((pid, _)) => format!("its creator (pid {pid}) died while creating it"),
            None => "its creator died while creating it".into(),
        },
    }
}

/// The path of a VM directory's `vm.json`.
pub(crate) fn record_path(dir: &Path) -> PathBuf {
    dir.join(VM_JSON)
}

/// A VM directory whose record cannot be used: `vm.json` missing, unreadable, not valid, or
/// about another VM. Only `kiln vm rm` acts on it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BrokenVm {
    pub name: String,
    pub dir: PathBuf,
    /// One line: the path and what is wrong with it.
    pub reason: String,
}

/// The first of a VM directory's liveness locks that some process holds.
pub(crate) fn held_lock(dir: &Path) -> Option<PathBuf> {
    [SUPERVISOR_LOCK, CREATE_LOCK]
        .iter()
        .map(|l| dir.join(l))
        .find(|p| is_locked(p))
}

/// One entry of the registry: a VM with its record, or a directory whose record is broken.
#[derive(Clone, Debug)]
pub enum VmEntry {
    Vm(Box<VmRecord>),
    Broken(BrokenVm),
}

impl VmEntry {
    /// The VM's name (its directory's name).
    pub fn name(&self) -> &str {
        match self {
            VmEntry::Vm(rec) => &rec.meta.name,
            VmEntry::Broken(b) => &b.name,
        }
    }

    /// The record, unless it is broken.
    pub fn record(&self) -> Option<&VmRecord> {
        match self {
            VmEntry::Vm(rec) => Some(rec),
            VmEntry::Broken(_) => None,
        }
    }

    /// `creating`, `running`, `stopped`, `failed` (locks checked) or `broken`.
    pub fn state_name(&self) -> &'static str {
        match self {
            VmEntry::Vm(rec) => rec.effective_state().name(),
            VmEntry::Broken(_) => "broken",
        }
    }

    /// The entry as `ls --json` shows it: a VM's record with its effective state and end, or
    /// for a broken one `{"meta": {"name", "state": "broken", "exit_reason"}, "broken": {...}}`
    /// (so `meta.name` and `meta.state` read the same for every entry).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            VmEntry::Vm(rec) => {
                serde_json::to_value(rec.clone().effective()).unwrap_or(serde_json::Value::Null)
            }
            VmEntry::Broken(b) => serde_json::json!({
                "meta": { "name": b.name, "state": "broken", "exit_reason": b.reason },
                "broken": b,
            }),
        }
    }

    /// Reads the entry `dir` (named `name`) of the registry; `None` for a directory whose
    /// creator is still claiming it (no record yet, its creation lock held).
    pub(crate) fn load(name: &str, dir: &Path) -> Option<VmEntry> {
        let broken = |reason: String| {
            Some(VmEntry::Broken(BrokenVm {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                reason,
            }))
        };
        match fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return broken(format!("{}: not a directory", dir.display())),
            Err(e) => return broken(format!("{}: {e}", dir.display())),
        }
        let json = record_path(dir);
        if !json.exists() {
            if is_locked(&dir.join(CREATE_LOCK)) {
                return None;
            }
            return broken(format!("{}: missing", json.display()));
        }
        let rec = match VmRecord::load(&json) {
            Ok(rec) => rec,
            Err(e) => return broken(e.to_string()),
        };
        let same_dir = rec.config.dir == dir
            || fs::canonicalize(&rec.config.dir).ok() == fs::canonicalize(dir).ok();
        if rec.meta.name != name || rec.config.name != name || !same_dir {
            return broken(format!(
                "{}: records VM '{}' in {}, not this directory",
                json.display(),
                rec.meta.name,
                rec.config.dir.display()
            ));
        }
        Some(VmEntry::Vm(Box::new(rec)))
    }
}

/// Removes the sockets left in `dir` by a supervisor that died (kill -9): only while nobody
/// holds the supervisor lock, and holding it meanwhile so no supervisor can start serving
/// them. Only sockets are removed, never another kind of file of the same name.
pub(crate) fn remove_stale_sockets(dir: &Path) {
    let stale: Vec<PathBuf> = SOCKETS
        .iter()
        .map(|s| dir.join(s))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .collect();
    if stale.is_empty() {
        return;
    }
    let lock = dir.join(SUPERVISOR_LOCK);
    if !lock.exists() {
        return;
    }
    let Ok(Some(_held)) = FileLock::try_exclusive(&lock) else {
        return;
    };
    for path in stale {
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = fs::remove_file(&path);
        }
    }
}
