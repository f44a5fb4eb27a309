//! kiln's root filesystem builders: `kiln image debian` makes a Debian image directory that
//! `kiln vm run --image DIR` boots.
//!
//! [`build_debian`] runs debootstrap (root needed) into a scratch tree, configures it for kiln
//! microVMs (see [`FSTAB`], the [`KILN_HOOK`], root autologin on ttyS0) and writes:
//! - `rootfs.ext4`: the root filesystem (made with `mkfs.ext4 -d`, no mount), the VMs' base;
//! - `vmlinuz`, `initrd.img`: Debian's cloud kernel and the initrd initramfs-tools built with
//!   the virtio modules;
//! - `home.ext4`, `var.ext4`: ext4 filesystems holding the image's /home and /var, the seeds of
//!   each VM's own /home and /var disks (exact ownership and modes);
//! - `image.json` ([`ImageManifest`]).
//!
//! It also holds what image builders and the VM launcher share: the image manifest
//! ([`manifest`]), ext4 tooling ([`ext4`]) and disk sizes ([`size`]). It depends on no other
//! kiln crate but kiln-sys.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub mod create;
pub mod ext4;
pub mod fs9p;
pub mod initramfs;
pub mod manifest;
pub mod oci;
pub mod size;
pub mod tree;
pub mod v86;

pub use ext4::{extract_dir, make_ext4_disk, make_seeded_disk, Seed};
pub use manifest::{ImageManifest, IMAGE_MANIFEST};
pub use size::{format_size, parse_size, DEFAULT_DISK_SIZE, DISK_SIZES};

/// Bumped whenever the builder's output changes: part of the cache fingerprint.
const BUILDER_VERSION: u32 = 5;

/// Packages installed on top of debootstrap's minbase for an amd64 microVM image (i386 v86
/// images: [`v86::PACKAGES`]).
pub const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "udev",
    "kmod",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "openssh-server",
    "iproute2",
    "procps",
    "ca-certificates",
];

/// The image's /etc/fstab: the root overlay on vda, the VM's own disks on vdb and vdc.
pub const FSTAB: &str = "\
# kiln microVM layout: / is a copy-on-write overlay of the base image; /home and /var are the
# VM's own disks (kiln vm run attaches them as the 2nd and 3rd disks); /tmp is tmpfs
# (systemd mounts /run as tmpfs itself). Under TCG udev may start 30 s into the boot: the disks'
# device timeout leaves room for that.
/dev/vda  /      ext4   rw,relatime,errors=remount-ro  0 1
/dev/vdb  /home  ext4   rw,relatime,x-systemd.device-timeout=120s  0 2
/dev/vdc  /var   ext4   rw,relatime,x-systemd.device-timeout=120s  0 2
tmpfs     /tmp   tmpfs  rw,nosuid,nodev,mode=1777  0 0
";

