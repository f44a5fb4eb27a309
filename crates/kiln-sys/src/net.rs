//! TAP devices: the one ioctl kiln's networking needs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Longest interface name Linux takes (IFNAMSIZ less the NUL).
pub const IFNAME_MAX: usize = 15;

/// Creates the TAP device `name` (no packet-information header, with the virtio-net header
/// QEMU's tap backend uses for offloads) and returns its descriptor, close-on-exec. The device
/// is not persistent: it disappears when the last descriptor to it closes, so a VM's TAP goes
/// with its engine process whatever ends it. Needs CAP_NET_ADMIN.
pub fn create_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty()
        || name.len() > IFNAME_MAX
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not an interface name (1 to {IFNAME_MAX} of [A-Za-z0-9-])"),
        ));
    }
    // SAFETY: open(2) with a NUL-terminated literal path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor this function just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which IfReq lays out: the
    // NUL-terminated name (at most 15 bytes, checked above) and the flags.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Moves the calling thread into a new, empty network namespace (only the loopback device,
/// down). Processes the thread starts afterwards are in it too. Needs CAP_SYS_ADMIN.
pub fn unshare_netns() -> io::Result<()> {
    // SAFETY: unshare(2) with CLONE_NEWNET changes only the calling thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace `path` names (`/run/netns/NAME`,
/// `/proc/PID/ns/net`). Needs CAP_SYS_ADMIN.
pub fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns(2) on a descriptor this function owns, for the calling thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_checked_before_any_system_call() {
        for bad in ["", "a-name-longer-than-15", "a/b", "tap 0"] {
            assert_eq!(
                super::create_tap(bad).unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }
}
