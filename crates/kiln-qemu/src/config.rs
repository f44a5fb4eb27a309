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
    /// Appended to a file (the VM runs headless).
    File(PathBuf),
    /// QEMU connects COM1 to a Unix socket its supervisor listens on (the VM runs headless):
    /// the supervisor serves the console to its clients and keeps the log. With
    /// `bios_console`, SeaBIOS's serial console gets a port of its own (see [`BiosConsole`]).
    Connect {
        path: PathBuf,
        bios_console: Option<BiosConsole>,
    },
}

/// SeaBIOS's serial console ("sercon": its mirror of the BIOS screen, and int 16h keys read
/// from the same port) on COM2 (0x2F8), connected to a socket of its own, so that COM1
/// carries only the guest's own serial I/O and SeaBIOS never reads COM1's input. Whoever
/// listens on both sockets merges them into one console (kiln-host does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BiosConsole {
    /// The Unix socket QEMU connects COM2 to.
    pub socket: PathBuf,
    /// The fw_cfg file `etc/sercon-port` is read from; [`BiosConsole::write_port_file`]
    /// writes it before QEMU starts.
    pub port_file: PathBuf,
}

/// COM2's I/O port, where SeaBIOS's serial console goes.
pub const SERCON_PORT: u16 = 0x2f8;

impl BiosConsole {
    /// Writes the port number as SeaBIOS reads `etc/sercon-port`: a little-endian integer of
    /// 2 bytes (QEMU's `string=` would hand it 5 ASCII bytes, which SeaBIOS ignores).
    pub fn write_port_file(&self) -> std::io::Result<()> {
        std::fs::write(&self.port_file, SERCON_PORT.to_le_bytes())
    }
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
    /// COM1 on `serial`.
    pub fn firmware(drive: Drive, qmp_socket: PathBuf, serial: SerialMode) -> QemuConfig {
        QemuConfig {
            binary: std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            machine: Machine::Pc,
            accel: Accel::detect(),
            memory_mib: 128,
            vcpus: 1,
            drives: vec![drive],
            serial,
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
            keep_fds: Vec::new(),
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
        // No display: nothing but SeaBIOS's serial console, when asked for, mirrors the screen.
        opt("-display", "none".into());
        opt("-monitor", "none".into());
        match &self.serial {
            SerialMode::File(path) => {
                opt("-serial", prefixed("file:", path));
            }
            SerialMode::Connect { path, bios_console } => {
                opt("-chardev", crate::microvm::connect_chardev(path));
                opt("-serial", "chardev:console".into());
                if let Some(bios) = bios_console {
                    // The second -serial is COM2 at 0x2F8.
                    opt("-chardev", prefixed("socket,id=bios,path=", &bios.socket));
                    opt("-serial", "chardev:bios".into());
                    opt(
                        "-fw_cfg",
                        prefixed("name=etc/sercon-port,file=", &bios.port_file),
                    );
                }
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
            SerialMode::File("/tmp/s.log".into()),
        );
        c.accel = Accel::Tcg;
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

    #[test]
    fn bios_console_gets_com2_of_its_own() {
        let c = QemuConfig::firmware(
            Drive {
                path: "/tmp/d.img".into(),
                format: DriveFormat::Raw,
                media: Media::Disk,
                read_only: false,
            },
            "/tmp/q.sock".into(),
            SerialMode::Connect {
                path: "/tmp/serial.sock".into(),
                bios_console: Some(BiosConsole {
                    socket: "/tmp/video.sock".into(),
                    port_file: "/tmp/sercon-port".into(),
                }),
            },
        );
        let a = strings(&c);
        let pairs: Vec<(&str, &str)> = a
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        let serials: Vec<&str> = pairs
            .iter()
            .filter(|(f, _)| *f == "-serial")
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(serials, ["chardev:console", "chardev:bios"]);
        assert!(pairs.contains(&("-chardev", "socket,id=bios,path=/tmp/video.sock")));
        assert!(pairs.contains(&("-fw_cfg", "name=etc/sercon-port,file=/tmp/sercon-port")));
        // -nographic would point SeaBIOS's serial console at COM1.
        assert!(!a.iter().any(|s| s == "-nographic"));
        let dir = tempfile::tempdir().unwrap();
        let bios = BiosConsole {
            socket: dir.path().join("v.sock"),
            port_file: dir.path().join("port"),
        };
        bios.write_port_file().unwrap();
        assert_eq!(std::fs::read(&bios.port_file).unwrap(), [0xf8, 0x02]);
    }
}