/// The kiln hook: applies the VM's identity at boot, so the base image is never touched.
/// From the kernel command line, and then from the `cmdline` file of kiln's seed disk (which
/// wins: a VM cloned from another's snapshot has the other's kernel command line in memory):
/// `kiln.name=` (hostname; systemd also reads `systemd.hostname=`), `kiln.dns=a,b`
/// (/etc/resolv.conf links to /run/kiln/resolv.conf), `kiln.ip=ADDR/LEN,GW` (static address
/// and default route on the first NIC; Debian's cloud kernel has no `CONFIG_IP_PNP`, so the
/// kernel's own `ip=` does nothing), `kiln.mtu=N` (its MTU). From the seed disk (the virtio
/// disk whose serial is [`SEED_SERIAL`], a tar archive kiln writes for each VM; see
/// kiln-host's `seed`): the SSH host key kiln made and pins (`ssh_host_ed25519_key`, `.pub`)
/// and the keys root may log in with (`authorized_keys`, installed as
/// /run/kiln/authorized_keys, which [`SSHD_CONFIG`] names). Without a seed disk the VM makes
/// its own host key.
///
/// `kiln-hook resumed` (run by [`KILN_RESUMED`] after the VM resumed from a snapshot) reads
/// the seed disk afresh and applies what changed: a clone's own name, address and keys.
pub const KILN_HOOK: &str = r#"#!/bin/sh
# kiln hook: the VM's identity from the kernel command line and kiln's seed disk (see kiln-rootfs).
mode=${1:-boot}
mkdir -p /run/kiln
chmod 755 /run/kiln
seed=
for s in /sys/block/vd*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = kiln-seed ] || continue
    b=${s%/serial}
    seed=/dev/${b##*/}
done
rm -rf /run/kiln/seed
mkdir -m 700 /run/kiln/seed
if [ -n "$seed" ]; then
    # After a resume the page cache holds the disk as it was read before the snapshot.
    [ "$mode" = resumed ] && blockdev --flushbufs "$seed" 2>/dev/null
    tar -x --no-same-owner --no-same-permissions -f "$seed" -C /run/kiln/seed
fi
name= dns= ip= mtu=
for arg in $(cat /proc/cmdline) $(cat /run/kiln/seed/cmdline 2>/dev/null); do
    case "$arg" in
        kiln.name=*) name=${arg#kiln.name=} ;;
        kiln.dns=*) dns=${arg#kiln.dns=} ;;
        kiln.ip=*) ip=${arg#kiln.ip=} ;;
        kiln.mtu=*) mtu=${arg#kiln.mtu=} ;;
    esac
done
: > /run/kiln/resolv.conf.new
for ns in $(echo "$dns" | tr ',' ' '); do
    echo "nameserver $ns" >> /run/kiln/resolv.conf.new
done
mv /run/kiln/resolv.conf.new /run/kiln/resolv.conf
k=/run/kiln/seed/ssh_host_ed25519_key
if [ -f "$k" ] && [ -f "$k.pub" ] && ! cmp -s "$k" /etc/ssh/ssh_host_ed25519_key; then
    install -m 600 "$k" /etc/ssh/ssh_host_ed25519_key
    install -m 644 "$k.pub" /etc/ssh/ssh_host_ed25519_key.pub
    # sshd reads its host key when it starts.
    [ "$mode" = resumed ] && systemctl try-restart ssh.service
fi
if [ -n "$name" ] && [ "$(hostname)" != "$name" -o "$mode" = boot ]; then
    hostname "$name"
    echo "$name" > /etc/hostname
    if grep -q '^127\.0\.1\.1' /etc/hosts; then
        sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$name/" /etc/hosts
    else
        printf '127.0.1.1\t%s\n' "$name" >> /etc/hosts
    fi
fi
if [ -f /run/kiln/seed/authorized_keys ]; then
    install -m 600 /run/kiln/seed/authorized_keys /run/kiln/authorized_keys
fi
rm -rf /run/kiln/seed
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
if [ -n "$ip" ]; then
    addr=${ip%%,*}
    gw=
    [ "$addr" != "$ip" ] && gw=${ip#*,}
    modprobe -q virtio_net 2>/dev/null
    dev=
    for i in $(seq 300); do
        dev=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
        [ -n "$dev" ] && break
        sleep 0.1
    done
    if [ -n "$dev" ] && ! ip -o addr show dev "$dev" | grep -q " $addr "; then
        ip link set lo up
        [ -n "$mtu" ] && ip link set "$dev" mtu "$mtu"
        ip link set "$dev" up
        ip addr flush dev "$dev"
        ip addr add "$addr" dev "$dev"
        [ -n "$gw" ] && ip route replace default via "$gw"
    fi
fi
exit 0
"#;

/// The resume watcher (`/usr/lib/kiln/kiln-resumed`, a service): a VM resumed from a snapshot
/// wakes with its clock where the snapshot left it, while the RTC (QEMU's, on the host's
/// clock) tells the time. Once a second, without starting a process, it compares the two;
/// when they differ by more than 2 s it sets the clock from the RTC (at the RTC's next tick,
/// so to within a few milliseconds) and runs `kiln-hook resumed`. It also reads the root
/// disk's serial ([`root_serial`]; virtio-blk asks the device on every read): a clone has its
/// origin's memory but a serial of its own, so a clone made within seconds of its snapshot,
/// when the clocks still agree, gets its own identity too.
pub const KILN_RESUMED: &str = r#"#!/bin/bash
# kiln: set the clock after a resume from a snapshot, and apply a clone's identity (see kiln-rootfs).
rtc=/sys/class/rtc/rtc0/since_epoch
[ -r "$rtc" ] || exit 0
# The root disk's serial names the VM (kiln-ID): a clone's differs from its origin's.
vm=/sys/block/vda/serial
read -r was < "$vm"
# A pipe nobody writes to: `read -t` on it sleeps without a process of its own.
exec {wait}<> <(:)
while :; do
    read -t 1 -u "$wait"
    read -r now < "$rtc" || continue
    is=
    read -r is < "$vm"
    d=$((now - EPOCHSECONDS))
    if ((d > 2 || d < -2)); then
        until read -r tick < "$rtc" && ((tick != now)); do read -t 0.005 -u "$wait"; done
        date -s "@$tick" > /dev/null
        echo "kiln: resumed; clock set from the RTC ($d s)" > /dev/kmsg
    elif [[ $is == "$was" ]]; then
        continue
    fi
    [[ $is != "$was" ]] && echo "kiln: resumed as $is (was $was)" > /dev/kmsg
    was=$is
    /usr/lib/kiln/kiln-hook resumed
done
"#;

/// The virtio serial of a VM's root disk: `kiln-` and the first 15 characters of its id
/// (virtio-blk serials hold 20). [`KILN_RESUMED`] tells a clone from its origin by it.
pub fn root_serial(vm_id: &str) -> String {
    let id: String = vm_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(15)
        .collect();
    format!("kiln-{id}")
}

const RESUMED_UNIT: &str = "\
[Unit]
Description=kiln: clock and identity after a resume from a snapshot
After=kiln-hook.service

[Service]
ExecStart=/usr/lib/kiln/kiln-resumed
Restart=always

[Install]
WantedBy=multi-user.target
";

/// The virtio serial of kiln's seed disk, by which [`KILN_HOOK`] finds it.
pub const SEED_SERIAL: &str = "kiln-seed";

/// sshd's drop-in (`/etc/ssh/sshd_config.d/kiln.conf`): the one host key kiln hands the VM
/// (an ed25519 key is made in no time, even under TCG, where RSA takes seconds), and root's
/// keys from kiln's seed disk besides the usual `~/.ssh/authorized_keys`. No passwords.
pub const SSHD_CONFIG: &str = "\
# kiln: the host key kiln made for this VM (kiln hook) and the keys kiln hands root.
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile .ssh/authorized_keys /run/kiln/authorized_keys
PasswordAuthentication no
PermitRootLogin prohibit-password
";

const HOOK_UNIT: &str = "\
[Unit]
Description=kiln: hostname, resolv.conf, address and SSH keys from the kernel command line and kiln's seed disk
DefaultDependencies=no
After=local-fs.target systemd-udev-trigger.service
Before=sysinit.target ssh.service network.target
Wants=systemd-udev-trigger.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/kiln/kiln-hook

[Install]
WantedBy=sysinit.target
";

const AUTOLOGIN: &str = "\
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --keep-baud --autologin root 115200,57600,38400,9600 - $TERM
";

/// Errors of the image builders, one line each.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("kiln image debian needs root (debootstrap chroots and creates device nodes); run it with sudo")]
    NotRoot,
    #[error("{tool} is not installed (apt-get install {package})")]
    MissingTool { tool: String, package: String },
    #[error("{path}: {why}")]
    Output { path: PathBuf, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {detail} (full log: {log})")]
    Tool {
        tool: String,
        status: String,
        detail: String,
        log: PathBuf,
    },
    #[error("invalid {what} '{value}': {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("{tool} failed: {detail}")]
    ToolFailed { tool: String, detail: String },
    #[error("{path}: {why}")]
    Manifest { path: PathBuf, why: String },
}

/// Writes `bytes` (and a final newline) to `path` through a temporary file in the same
/// directory and a rename: readers see the old content or the new, never half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RootfsError> {
    let mut text = Vec::with_capacity(bytes.len() + 1);
    text.extend_from_slice(bytes);
    text.push(b'\n');
    kiln_sys::temp::write_atomic(path, &text, None, 0o644).map_err(|source| RootfsError::Io {
        what: format!("{}: cannot write", path.display()),
        source,
    })
}

/// The I/O error of `what` done to `path` (`PATH: cannot read`).
pub(crate) fn io_at(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> RootfsError {
    io(format!("{}: {what}", path.display()))
}

/// `path` is not what it must be.
pub(crate) fn refused(path: &Path, why: impl Into<String>) -> RootfsError {
    RootfsError::Output {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let what = what.into();
    move |source| RootfsError::Io { what, source }
}

/// What `kiln image debian` builds.
#[derive(Clone, Debug)]
pub struct DebianOptions {
    /// `bookworm`, `trixie`, ...
    pub suite: String,
    /// Size of rootfs.ext4 in bytes (sparse).
    pub size: u64,
    /// The Debian mirror debootstrap downloads from.
    pub mirror: String,
    /// Packages beyond [`PACKAGES`] (or [`v86::PACKAGES`]).
    pub extra_packages: Vec<String>,
    /// amd64: a microVM image (QEMU, systemd); i386: a v86 image (9p root, busybox init).
    pub arch: tree::Arch,
}

impl Default for DebianOptions {
    fn default() -> Self {
        DebianOptions {
            suite: "bookworm".into(),
            size: 2 << 30,
            mirror: "http://deb.debian.org/debian".into(),
            extra_packages: Vec::new(),
            arch: tree::Arch::Amd64,
        }
    }
}

impl DebianOptions {
    /// A stable fingerprint of everything that shapes the image (not the output path): the
    /// key of [`cached_debian_image`].
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv::new();
        h.add(&BUILDER_VERSION.to_le_bytes());
        for part in [&self.suite, &self.mirror] {
            h.add(part.as_bytes());
        }
        h.add(&self.size.to_le_bytes());
        for p in self.packages() {
            h.add(p.as_bytes());
        }
        h.add(self.arch.name().as_bytes());
        let texts: &[&str] = match self.arch {
            tree::Arch::Amd64 => &[
                FSTAB,
                KILN_HOOK,
                HOOK_UNIT,
                KILN_RESUMED,
                RESUMED_UNIT,
                AUTOLOGIN,
                SSHD_CONFIG,
            ],
            tree::Arch::I386 => &[
                v86::INITTAB,
                v86::KILN_RC,
                v86::UDHCPC_SCRIPT,
                v86::PAM_LOGIN,
                v86::CMDLINE,
                initramfs::INIT,
            ],
        };
        for text in texts {
            h.add(text.as_bytes());
        }
        format!("{:016x}", h.0)
    }

    fn packages(&self) -> Vec<String> {
        let base = match self.arch {
            tree::Arch::Amd64 => PACKAGES,
            tree::Arch::I386 => v86::PACKAGES,
        };
        base.iter()
            .map(|s| s.to_string())
            .chain(self.extra_packages.iter().cloned())
            .collect()
    }

    fn validate(&self) -> Result<(), RootfsError> {
        let bad = |what, value: &str, why: &str| RootfsError::Invalid {
            what,
            value: value.to_string(),
            why: why.to_string(),
        };
        if self.suite.is_empty()
            || !self
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad(
                "suite",
                &self.suite,
                "expected a Debian suite name like bookworm",
            ));
        }
        if self.size < 512 << 20 {
            return Err(bad(
                "size",
                &format_size(self.size),
                "a Debian root filesystem needs at least 512M",
            ));
        }
        for p in &self.extra_packages {
            if p.is_empty() || p.starts_with('-') || p.contains([',', ' ']) {
                return Err(bad("package", p, "not a package name"));
            }
        }
        Ok(())
    }
}

