//! The launch spec: everything an engine needs to start one VM, validated once, the same for
//! every engine. It is what `vm.json` records as `config`, so a re-executed supervisor starts
//! exactly the VM that was asked for.

use std::path::{Path, PathBuf};

use kiln_image::{BootMedia, Format};
use kiln_qemu::Accel;
use serde::{Deserialize, Serialize};

use crate::{validate_name, HostError, NetSpec};

/// Which engine runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// kiln's own VMM on KVM (firmware guests).
    Builtin,
    /// QEMU's i440FX machine with SeaBIOS (firmware guests).
    QemuPc,
    /// QEMU's Q35 machine with SeaBIOS (firmware guests).
    QemuQ35,
    /// QEMU's microvm machine, direct kernel boot (Linux guests).
    QemuMicrovm,
}

impl EngineKind {
    /// `builtin`, `qemu-pc`, `qemu-q35` or `qemu-microvm`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Builtin => "builtin",
            EngineKind::QemuPc => "qemu-pc",
            EngineKind::QemuQ35 => "qemu-q35",
            EngineKind::QemuMicrovm => "qemu-microvm",
        }
    }

    /// True for the engines that boot firmware (BIOS) guests from a disk.
    pub fn boots_firmware(self) -> bool {
        self != EngineKind::QemuMicrovm
    }
}

/// The firmware engine to use when none is asked for, and why: the builtin VMM only where the
/// CPU has hardware virtualization (vmx/svm) and /dev/kvm can create a VM. On a paravirtual KVM
/// (kvm_pvm) the builtin VMM reaches a banner in milliseconds but runs guest code about 1000x
/// slower than QEMU's TCG, so QEMU is the default there.
pub fn default_firmware_engine() -> (EngineKind, String) {
    if !kiln_qemu::host_has_hw_virt() {
        return (
            EngineKind::QemuPc,
            "the CPU has no hardware virtualization (no vmx/svm flag), so the builtin VMM would run guest code ~1000x slower than QEMU's TCG".into(),
        );
    }
    match kiln_vmm::kvm_available() {
        Ok(()) => (
            EngineKind::Builtin,
            "hardware virtualization and a usable /dev/kvm".into(),
        ),
        Err(why) => (EngineKind::QemuPc, why),
    }
}

/// How the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Boot {
    /// BIOS firmware boots the first disk as `media`.
    Firmware { media: BootMedia },
    /// Direct Linux kernel boot; the disks are `/dev/vda`, `/dev/vdb`, ... in order.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// One disk as the machine sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// The guest device (`/dev/vda`, `hd0`, `cd0`, `fd0`).
    pub device: String,
    /// What the guest mounts it on (`/`, `/home`, `/var`), empty for a firmware disk.
    pub mount: String,
    pub path: PathBuf,
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// For a QCOW2 overlay: its raw base image, handed to the engine by this path (never by
    /// the name recorded in the overlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
    /// The serial number the guest sees (virtio), by which it finds a disk (kiln's seed disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ConsoleSpec {
    /// The supervising process's own terminal (foreground `kiln run`). With `bios`, the BIOS
    /// screen (int 10h) is mirrored onto it and its keys also reach int 16h.
    Terminal { bios: bool },
    /// A Unix socket (one client at a time, `kiln vm console`), everything printed also
    /// appended to `log`.
    Socket {
        path: PathBuf,
        log: Option<PathBuf>,
        bios: bool,
    },
}

impl ConsoleSpec {
    /// Whether the BIOS screen is mirrored onto the console (and its keys reach int 16h).
    pub fn bios(&self) -> bool {
        match self {
            ConsoleSpec::Terminal { bios } | ConsoleSpec::Socket { bios, .. } => *bios,
        }
    }
}

/// Everything an engine needs to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub vcpu: u32,
    pub ram_mib: u32,
    pub engine: EngineKind,
    /// `kvm` or `tcg`.
    pub accelerator: Accel,
    #[serde(flatten)]
    pub boot: Boot,
    pub disks: Vec<VmDisk>,
    pub console: ConsoleSpec,
    #[serde(default)]
    pub net: NetSpec,
    /// The VM's directory: its sockets and logs live here.
    pub dir: PathBuf,
    /// The engine's command line, for reproducing the VM by hand (empty for the builtin VMM,
    /// which runs inside kiln).
    #[serde(default)]
    pub command: Vec<String>,
}

