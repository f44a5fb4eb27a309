//! The system of kiln's i386 images for v86 (`kiln image debian --arch i386`): a 9p root, a
//! slim initramfs ([`crate::initramfs`]) and a lean init, because v86 runs guest code at a few
//! hundred MIPS and every program started on the way to the prompt costs a visible fraction
//! of a second.
//!
//! - **init** is busybox's (`/sbin/init` -> `/bin/busybox`, [`INITTAB`]): it runs [`KILN_RC`]
//!   once, keeps an autologin `agetty` on ttyS0 and reaps orphans; busybox's `poweroff` and
//!   `reboot` talk to it.
//! - **[`KILN_RC`]** mounts the kernel filesystems and tmpfs on /run and /tmp, sets the
//!   hostname, loads the drivers of the network cards present (PCI class 02, no udev) and runs
//!   busybox's DHCP client on each card in the background ([`UDHCPC_SCRIPT`] applies the lease;
//!   it asks every second, so a page that restores a saved state gets its network
//!   right after the restore). It uses only busybox applets: a static program starts in a
//!   tenth of the time of a dynamically linked one on v86.
//! - **root** logs in automatically on the serial console; root's password is empty, and
//!   PAM accepts the empty password on ttyS0 only ([`PAM_LOGIN`]; `nullok` is removed from
//!   `common-auth`, so no other service takes it).

use std::fs;
use std::path::Path;

use crate::{io_at, RootfsError};

/// Packages installed on top of debootstrap's minbase for an i386 v86 image.
pub const PACKAGES: &[&str] = &[
    "linux-image-686",
    "busybox-static",
    "kmod",
    "iproute2",
    "procps",
];

/// The kernel command line of a v86 image: the 9p root of v86's `filesystem` (the tag v86
/// exports is `host9p`), busybox init, the serial console. `cryptomgr.notests` skips the
/// crypto self-tests (6 s on v86), `noisapnp` the ISA PnP scan; v86 does not speculate, so
/// the speculative-execution mitigations only cost time. `init_on_free=1` zeroes freed
/// pages, so a saved state compresses to a third (14 MB instead of 23 MB at the prompt).
pub const CMDLINE: &str =
    "root=host9p rootfstype=9p rootflags=trans=virtio,version=9p2000.L,cache=loose,msize=512000 \
console=ttyS0 init=/sbin/init quiet cryptomgr.notests noisapnp mitigations=off init_on_free=1";

/// busybox init's table.
pub const INITTAB: &str = "\
# kiln: busybox init (see kiln-rootfs's v86 module)
::sysinit:/usr/lib/kiln/kiln-rc
ttyS0::respawn:/sbin/agetty --autologin root --noclear --keep-baud 115200 ttyS0 vt100
::ctrlaltdel:/bin/busybox reboot
::shutdown:/bin/busybox sync
";

/// The system start (run once by init).
pub const KILN_RC: &str = r#"#!/bin/busybox sh
# kiln-rc: the start of kiln's v86 images (busybox init runs it once; busybox applets only).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
b=/bin/busybox
$b mount -t proc proc /proc
$b mount -t sysfs sysfs /sys
$b mkdir -p /dev/pts /dev/shm
$b mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$b mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
$b mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
$b mkdir -p /run/lock /run/kiln
$b mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
$b hostname -F /etc/hostname
$b ip link set lo up
for d in /sys/bus/pci/devices/*; do
    read -r class < "$d/class"
    case "$class" in
        0x02*) read -r alias < "$d/modalias"; $b modprobe -q "$alias" ;;
    esac
done
for n in /sys/class/net/*; do
    dev=${n##*/}
    [ "$dev" = lo ] && continue
    $b udhcpc -f -S -T 1 -A 1 -i "$dev" -s /usr/lib/kiln/udhcpc >/dev/null 2>&1 &
done
exit 0
"#;