/// Builds a Debian image into `out` (created; must not exist or be empty). `progress` gets one
/// line per step.
pub fn build_debian(
    opts: &DebianOptions,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageManifest, RootfsError> {
    opts.validate()?;
    if !kiln_sys::process::is_root() {
        return Err(RootfsError::NotRoot);
    }
    for (tool, package) in [("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs")] {
        if !tool_exists(tool) {
            return Err(RootfsError::MissingTool {
                tool: tool.into(),
                package: package.into(),
            });
        }
    }
    if out.exists() {
        let empty = fs::read_dir(out)
            .map_err(io(format!("{}: cannot read", out.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(RootfsError::Output {
                path: out.to_path_buf(),
                why: "exists and is not empty".into(),
            });
        }
    }
    fs::create_dir_all(out).map_err(io(format!("{}: cannot create", out.display())))?;
    let work = out.join(".build");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io(format!("{}: cannot create", work.display())))?;
    let root = work.join("root");
    let log = out.join("build.log");

    progress(&format!(
        "debootstrap {} from {} (about a minute)",
        opts.suite, opts.mirror
    ));
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--arch={}", opts.arch.name()))
        .arg("--variant=minbase")
        .arg(format!("--include={}", opts.packages().join(",")))
        .arg(&opts.suite)
        .arg(&root)
        .arg(&opts.mirror);
    run_logged(&mut cmd, "debootstrap", &log)?;

    drop_apt_caches(&root)?;
    if opts.arch == tree::Arch::I386 {
        let m = finish_v86(opts, &root, out, progress)?;
        progress("cleaning up");
        fs::remove_dir_all(&work).map_err(io(format!("{}: cannot remove", work.display())))?;
        return Ok(m);
    }
    progress("configuring: fstab, kiln hook, serial autologin");
    configure(&root)?;

    progress("copying the kernel and initrd");
    let boot = root.join("boot");
    let kernel = newest(&boot, "vmlinuz-")?;
    let initrd = newest(&boot, "initrd.img-")?;
    fs::copy(&kernel, out.join("vmlinuz"))
        .map_err(io(format!("{}: cannot copy", kernel.display())))?;
    fs::copy(&initrd, out.join("initrd.img"))
        .map_err(io(format!("{}: cannot copy", initrd.display())))?;

    progress("making home.ext4 and var.ext4 (the seeds of each VM's /home and /var)");
    for (dir, file) in [("home", "home.ext4"), ("var", "var.ext4")] {
        let target = out.join(file);
        let _ = fs::remove_file(&target);
        make_ext4_disk(&target, DEFAULT_DISK_SIZE, Some(&root.join(dir)), dir)?;
    }

    progress(&format!("making rootfs.ext4 ({})", format_size(opts.size)));
    let rootfs = out.join("rootfs.ext4");
    let _ = fs::remove_file(&rootfs);
    make_ext4_disk(&rootfs, opts.size, Some(&root), "kiln-root")?;

    let manifest = ImageManifest {
        name: format!("debian-{}", opts.suite),
        rootfs: "rootfs.ext4".into(),
        kernel: "vmlinuz".into(),
        initrd: Some("initrd.img".into()),
        cmdline: String::new(),
        home_seed: Some("home.ext4".into()),
        var_seed: Some("var.ext4".into()),
        created_at: Some(kiln_sys::now_rfc3339()),
        builder: serde_json::json!({
            "builder": "kiln image debian",
            "version": BUILDER_VERSION,
            "suite": opts.suite,
            "mirror": opts.mirror,
            "packages": opts.packages(),
            "kernel": kernel.file_name().map(|n| n.to_string_lossy().into_owned()),
            "fingerprint": opts.fingerprint(),
        }),
        arch: Some(tree::Arch::Amd64),
        fs9p: None,
    };
    manifest.save(out)?;
    progress("cleaning up");
    fs::remove_dir_all(&work).map_err(io(format!("{}: cannot remove", work.display())))?;
    Ok(manifest)
}

/// Writes into an image tree being configured: files (replacing what is there) and symlinks,
/// creating parent directories. Shared by the microVM and the v86 configurations.
pub(crate) struct TreeWriter<'a>(pub &'a Path);

impl TreeWriter<'_> {
    pub(crate) fn write(&self, rel: &str, text: &str, mode: u32) -> Result<(), RootfsError> {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent, "cannot create"))?;
        }
        let _ = fs::remove_file(&p);
        fs::write(&p, text).map_err(io_at(&p, "cannot write"))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_at(&p, "cannot chmod"))
    }

    pub(crate) fn link(&self, target: &str, rel: &str) -> Result<(), RootfsError> {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent, "cannot create"))?;
        }
        let _ = fs::remove_file(&p);
        symlink(target, &p).map_err(io_at(&p, "cannot link"))
    }

    /// The hostname `kiln` (a VM's own name is applied at boot) and /etc/resolv.conf as a link
    /// to the one kiln's boot hook or DHCP script writes under /run/kiln.
    pub(crate) fn identity(&self) -> Result<(), RootfsError> {
        self.write("etc/hostname", "kiln\n", 0o644)?;
        self.write(
            "etc/hosts",
            "127.0.0.1\tlocalhost\n127.0.1.1\tkiln\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )?;
        self.link("/run/kiln/resolv.conf", "etc/resolv.conf")
    }
}

