//! A QEMU machine description and its command line.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::Accel;

/// The QEMU machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// i440FX + PIIX4, what Proxmox and most clouds call "pc".
    Pc,
    /// Q35 + ICH9 (AHCI disks).
    Q35,
    /// QEMU's minimal virtio-mmio machine for Linux microVMs.
    Microvm,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

impl std::str::FromStr for Machine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pc" => Ok(Machine::Pc),
            "q35" => Ok(Machine::Q35),
            "microvm" => Ok(Machine::Microvm),
            _ => Err(format!(
                "unknown machine type '{s}' (expected pc, q35 or microvm)"
            )),
        }
    }
}

/// A drive's container format, in QEMU's block-driver names. Only formats that cannot name
/// another file: QEMU is never handed an image whose references it might resolve differently
/// from kiln (a VMDK descriptor, a QCOW2 backing file name). kiln gives it raw data, or a
/// QCOW2 overlay kiln made whose backing file is passed explicitly ([`crate::MicrovmDisk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveFormat {
    Raw,
    Qcow2,
}

impl DriveFormat {
    pub fn qemu_name(self) -> &'static str {
        match self {
            DriveFormat::Raw => "raw",
            DriveFormat::Qcow2 => "qcow2",
        }
    }
}

/// How the guest sees a drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    Disk,
    Cdrom,
    Floppy,
}

/// One drive attached to the VM.
#[derive(Clone, Debug)]
pub struct Drive {
    pub path: PathBuf,
    pub format: DriveFormat,
    pub media: Media,
    pub read_only: bool,
}

/// Where the guest's first serial port goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// On kiln's stdin/stdout, multiplexed with the QEMU monitor (Ctrl-A X quits, Ctrl-A C
    /// switches to the monitor). With `bios_console`, SeaBIOS also mirrors the BIOS screen
    /// (int 10h text) onto the same terminal, as `qemu -nographic` does.
    Terminal { bios_console: bool },
    /// Appended to a file (the VM runs headless).
    File(PathBuf),
    /// QEMU connects to a Unix socket its supervisor listens on (the VM runs headless): the
    /// supervisor serves the console to its clients and keeps the log. With `bios_console`,
    /// SeaBIOS mirrors the BIOS screen onto it too.
    Connect { path: PathBuf, bios_console: bool },
}

/// Everything needed to start one QEMU VM.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The QEMU binary; `$KILN_QEMU` or `qemu-system-x86_64` by default.
    pub binary: String,
    pub machine: Machine,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub drives: Vec<Drive>,
    pub serial: SerialMode,
    /// The QMP control socket QEMU listens on.
    pub qmp_socket: PathBuf,
    pub name: Option<String>,
    /// Extra arguments appended verbatim (for experiments and issue-specific devices).
    pub extra_args: Vec<OsString>,
}

impl QemuConfig {
    /// A firmware (BIOS) guest booting `drive`, with kiln's defaults: 128 MiB, 1 vCPU, no NIC,
    /// serial on the terminal with the BIOS screen mirrored.
    pub fn firmware(drive: Drive, qmp_socket: PathBuf) -> QemuConfig {
        QemuConfig {
            binary: std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            machine: Machine::Pc,
            accel: Accel::detect(),
            memory_mib: 128,
            vcpus: 1,
            drives: vec![drive],
            serial: SerialMode::Terminal { bios_console: true },
            qmp_socket,
            name: None,
            extra_args: Vec::new(),
        }
    }

    /// What [`crate::QemuVm::spawn`] starts.
    pub fn launch(&self) -> crate::Launch {
        crate::Launch {
            binary: self.binary.clone(),
            args: self.args(),
            qmp_socket: self.qmp_socket.clone(),
        }
    }

    /// The full argument vector (without the binary).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut opt = |flag: &str, value: OsString| {
            a.push(flag.into());
            if !value.is_empty() {
                a.push(value);
            }
        };
        opt("-machine", self.machine.name().into());
        opt("-accel", self.accel.name().into());
        opt("-m", self.memory_mib.to_string().into());
        opt("-smp", self.vcpus.to_string().into());
        if let Some(name) = &self.name {
            opt("-name", name.into());
        }
        // No NIC skips iPXE's option ROM; a reset ends the VM instead of looping.
        opt("-nic", "none".into());
        match &self.serial {
            SerialMode::Terminal { bios_console: true } => {
                // -nographic makes SeaBIOS's serial console mirror int 10h onto COM1.
                opt("-nographic", OsString::new());
                opt("-serial", "mon:stdio".into());
            }
            SerialMode::Terminal {
                bios_console: false,
            } => {
                opt("-display", "none".into());
                opt("-serial", "mon:stdio".into());
            }
            SerialMode::File(path) => {
                opt("-display", "none".into());
                opt("-monitor", "none".into());
                opt("-serial", prefixed("file:", path));
            }
            SerialMode::Connect { path, bios_console } => {
                // -nographic is what turns SeaBIOS's serial console on; with -serial and
                // -monitor given explicitly it adds nothing else.
                if *bios_console {
                    opt("-nographic", OsString::new());
                } else {
                    opt("-display", "none".into());
                }
                opt("-monitor", "none".into());
                opt("-chardev", crate::microvm::connect_chardev(path));
                opt("-serial", "chardev:console".into());
            }
        }
        let mut qmp = prefixed("unix:", &self.qmp_socket);
        qmp.push(",server=on,wait=off");
        opt("-qmp", qmp);

        for (i, d) in self.drives.iter().enumerate() {
            let mut spec = prefixed("file=", &d.path);
            spec.push(format!(",format={}", d.format.qemu_name()));
            spec.push(match d.media {
                Media::Disk => format!(",if=ide,index={i},media=disk"),
                Media::Cdrom => format!(",if=ide,index={i},media=cdrom"),
                Media::Floppy => ",if=floppy,index=0".to_string(),
            });
            if d.read_only {
                spec.push(",readonly=on");
            }
            opt("-drive", spec);
        }
        if let Some(first) = self.drives.first() {
            let order = match first.media {
                Media::Floppy => "order=a",
                Media::Cdrom => "order=d",
                Media::Disk => "order=c",
            };
            opt("-boot", order.into());
        }
        opt("-no-reboot", OsString::new());
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

pub(crate) fn prefixed(prefix: &str, path: &std::path::Path) -> OsString {
    let mut s = OsString::from(prefix);
    // QEMU option values split on ','; a doubled comma is a literal one.
    let escaped = path.as_os_str().to_string_lossy().replace(',', ",,");
    s.push(escaped);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(c: &QemuConfig) -> Vec<String> {
        c.args()
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn cdrom_boots_from_d_and_commas_escape() {
        let mut c = QemuConfig::firmware(
            Drive {
                path: "/tmp/a,b.iso".into(),
                format: DriveFormat::Raw,
                media: Media::Cdrom,
                read_only: true,
            },
            "/tmp/q.sock".into(),
        );
        c.accel = Accel::Tcg;
        c.serial = SerialMode::File("/tmp/s.log".into());
        let a = strings(&c);
        assert!(a.contains(
            &"file=/tmp/a,,b.iso,format=raw,if=ide,index=0,media=cdrom,readonly=on".to_string()
        ));
        assert!(a.windows(2).any(|w| w[0] == "-boot" && w[1] == "order=d"));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-serial" && w[1] == "file:/tmp/s.log"));
        assert!(a.windows(2).any(|w| w[0] == "-accel" && w[1] == "tcg"));
    }
}