/// Most vCPUs a Linux VM may have.
pub const MAX_VCPUS: u32 = 16;
/// Most memory a Linux VM may have in MiB.
pub const MAX_RAM_MIB: u32 = 32768;
/// Least memory a Linux VM may have: a Debian kernel and systemd need about this much.
pub const MIN_LINUX_RAM_MIB: u32 = 128;
/// Memory range of a firmware VM in MiB (below the 32-bit PCI hole).
pub const FIRMWARE_RAM_MIB: std::ops::RangeInclusive<u32> = 2..=3584;

impl VmSpec {
    /// Checks the spec as an engine will use it. A spec read back from `vm.json` is hostile
    /// data like any other file, so the supervisor runs this again before starting anything.
    pub fn validate(&self) -> Result<(), HostError> {
        validate_name(&self.name)?;
        let firmware = matches!(self.boot, Boot::Firmware { .. });
        if firmware != self.engine.boots_firmware() {
            return Err(HostError::invalid(
                "engine",
                self.engine.name(),
                if firmware {
                    "cannot boot a firmware disk (use builtin, qemu-pc or qemu-q35)"
                } else {
                    "cannot boot a Linux kernel (use qemu-microvm)"
                },
            ));
        }
        if firmware {
            if self.vcpu != 1 {
                return Err(HostError::invalid(
                    "vcpus",
                    self.vcpu,
                    "firmware VMs have exactly 1 vCPU",
                ));
            }
            if !FIRMWARE_RAM_MIB.contains(&self.ram_mib) {
                return Err(HostError::invalid(
                    "ram_mib",
                    self.ram_mib,
                    format!(
                        "must be between {} and {} MiB",
                        FIRMWARE_RAM_MIB.start(),
                        FIRMWARE_RAM_MIB.end()
                    ),
                ));
            }
            if self.disks.len() != 1 {
                return Err(HostError::invalid(
                    "disks",
                    self.disks.len(),
                    "a firmware VM boots exactly one disk",
                ));
            }
        } else {
            if !(1..=MAX_VCPUS).contains(&self.vcpu) {
                return Err(HostError::invalid(
                    "vcpus",
                    self.vcpu,
                    format!("must be between 1 and {MAX_VCPUS}"),
                ));
            }
            if !(MIN_LINUX_RAM_MIB..=MAX_RAM_MIB).contains(&self.ram_mib) {
                return Err(HostError::invalid(
                    "ram_mib",
                    self.ram_mib,
                    format!("must be between {MIN_LINUX_RAM_MIB} and {MAX_RAM_MIB} MiB"),
                ));
            }
            if self.disks.is_empty() || self.disks.len() > 16 {
                return Err(HostError::invalid(
                    "disks",
                    self.disks.len(),
                    "a Linux VM has 1 to 16 disks",
                ));
            }
            for d in &self.disks {
                match (d.format, &d.backing) {
                    (Format::Raw, None) | (Format::Qcow2, Some(_)) => {}
                    _ => {
                        return Err(HostError::invalid(
                            "disks",
                            d.path.display(),
                            "a Linux VM's disks are raw, or qcow2 overlays over a raw base",
                        ))
                    }
                }
            }
        }
        if firmware && self.net != NetSpec::None {
            return Err(HostError::invalid(
                "net",
                self.net.mode(),
                "firmware VMs have no network card",
            ));
        }
        self.net.validate()?;
        for d in &self.disks {
            if let Some(s) = &d.serial {
                if s.is_empty()
                    || s.len() > 20
                    || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(HostError::invalid(
                        "disks",
                        d.path.display(),
                        "a disk serial is 1 to 20 of [A-Za-z0-9-]",
                    ));
                }
            }
        }
        if self.engine == EngineKind::Builtin && self.accelerator != Accel::Kvm {
            return Err(HostError::invalid(
                "accel",
                self.accelerator.name(),
                "the builtin engine runs on KVM only",
            ));
        }
        Ok(())
    }

    /// Validates the spec and records the engine's command line in it: what every request
    /// does last before its VM is recorded.
    pub fn checked(mut self) -> Result<VmSpec, HostError> {
        self.validate()?;
        self.command = crate::engine::engine(self.engine).command_line(&self);
        Ok(self)
    }

    /// The VM's control socket (`kiln stop`, `kill`, console quit).
    pub fn control_socket(&self) -> PathBuf {
        control_socket(&self.dir)
    }

    /// The serial console's socket, when the console is one.
    pub fn console_socket(&self) -> Option<&Path> {
        match &self.console {
            ConsoleSpec::Socket { path, .. } => Some(path),
            ConsoleSpec::Terminal { .. } => None,
        }
    }
}

/// `DIR/control.sock`.
pub(crate) fn control_socket(dir: &Path) -> PathBuf {
    dir.join(crate::state::CONTROL_SOCKET)
}
