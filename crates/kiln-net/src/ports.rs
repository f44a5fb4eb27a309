//! Published ports: `-p [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]`.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::NetError;

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One published port: connections to `host_ip:host_port` on the host reach the guest's
/// `guest_port`. The host address defaults to 127.0.0.1: a port is published beyond the host
/// only when asked for (`0.0.0.0:8080:80`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host_ip, self.host_port, self.guest_port)?;
        if self.protocol == Protocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

impl FromStr for PortForward {
    type Err = NetError;
    fn from_str(s: &str) -> Result<PortForward, NetError> {
        let bad = |why: &str| NetError::invalid("port", s, why);
        let (spec, protocol) = match s.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, Protocol::Tcp),
            Some((spec, "udp")) => (spec, Protocol::Udp),
            Some(_) => return Err(bad("the protocol suffix is /tcp or /udp")),
            None => (s, Protocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts.as_slice() {
            [h, g] => (Ipv4Addr::LOCALHOST, *h, *g),
            [ip, h, g] => (
                ip.parse()
                    .map_err(|_| bad("the host address is an IPv4 address"))?,
                *h,
                *g,
            ),
            _ => return Err(bad("expected [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]")),
        };
        let port = |p: &str, which: &str| -> Result<u16, NetError> {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("the {which} port is a number from 1 to 65535")))
        };
        Ok(PortForward {
            protocol,
            host_ip,
            host_port: port(host_port, "host")?,
            guest_port: port(guest_port, "guest")?,
        })
    }
}

impl PortForward {
    /// The host socket address it listens on.
    pub fn host_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.host_ip, self.host_port)
    }
}

/// Checks that no two forwards share a host port, and that every host port can be bound now:
/// a taken port is an error before the VM starts.
pub fn check_free(forwards: &[PortForward]) -> Result<(), NetError> {
    for (i, a) in forwards.iter().enumerate() {
        if let Some(b) = forwards[..i].iter().find(|b| {
            b.protocol == a.protocol
                && b.host_port == a.host_port
                && (b.host_ip == a.host_ip
                    || b.host_ip.is_unspecified()
                    || a.host_ip.is_unspecified())
        }) {
            return Err(NetError::PortTaken {
                forward: a.to_string(),
                why: format!("published twice (also {b})"),
            });
        }
        bind(a).map(drop)?;
    }
    Ok(())
}

/// A bound host socket of a forward.
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Binds the host side of `f` (the error names the forward).
pub fn bind(f: &PortForward) -> Result<Bound, NetError> {
    let taken = |e: std::io::Error| NetError::PortTaken {
        forward: f.to_string(),
        why: match e.kind() {
            std::io::ErrorKind::AddrInUse => "the host port is in use".into(),
            std::io::ErrorKind::AddrNotAvailable => "the host address is not on this host".into(),
            std::io::ErrorKind::PermissionDenied => "binding a port below 1024 needs root".into(),
            _ => e.to_string(),
        },
    };
    match f.protocol {
        Protocol::Tcp => TcpListener::bind(f.host_addr())
            .map(Bound::Tcp)
            .map_err(taken),
        Protocol::Udp => UdpSocket::bind(f.host_addr())
            .map(Bound::Udp)
            .map_err(taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_docker_forms() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!(p.to_string(), "127.0.0.1:8080:80");
        assert_eq!(p.protocol, Protocol::Tcp);
        let p: PortForward = "0.0.0.0:5353:53/udp".parse().unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.to_string(), "0.0.0.0:5353:53/udp");
        assert_eq!("1:2/tcp".parse::<PortForward>().unwrap().guest_port, 2);
        for bad in [
            "80",
            "0:80",
            "80:0",
            "a:80",
            "1.2.3:80:80",
            "80:80/sctp",
            "70000:80",
            "1:2:3:4",
            "",
        ] {
            let e = bad.parse::<PortForward>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid port '{bad}'")), "{e}");
        }
    }

    #[test]
    fn a_taken_port_is_an_error_naming_it() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f: PortForward = format!("{port}:80").parse().unwrap();
        let e = check_free(&[f]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("port 127.0.0.1:{port}:80: the host port is in use")
        );
        drop(l);
        check_free(&[f]).unwrap();
        let e = check_free(&[f, f]).unwrap_err().to_string();
        assert!(e.contains("published twice"), "{e}");
        // The same port over UDP is another socket.
        let mut u = f;
        u.protocol = Protocol::Udp;
        check_free(&[f, u]).unwrap();
    }
}