/// Writes kiln's configuration into a debootstrapped tree.
fn configure(root: &Path) -> Result<(), RootfsError> {
    let t = TreeWriter(root);
    let write = |rel: &str, text: &str, mode: u32| t.write(rel, text, mode);
    let link = |target: &str, rel: &str| t.link(target, rel);
    write("etc/fstab", FSTAB, 0o644)?;
    t.identity()?;
    write("usr/lib/kiln/kiln-hook", KILN_HOOK, 0o755)?;
    write("etc/systemd/system/kiln-hook.service", HOOK_UNIT, 0o644)?;
    write("usr/lib/kiln/kiln-resumed", KILN_RESUMED, 0o755)?;
    write(
        "etc/systemd/system/kiln-resumed.service",
        RESUMED_UNIT,
        0o644,
    )?;
    link(
        "/etc/systemd/system/kiln-resumed.service",
        "etc/systemd/system/multi-user.target.wants/kiln-resumed.service",
    )?;
    write("etc/ssh/sshd_config.d/kiln.conf", SSHD_CONFIG, 0o644)?;
    link(
        "/etc/systemd/system/kiln-hook.service",
        "etc/systemd/system/sysinit.target.wants/kiln-hook.service",
    )?;
    write(
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        AUTOLOGIN,
        0o644,
    )?;
    // A first boot must not stop at an interactive prompt on the console.
    link("/dev/null", "etc/systemd/system/systemd-firstboot.service")?;
    // Each VM gets its own machine id (generated at first boot) and SSH host keys (kiln hook).
    write("etc/machine-id", "", 0o444)?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    for entry in fs::read_dir(root.join("etc/ssh")).map_err(io("etc/ssh: cannot read"))? {
        let p = entry.map_err(io("etc/ssh: cannot read"))?.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ssh_host_"))
        {
            fs::remove_file(&p).map_err(io(format!("{}: cannot remove", p.display())))?;
        }
    }
    Ok(())
}

