//! QEMU's `microvm` machine for Linux guests: direct kernel boot, virtio-mmio disks, a serial
//! console connected to its supervisor's socket, a QMP socket, optional user-mode networking.
//!
//! The machine runs with `pit=on,pic=on` and the kernel is told the host's TSC frequency
//! (`tsc_early_khz=`): under TCG a stock kernel otherwise hangs at "Marking TSC unstable".

use std::ffi::OsString;
use std::fs;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use kiln_net::{PortForward, Protocol};

use crate::config::prefixed;
use crate::{Accel, DriveFormat};

/// One virtio-blk disk of a microVM. The n-th disk is `/dev/vd<a+n>` in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicrovmDisk {
    pub path: PathBuf,
    pub format: DriveFormat,
    pub read_only: bool,
    /// A QCOW2 overlay's raw base, opened read-only from this path: the name recorded in the
    /// overlay is never used, and a QCOW2 disk without one is opened with no backing file.
    pub backing: Option<PathBuf>,
    /// The serial number the guest sees (`/sys/block/vdX/serial`).
    pub serial: Option<String>,
}

/// A microVM's network card (virtio-net) and what it is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicrovmNet {
    pub mac: String,
    pub backend: NetBackend,
}

/// The other end of a microVM's network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU's own user-mode stack (slirp, 10.0.2.0/24), with these host ports forwarded.
    Slirp { forwards: Vec<PortForward> },
    /// A TAP device: inherited as `fd` (kiln opened it), or opened by name when run by hand.
    Tap { ifname: String, fd: Option<RawFd> },
    /// A stream socket to passt: inherited as `fd`, or a Unix socket `passt -s` listens on
    /// when run by hand.
    Passt { fd: Option<RawFd>, socket: PathBuf },
}

/// Everything needed to start one Linux microVM.
#[derive(Clone, Debug)]
pub struct MicrovmConfig {
    /// The QEMU binary (`$KILN_QEMU` or `qemu-system-x86_64`).
    pub binary: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line, complete (see [`default_kernel_cmdline`]).
    pub cmdline: String,
    /// Disks in guest order: the first is `/dev/vda`.
    pub disks: Vec<MicrovmDisk>,
    /// The Unix socket QEMU connects the serial port to (its supervisor listens there, serves
    /// the console and keeps the log).
    pub serial_socket: PathBuf,
    /// The QMP socket QEMU listens on (its supervisor's one connection).
    pub qmp_socket: PathBuf,
    pub net: Option<MicrovmNet>,
    pub name: Option<String>,
    /// Extra arguments appended verbatim.
    pub extra_args: Vec<OsString>,
}

impl MicrovmConfig {
    /// What [`crate::QemuVm::spawn`] starts.
    pub fn launch(&self) -> crate::Launch {
        crate::Launch {
            binary: self.binary.clone(),
            args: self.args(),
            qmp_socket: self.qmp_socket.clone(),
            keep_fds: match self.net.as_ref().map(|n| &n.backend) {
                Some(
                    NetBackend::Tap { fd: Some(fd), .. } | NetBackend::Passt { fd: Some(fd), .. },
                ) => {
                    vec![*fd]
                }
                _ => Vec::new(),
            },
        }
    }

    /// The full argument vector (without the binary).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut opt = |flag: &str, value: OsString| {
            a.push(flag.into());
            a.push(value);
        };
        // pit/pic: the legacy timer and interrupt controller a stock kernel calibrates with;
        // rtc for a sane wall clock.
        opt("-machine", "microvm,pit=on,pic=on,rtc=on".into());
        opt("-accel", self.accel.name().into());
        if self.accel == Accel::Kvm {
            opt("-cpu", "host".into());
        }
        opt("-m", self.memory_mib.to_string().into());
        opt("-smp", self.vcpus.to_string().into());
        if let Some(name) = &self.name {
            opt("-name", name.into());
        }
        opt("-kernel", self.kernel.clone().into_os_string());
        if let Some(initrd) = &self.initrd {
            opt("-initrd", initrd.clone().into_os_string());
        }
        opt("-append", self.cmdline.clone().into());
        for (i, d) in self.disks.iter().enumerate() {
            let mut spec = prefixed("file=", &d.path);
            spec.push(format!(
                ",format={},if=none,id=disk{i},cache=writeback,discard=unmap",
                d.format.qemu_name()
            ));
            if d.read_only {
                spec.push(",readonly=on");
            }
            if d.format == DriveFormat::Qcow2 {
                match &d.backing {
                    Some(base) => {
                        spec.push(
                            ",backing.driver=raw,backing.read-only=on,backing.file.driver=file",
                        );
                        spec.push(prefixed(",backing.file.filename=", base));
                    }
                    // QEMU's spelling of "no backing file, whatever the image says".
                    None => spec.push(",backing="),
                }
            }
            opt("-drive", spec);
            let mut device = format!("virtio-blk-device,drive=disk{i}");
            if let Some(serial) = &d.serial {
                device.push_str(&format!(",serial={serial}"));
            }
            opt("-device", device.into());
        }
        opt("-chardev", connect_chardev(&self.serial_socket));
        opt("-serial", "chardev:console".into());
        let mut qmp = prefixed("unix:", &self.qmp_socket);
        qmp.push(",server=on,wait=off");
        opt("-qmp", qmp);
        match &self.net {
            Some(net) => {
                opt("-netdev", net.backend.netdev());
                opt(
                    "-device",
                    format!("virtio-net-device,netdev=net0,mac={}", net.mac).into(),
                );
            }
            None => opt("-nic", "none".into()),
        }
        opt("-display", "none".into());
        opt("-monitor", "none".into());
        a.push("-nodefaults".into());
        a.push("-no-user-config".into());
        // The guest's reboot ends the VM, like its power-off.
        a.push("-no-reboot".into());
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

