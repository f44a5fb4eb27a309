//! The host's upstream resolvers, for a guest that reaches the network through the host.

use std::net::IpAddr;
use std::path::Path;

/// At most 3 upstream nameservers of the host: those of /etc/resolv.conf that are not
/// loopback; where it names only a local stub (systemd-resolved's 127.0.0.53), the upstream
/// servers systemd-resolved itself uses (/run/systemd/resolve/resolv.conf). A guest cannot
/// reach the host's loopback.
pub fn upstream_nameservers() -> Vec<IpAddr> {
    let direct = nameservers(Path::new("/etc/resolv.conf"));
    let upstream: Vec<IpAddr> = direct
        .iter()
        .copied()
        .filter(|a| !a.is_loopback())
        .collect();
    if !upstream.is_empty() || direct.is_empty() {
        return upstream.into_iter().take(3).collect();
    }
    nameservers(Path::new("/run/systemd/resolve/resolv.conf"))
        .into_iter()
        .filter(|a| !a.is_loopback())
        .take(3)
        .collect()
}

/// The `nameserver` lines of a resolv.conf (addresses only; anything else is skipped).
fn nameservers(path: &Path) -> Vec<IpAddr> {
    parse(&std::fs::read_to_string(path).unwrap_or_default())
}

fn parse(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .take(16)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_nameserver_lines_only() {
        let got = super::parse(
            "# x\nsearch lan\nnameserver 127.0.0.53\nnameserver  192.0.2.53\nnameserver bad\noptions edns0\n",
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].to_string(), "192.0.2.53");
    }
}