/// The i386 image for v86: busybox init, kiln's slim 9p initramfs, the 9p filesystem.
fn finish_v86(
    opts: &DebianOptions,
    root: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageManifest, RootfsError> {
    progress("configuring for v86: busybox init, serial autologin, DHCP");
    v86::configure(root)?;
    let release = initramfs::release(root)?;
    let boot = root.join("boot");
    // initramfs-tools' initrd (26 MB) gives way to the slim one.
    for e in fs::read_dir(&boot)
        .map_err(io_at(&boot, "cannot read"))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("initrd.img") {
            fs::remove_file(e.path()).map_err(io_at(&e.path(), "cannot remove"))?;
        }
    }
    progress("making the slim initramfs (busybox, 9p and virtio modules)");
    let initrd = boot.join(format!("initrd.img-{release}"));
    let slim = initramfs::write(root, &release, &initrd)?;
    let kernel = boot.join(format!("vmlinuz-{release}"));
    let spec = create::ImageSpec {
        name: format!("debian-{}-i386", opts.suite),
        arch: tree::Arch::I386,
        kernel,
        initrd: Some(initrd),
        size: Some(opts.size),
        cmdline: v86::CMDLINE.into(),
        builder: serde_json::json!({
            "builder": "kiln image debian",
            "version": BUILDER_VERSION,
            "suite": opts.suite,
            "arch": "i386",
            "mirror": opts.mirror,
            "packages": opts.packages(),
            "kernel": release,
            "initramfs": { "bytes": slim.bytes, "modules": slim.modules },
            "fingerprint": opts.fingerprint(),
        }),
    };
    create::write_image(root, out, &spec, progress)
}

