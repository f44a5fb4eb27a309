//! A VM's TAP device: created by its supervisor, configured with the host's side of the
//! VM's /30, handed to QEMU as a descriptor. It is not persistent, so it disappears with the
//! last descriptor: when QEMU ends, however it ends.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::{Ipv4Net, NetError};

/// An open TAP device.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP device of the VM on the /30 `subnet`, gives it the host's address (`.1`)
    /// and brings it up.
    pub fn create(subnet: Ipv4Net) -> Result<Tap, NetError> {
        if !kiln_sys::process::is_root() {
            return Err(NetError::NeedsRoot {
                what: "--net tap",
                hint: ", or use --net user",
            });
        }
        let name = crate::pool::tap_of(subnet);
        let fd = kiln_sys::net::create_tap(&name)
            .map_err(|e| NetError::io(format!("{name}: cannot create the TAP device"), e))?;
        let addr = format!("{}/30", subnet.host(1));
        crate::run_tool(
            "ip",
            "iproute2",
            &["addr", "add", &addr, "dev", &name],
            None,
        )?;
        crate::run_tool("ip", "iproute2", &["link", "set", &name, "up"], None)?;
        Ok(Tap { fd, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor QEMU inherits.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// True when an interface named `name` exists in the calling thread's network namespace.
pub fn exists(name: &str) -> bool {
    interfaces().iter().any(|i| i == name)
}

/// The network interfaces of the calling thread's network namespace.
pub fn interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}
