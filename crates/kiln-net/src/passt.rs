//! passt, the user-mode network stack podman uses: one process per guest, on one end of a
//! socket pair whose other end QEMU (or kiln-web's relay) holds. passt exits when its end
//! closes; started as root it drops to `nobody` itself.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_sys::process::ChildSetup;

use crate::{NetError, PortForward, Protocol};

/// The guest's view of a user-mode network (the layout QEMU's slirp uses too).
pub mod layout {
    use std::net::Ipv4Addr;
    /// The guest's address.
    pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    pub const PREFIX: u8 = 24;
    /// The gateway (passt and slirp answer for it).
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    /// The resolver, forwarded to the host's.
    pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    /// The guest's MTU behind passt, the one passt's DHCP offers: its throughput goes with the
    /// frame size (100 MiB in 3.3 s at 65520 against 66 s at 1500 here, TCG).
    pub const MTU: u32 = 65520;
}

/// What one passt serves.
#[derive(Clone, Debug, Default)]
pub struct PasstOptions {
    /// Host ports forwarded into the guest.
    pub forwards: Vec<PortForward>,
    /// Assign the guest [`layout`]'s address, gateway and resolver (DHCP offers the same).
    /// Connections from the host's loopback to published ports reach the guest from the
    /// gateway's address (as with QEMU's slirp, the gateway also leads to the host).
    pub guest_layout: bool,
}

/// A socket pair: `passt`'s end is inherited by the passt process, `peer`'s is the guest's.
pub struct PasstSocket {
    pub passt: OwnedFd,
    pub peer: UnixStream,
}

/// Makes the socket pair a passt and its peer share.
pub fn socket_pair() -> Result<PasstSocket, NetError> {
    let (passt, peer) =
        UnixStream::pair().map_err(|e| NetError::io("cannot make a socket pair for passt", e))?;
    Ok(PasstSocket {
        passt: passt.into(),
        peer,
    })
}

/// The passt command for `socket`'s passt end: foreground, quiet, on that descriptor
/// (inherited), with `opts`; it gets SIGKILL if the thread that starts it dies.
pub fn command(binary: &Path, socket: &PasstSocket, opts: &PasstOptions) -> Command {
    let fd = socket.passt.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(["-f", "-q", "--fd"]).arg(fd.to_string());
    if opts.guest_layout {
        use layout::*;
        cmd.args(["-a", &GUEST.to_string(), "-n", &PREFIX.to_string()])
            .args(["-g", &GATEWAY.to_string()])
            .args(["--dns-forward", &DNS.to_string()]);
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let flag = if protocol == Protocol::Tcp {
            "-t"
        } else {
            "-u"
        };
        let mine: Vec<&PortForward> = opts
            .forwards
            .iter()
            .filter(|f| f.protocol == protocol)
            .collect();
        if mine.is_empty() {
            cmd.args([flag, "none"]);
        }
        for f in mine {
            cmd.arg(flag).arg(if f.host_ip.is_unspecified() {
                format!("{}:{}", f.host_port, f.guest_port)
            } else {
                format!("{}/{}:{}", f.host_ip, f.host_port, f.guest_port)
            });
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    kiln_sys::process::configure(
        &mut cmd,
        ChildSetup {
            die_with_parent: true,
            keep_fds: vec![fd],
            ..ChildSetup::default()
        },
    );
    cmd
}

/// The passt binary: `$KILN_PASST`, else `passt` on PATH; `None` when it is not there.
pub fn find() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PASST") {
        let p = std::path::PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("passt"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_become_passt_port_specs() {
        let s = socket_pair().unwrap();
        let opts = PasstOptions {
            forwards: vec![
                "2222:22".parse().unwrap(),
                "0.0.0.0:8080:80".parse().unwrap(),
                "5353:53/udp".parse().unwrap(),
            ],
            guest_layout: true,
        };
        let cmd = command(Path::new("passt"), &s, &opts);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains("-t 127.0.0.1/2222:22 -t 8080:80 -u 127.0.0.1/5353:53"),
            "{line}"
        );
        assert!(
            line.contains("-a 10.0.2.15 -n 24 -g 10.0.2.2 --dns-forward 10.0.2.3 -t"),
            "{line}"
        );
        let none = command(Path::new("passt"), &s, &PasstOptions::default());
        let line: Vec<String> = none
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(line.join(" ").ends_with("-t none -u none"), "{line:?}");
    }
}