impl NetBackend {
    /// The `-netdev` of this backend, as `net0`.
    fn netdev(&self) -> OsString {
        match self {
            NetBackend::Slirp { forwards } => {
                let mut n = String::from("user,id=net0,net=10.0.2.0/24");
                for f in forwards {
                    let proto = match f.protocol {
                        Protocol::Tcp => "tcp",
                        Protocol::Udp => "udp",
                    };
                    n.push_str(&format!(
                        ",hostfwd={proto}:{}:{}-:{}",
                        f.host_ip, f.host_port, f.guest_port
                    ));
                }
                n.into()
            }
            NetBackend::Tap { fd: Some(fd), .. } => format!("tap,id=net0,fd={fd}").into(),
            NetBackend::Tap { ifname, fd: None } => {
                format!("tap,id=net0,ifname={ifname},script=no,downscript=no").into()
            }
            NetBackend::Passt { fd: Some(fd), .. } => {
                format!("stream,id=net0,server=off,addr.type=fd,addr.str={fd}").into()
            }
            NetBackend::Passt { fd: None, socket } => {
                let mut n: OsString = "stream,id=net0,server=off,addr.type=unix,".into();
                n.push(prefixed("addr.path=", socket));
                n
            }
        }
    }
}

/// A `-chardev` that connects to the Unix socket `path` at start-up, before the guest runs, so
/// no output is ever lost.
pub(crate) fn connect_chardev(path: &Path) -> OsString {
    prefixed("socket,id=console,path=", path)
}

/// The kernel command line kiln boots Linux microVMs with: serial console, root on `/dev/vda`,
/// the host TSC frequency when known, and `extra` appended.
pub fn default_kernel_cmdline(tsc_khz: Option<u64>, extra: &str) -> String {
    let mut c = String::from("console=ttyS0 root=/dev/vda rw panic=-1 reboot=t");
    if let Some(khz) = tsc_khz {
        c.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// The host TSC frequency in kHz: `$KILN_TSC_KHZ`, the kernel's `tsc_freq_khz` when exposed,
/// or the "cpu MHz" of /proc/cpuinfo on CPUs with a constant TSC.
pub fn host_tsc_khz() -> Option<u64> {
    if let Some(v) = std::env::var("KILN_TSC_KHZ")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(v);
    }
    if let Some(v) = fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(v);
    }
    tsc_khz_from_cpuinfo(&fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn tsc_khz_from_cpuinfo(info: &str) -> Option<u64> {
    let constant = info
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "constant_tsc");
    if !constant {
        return None;
    }
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_have_microvm_disks_console_and_qmp() {
        let c = MicrovmConfig {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            vcpus: 2,
            kernel: "/i/vmlinuz".into(),
            initrd: Some("/i/initrd.img".into()),
            cmdline: default_kernel_cmdline(Some(2_596_148), "quiet"),
            disks: vec![
                MicrovmDisk {
                    path: "/v/root,1.qcow2".into(),
                    format: DriveFormat::Qcow2,
                    read_only: false,
                    backing: Some("/b/root,.ext4".into()),
                    serial: None,
                },
                MicrovmDisk {
                    path: "/v/home.ext4".into(),
                    format: DriveFormat::Raw,
                    read_only: false,
                    backing: None,
                    serial: Some("kiln-seed".into()),
                },
            ],
            serial_socket: "/v/serial.sock".into(),
            qmp_socket: "/v/sup.sock".into(),
            net: None,
            name: Some("calm-otter".into()),
            extra_args: vec![],
        };
        let a: Vec<String> = c
            .args()
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let pair = |f: &str, v: &str| a.windows(2).any(|w| w[0] == f && w[1] == v);
        assert!(pair("-machine", "microvm,pit=on,pic=on,rtc=on"));
        assert!(pair(
            "-append",
            "console=ttyS0 root=/dev/vda rw panic=-1 reboot=t tsc_early_khz=2596148 quiet"
        ));
        assert!(pair(
            "-drive",
            "file=/v/root,,1.qcow2,format=qcow2,if=none,id=disk0,cache=writeback,discard=unmap,\
             backing.driver=raw,backing.read-only=on,backing.file.driver=file,\
             backing.file.filename=/b/root,,.ext4"
        ));
        assert!(pair(
            "-drive",
            "file=/v/home.ext4,format=raw,if=none,id=disk1,cache=writeback,discard=unmap"
        ));
        assert!(pair(
            "-device",
            "virtio-blk-device,drive=disk1,serial=kiln-seed"
        ));
        assert!(pair("-qmp", "unix:/v/sup.sock,server=on,wait=off"));
        assert!(pair("-chardev", "socket,id=console,path=/v/serial.sock"));
        assert!(a.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn tsc_from_cpuinfo_needs_constant_tsc() {
        let info = "cpu MHz\t\t: 2596.148\nflags\t\t: fpu constant_tsc tsc_known_freq\n";
        assert_eq!(tsc_khz_from_cpuinfo(info), Some(2_596_148));
        assert_eq!(
            tsc_khz_from_cpuinfo("cpu MHz : 2596.148\nflags : fpu\n"),
            None
        );
    }
}