/// Downloaded packages and index files are large and stale in a VM: drop them.
fn drop_apt_caches(root: &Path) -> Result<(), RootfsError> {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(root.join(dir)).map_err(io(format!("{dir}: cannot read")))? {
            let p = entry.map_err(io(format!("{dir}: cannot read")))?.path();
            if p.is_file() {
                fs::remove_file(&p).map_err(io(format!("{}: cannot remove", p.display())))?;
            }
        }
    }
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(root.join(f));
    }
    Ok(())
}

/// The image for `opts`, built once under `cache_root/kiln-debian-<fingerprint>` and reused by
/// later calls (tests and benchmarks share it). Concurrent callers wait for one build.
pub fn cached_debian_image(
    opts: &DebianOptions,
    cache_root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, RootfsError> {
    let dir = cache_root.join(format!("kiln-debian-{}", opts.fingerprint()));
    if dir.join(IMAGE_MANIFEST).exists() {
        return Ok(dir);
    }
    fs::create_dir_all(cache_root)
        .map_err(io(format!("{}: cannot create", cache_root.display())))?;
    let lock_path = cache_root.join(format!("kiln-debian-{}.lock", opts.fingerprint()));
    // One builder per image at a time; the lock goes with its holder, whatever kills it.
    let lock = kiln_sys::lock::FileLock::exclusive(&lock_path)
        .map_err(io(format!("{}: cannot lock", lock_path.display())))?;
    if dir.join(IMAGE_MANIFEST).exists() {
        return Ok(dir);
    }
    // A build killed half-way leaves its temporary directory; the next build sweeps it.
    kiln_sys::temp::sweep(cache_root);
    let tmp = kiln_sys::temp::beside(&dir);
    if let Err(e) = build_debian(opts, &tmp, progress) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &dir).map_err(io(format!("{}: cannot rename into place", dir.display())))?;
    drop(lock);
    Ok(dir)
}

