//! kiln's VM networks.
//!
//! Two modes, one per privilege level:
//! - **TAP** (root): each VM gets a TAP device ([`tap`]) and a /30 of its own from a pool
//!   ([`pool`]; host side `.1`, guest `.2`), forwarding and NAT in one nftables table of kiln's
//!   own ([`nat`]): VMs are isolated from one another, reach out only while `kiln net up`, and
//!   their published ports are relayed by the supervisor ([`proxy`]).
//! - **User** (no privileges): passt ([`passt`]), as podman uses it, on a socket pair with QEMU;
//!   QEMU's slirp where passt is missing.
//!
//! Published ports are [`PortForward`]s in both modes ([`ports`]); the guest's resolvers are the
//! host's upstream ones ([`dns`]). Nothing here modifies the guest: kiln-host hands the guest its
//! address on the kernel command line.

pub mod addr;
pub mod dns;
pub mod nat;
pub mod passt;
pub mod pool;
pub mod ports;
pub mod proxy;
pub mod tap;

use std::path::PathBuf;

pub use addr::Ipv4Net;
pub use pool::{Lease, DEFAULT_POOL};
pub use ports::{PortForward, Protocol};

/// One-line errors of kiln's networking, each naming its input.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid {what} '{value}': {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("{what} needs root (CAP_NET_ADMIN); run it with sudo{hint}")]
    NeedsRoot {
        what: &'static str,
        /// More advice, starting with ", " (or empty).
        hint: &'static str,
    },
    #[error("{tool} is not installed (apt-get install {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("port {forward}: {why}")]
    PortTaken { forward: String, why: String },
    #[error("pool {pool}: every /30 is in use")]
    PoolExhausted { pool: Ipv4Net },
    #[error("pool {pool} overlaps the host route {route} on {dev}; choose another pool")]
    PoolOverlaps {
        pool: Ipv4Net,
        route: Ipv4Net,
        dev: String,
    },
    #[error("{path}: {why}")]
    State { path: PathBuf, why: String },
}

impl NetError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> NetError {
        NetError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        what: &'static str,
        value: impl ToString,
        why: impl Into<String>,
    ) -> Self {
        NetError::Invalid {
            what,
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// The interface-name prefix of kiln's TAP devices: every rule kiln writes matches on it.
pub const TAP_PREFIX: &str = "kn-";

/// A MAC address for a VM from its random id: locally administered, unicast, stable for the VM.
pub fn mac_for(id: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("02:6b:6e:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// Runs `tool` with `args` (and `stdin`), returning its stdout; its first stderr line is the
/// error.
pub(crate) fn run_tool(
    tool: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    use kiln_sys::process::ToolError;
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args);
    match kiln_sys::process::run_tool(&mut cmd, stdin.map(str::as_bytes)) {
        Ok(out) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(ToolError::Missing) => Err(NetError::MissingTool { tool, package }),
        Err(ToolError::Io(e)) => Err(NetError::io(format!("cannot run {tool}"), e)),
        Err(ToolError::Failed { status, stderr }) => Err(NetError::Tool {
            tool,
            detail: format!(
                "{} ({status})",
                kiln_sys::process::stderr_line(&stderr, false).unwrap_or("(no message)")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs_are_local_unicast_and_stable() {
        let a = super::mac_for("0123456789abcdef");
        assert_eq!(a, super::mac_for("0123456789abcdef"));
        assert_ne!(a, super::mac_for("0123456789abcdee"));
        assert!(a.starts_with("02:"), "{a}");
        assert_eq!(a.len(), 17);
    }
}
