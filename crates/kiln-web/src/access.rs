//! Who may use `kiln serve`: the names it answers to (the DNS-rebinding defence) and the random
//! keys that let the served page act as the VM and the operator's debug console drive it.
//!
//! A DNS-rebinding page is served from the attacker's name (`evil.example:PORT`) that later
//! resolves to kiln's address: its requests carry `Host: evil.example:PORT` and a matching
//! Origin, so comparing the two proves nothing. Instead the Host must be a name kiln serves:
//! an IP literal of the bound address (any IP literal when bound to 0.0.0.0 or `::`, since an
//! IP literal cannot be rebound), `localhost` for loopback and unspecified binds, each with the
//! bound port, or a name the user allowed (any port: a reverse proxy may front kiln). WebSocket
//! requests that carry an Origin must come from that same origin.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use crate::{Result, WebError};

/// The authorities (`host[:port]`) this server answers to.
#[derive(Clone, Debug)]
pub(crate) struct Hosts {
    bound: SocketAddr,
    names: Vec<String>,
}

impl Hosts {
    /// `extra`: additional host names (no port), as given by the user.
    pub(crate) fn new(bound: SocketAddr, extra: &[String]) -> Result<Hosts> {
        let mut names = Vec::new();
        for name in extra {
            let n = normalize_name(name);
            let valid = !n.is_empty()
                && n.len() <= 253
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !valid {
                return Err(WebError::BadOption {
                    field: "allow_hosts",
                    msg: format!("{name:?} is not a host name (give a name such as kiln.example, without port or scheme)"),
                });
            }
            names.push(n);
        }
        Ok(Hosts { bound, names })
    }

    /// Whether a request's Host (`name`, `name:port`, `[v6]`, `[v6]:port`) is one we serve.
    pub(crate) fn allows(&self, authority: &str) -> bool {
        let Some((host, port)) = split_authority(authority) else {
            return false;
        };
        if self.names.contains(&host) {
            return true;
        }
        if port.unwrap_or(80) != self.bound.port() {
            return false;
        }
        let ip = self.bound.ip();
        if host == "localhost" {
            return ip.is_loopback() || ip.is_unspecified();
        }
        match host.parse::<IpAddr>() {
            Ok(_) if ip.is_unspecified() => true,
            Ok(h) if ip.is_loopback() => h.is_loopback(),
            Ok(h) => h == ip,
            Err(_) => false,
        }
    }
}

fn normalize_name(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` → (lower-case host without brackets or trailing dot, port).
fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    if a.is_empty() || a.contains(['/', '@', ' ', '\\']) {
        return None;
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':')?),
        };
        // Brackets hold an IPv6 literal and nothing else.
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    if host.is_empty() || host.contains(':') && !a.starts_with('[') {
        return None;
    }
    Some((normalize_name(host), port))
}

/// A WebSocket request's Origin must be the page's own origin (`http[s]://` + its Host); a
/// request without one comes from a program, not a browser page, and is judged by its key.
pub(crate) fn origin_ok(origin: Option<&str>, host: &str) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

/// A fresh random key: 32 bytes from the kernel's CSPRNG, in hex.
pub(crate) fn random_key() -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `given` is `key`, in time that does not depend on where they differ.
pub(crate) fn key_matches(given: Option<&str>, key: &str) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (a, b) = (given.as_bytes(), key.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(addr: &str, extra: &[&str]) -> Hosts {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Hosts::new(addr.parse().unwrap(), &extra).unwrap()
    }

    #[test]
    fn loopback_bind() {
        let h = hosts("127.0.0.1:8086", &[]);
        for ok in [
            "127.0.0.1:8086",
            "localhost:8086",
            "LOCALHOST:8086",
            "[::1]:8086",
            "localhost.:8086",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:8086",
            "127.0.0.1:8087",
            "127.0.0.1",
            "10.0.0.1:8086",
            "localhost",
            "",
            "user@127.0.0.1:8086",
            "[127.0.0.1]:8086",
            "[::1",
            "::1:8086",
            "127.0.0.1:8086:1",
            "127.0.0.1:x",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    #[test]
    fn specific_and_unspecified_binds_and_extra_names() {
        let h = hosts("192.168.1.5:80", &["Kiln.Example."]);
        assert!(h.allows("192.168.1.5"));
        assert!(h.allows("192.168.1.5:80"));
        assert!(!h.allows("192.168.1.6"));
        assert!(!h.allows("localhost"));
        assert!(h.allows("kiln.example"));
        assert!(h.allows("kiln.example:443"));
        assert!(!h.allows("evil.kiln.example"));
        let h = hosts("0.0.0.0:9000", &[]);
        assert!(h.allows("10.1.2.3:9000"));
        assert!(h.allows("[fe80::1]:9000"));
        assert!(h.allows("localhost:9000"));
        assert!(!h.allows("evil.example:9000"));
        assert!(!h.allows("10.1.2.3:9001"));
        let e = Hosts::new("127.0.0.1:1".parse().unwrap(), &["a b".into()]).unwrap_err();
        assert!(e.to_string().contains("`allow_hosts`"), "{e}");
        assert!(Hosts::new("127.0.0.1:1".parse().unwrap(), &["http://x".into()]).is_err());
    }

    #[test]
    fn origins_and_keys() {
        assert!(origin_ok(None, "127.0.0.1:1"));
        assert!(origin_ok(Some("http://127.0.0.1:1"), "127.0.0.1:1"));
        assert!(!origin_ok(Some("http://127.0.0.1:2"), "127.0.0.1:1"));
        assert!(!origin_ok(Some("null"), "127.0.0.1:1"));
        assert!(!origin_ok(Some("http://127.0.0.1:1.evil"), "127.0.0.1:1"));
        let k = random_key().unwrap();
        assert_eq!(k.len(), 64);
        assert_ne!(k, random_key().unwrap());
        assert!(key_matches(Some(&k), &k));
        assert!(!key_matches(Some(&k[1..]), &k));
        assert!(!key_matches(None, &k));
        let mut wrong = k.clone().into_bytes();
        wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
        assert!(!key_matches(Some(std::str::from_utf8(&wrong).unwrap()), &k));
    }
}