/// busybox udhcpc's script: the lease's address, default route and resolvers.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/busybox sh
# kiln: apply a DHCP lease (busybox udhcpc)
b=/bin/busybox
case "$1" in
    deconfig)
        $b ip -4 addr flush dev "$interface"
        $b ip link set "$interface" up
        ;;
    bound|renew)
        $b ip -4 addr flush dev "$interface"
        $b ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && $b ip route replace default via "${router%% *}" dev "$interface"
        : > /run/kiln/resolv.conf.new
        for d in $dns; do echo "nameserver $d" >> /run/kiln/resolv.conf.new; done
        $b mv /run/kiln/resolv.conf.new /run/kiln/resolv.conf
        ;;
esac
exit 0
"#;

/// Lines put before `@include common-auth` in `/etc/pam.d/login`: the empty password is
/// accepted on the serial console only.
pub const PAM_LOGIN: &str = "\
# kiln: root's empty password is accepted on the serial console (ttyS0) only
auth [success=ignore default=1] pam_succeed_if.so quiet tty in ttyS0:/dev/ttyS0
auth sufficient pam_unix.so nullok
";

/// Configures a debootstrapped i386 tree for v86 (see the module's documentation).
pub fn configure(root: &Path) -> Result<(), RootfsError> {
    let t = crate::TreeWriter(root);
    let write = |rel: &str, text: &str, mode: u32| t.write(rel, text, mode);
    let link = |target: &str, rel: &str| t.link(target, rel);
    write("etc/inittab", INITTAB, 0o644)?;
    write("usr/lib/kiln/kiln-rc", KILN_RC, 0o755)?;
    write("usr/lib/kiln/udhcpc", UDHCPC_SCRIPT, 0o755)?;
    for name in ["init", "poweroff", "reboot", "halt"] {
        link("/bin/busybox", &format!("usr/sbin/{name}"))?;
    }
    t.identity()?;
    write(
        "etc/fstab",
        "# kiln: / is v86's 9p filesystem; kiln-rc mounts the rest\n",
        0o644,
    )?;
    // The kernel package's hook must not replace kiln's initramfs on an upgrade in the guest.
    write(
        "etc/initramfs-tools/update-initramfs.conf",
        "# kiln: the image's initramfs is kiln's slim one (kiln-rootfs initramfs)\nupdate_initramfs=no\nbackup_initramfs=no\n",
        0o644,
    )?;
    // Root: an empty password, taken on the serial console only.
    let edit = |rel: &str, f: &dyn Fn(&str) -> String| -> Result<(), RootfsError> {
        let p = root.join(rel);
        let text = fs::read_to_string(&p).map_err(io_at(&p, "cannot read"))?;
        fs::write(&p, f(&text)).map_err(io_at(&p, "cannot write"))
    };
    edit("etc/shadow", &|t| {
        t.lines()
            .map(|l| match l.split_once(':') {
                Some(("root", rest)) => {
                    let after = rest.split_once(':').map(|(_, a)| a).unwrap_or("");
                    format!("root::{after}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect()
    })?;
    edit("etc/pam.d/common-auth", &|t| t.replace(" nullok", ""))?;
    edit("etc/pam.d/login", &|t| {
        t.replacen(
            "@include common-auth",
            &format!("{PAM_LOGIN}@include common-auth"),
            1,
        )
    })?;
    // Documentation, manual pages and translations are most of a minbase's files the guest
    // never reads: they would only lengthen the 9p index every page loads.
    for dir in ["usr/share/doc", "usr/share/man", "usr/share/info"] {
        clear_dir(&root.join(dir))?;
    }
    let locale = root.join("usr/share/locale");
    for e in fs::read_dir(&locale)
        .map_err(io_at(&locale, "cannot read"))?
        .flatten()
    {
        if e.file_name() != "locale.alias" {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p).map_err(io_at(&p, "cannot remove"))?;
            }
        }
    }
    Ok(())
}

fn clear_dir(dir: &Path) -> Result<(), RootfsError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(io_at(&p, "cannot remove"))?;
    }
    Ok(())
}