fn tool_exists(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

/// The lexically newest `prefix*` file in `dir` (the installed kernel/initrd).
fn newest(dir: &Path, prefix: &str) -> Result<PathBuf, RootfsError> {
    newest_file(dir, prefix)
        .map_err(io(format!("{}: cannot read", dir.display())))?
        .ok_or_else(|| RootfsError::Output {
            path: dir.to_path_buf(),
            why: format!("no {prefix}* found: the kernel package did not install"),
        })
}

/// The last by name of the regular files in `dir` whose names start with `prefix` (a symlink
/// is never taken: in an image's tree it may name a host path).
pub(crate) fn newest_file(dir: &Path, prefix: &str) -> std::io::Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found.pop())
}

/// Runs a long tool with its output appended to `log`; on failure the error quotes its last line.
fn run_logged(cmd: &mut Command, tool: &str, log: &Path) -> Result<(), RootfsError> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("{}: cannot open", log.display())))?;
    let _ = writeln!(f, "$ {cmd:?}");
    let f2 = f
        .try_clone()
        .map_err(io(format!("{}: cannot open", log.display())))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .status()
        .map_err(io(format!("cannot run {tool}")))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let detail = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .to_string();
    Err(RootfsError::Tool {
        tool: tool.into(),
        status: status.to_string(),
        detail,
        log: log.to_path_buf(),
    })
}

/// FNV-1a 64: a stable hash (std's hasher may change between Rust releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes.iter().chain(&[0xff]) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = DebianOptions::default();
        assert_eq!(a.fingerprint(), DebianOptions::default().fingerprint());
        let b = DebianOptions {
            suite: "trixie".into(),
            ..DebianOptions::default()
        };
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn bad_options_are_one_line_errors() {
        for o in [
            DebianOptions {
                suite: "../x".into(),
                ..DebianOptions::default()
            },
            DebianOptions {
                size: 1 << 20,
                ..DebianOptions::default()
            },
            DebianOptions {
                extra_packages: vec!["a,b".into()],
                ..DebianOptions::default()
            },
        ] {
            let e = build_debian(&o, Path::new("/nonexistent/out"), &mut |_| {}).unwrap_err();
            assert!(matches!(e, RootfsError::Invalid { .. }), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
