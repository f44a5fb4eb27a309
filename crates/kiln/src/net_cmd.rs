//! `kiln net up|down|status`: NAT for TAP VMs (a thin shell over `kiln_host::Host::net_*`).

use std::process::ExitCode;

/// Networking of TAP VMs (root): forwarding and NAT in kiln's own nftables table.
#[derive(clap::Subcommand)]
pub enum NetCommand {
    /// Turn on IPv4 forwarding and NAT for every TAP VM, now and started later (idempotent).
    Up {
        /// The uplink device (default: the default route's).
        #[arg(long, value_name = "DEV")]
        uplink: Option<String>,
    },
    /// Remove NAT (VMs keep SSH from the host, reach nothing beyond it); forwarding goes back
    /// off if `up` turned it on. Nothing up is a no-op.
    Down,
    /// Forwarding, NAT and each TAP VM's device, address and rule counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn dispatch(cmd: NetCommand) -> anyhow::Result<ExitCode> {
    let host = crate::host()?;
    match cmd {
        NetCommand::Up { uplink } => {
            let (uplink, up) = host.net_up(uplink.as_deref())?;
            let what = match up {
                kiln_net::nat::Up::Started => format!("NAT up through {uplink}"),
                kiln_net::nat::Up::AlreadyUp => format!("NAT already up through {uplink}"),
                kiln_net::nat::Up::Moved { from } => format!("NAT moved from {from} to {uplink}"),
            };
            crate::out(format_args!("{what}"));
        }
        NetCommand::Down => {
            if host.net_down()? {
                crate::out(format_args!("NAT down"));
            } else {
                crate::out(format_args!("NAT was not up; nothing to do"));
            }
        }
        NetCommand::Status { json } => {
            let s = host.net_status()?;
            if json {
                crate::out(format_args!("{}", serde_json::to_string_pretty(&s)?));
                return Ok(ExitCode::SUCCESS);
            }
            crate::out(format_args!(
                "forwarding: {}   NAT: {}",
                if s.nat.forwarding { "on" } else { "off" },
                match &s.nat.uplink {
                    Some(u) if s.nat.up => format!("up through {u}"),
                    _ => "down".into(),
                }
            ));
            crate::out(format_args!(
                "{:<24} {:<8} {:<12} {:<16} {:>10} {:>12} {:>10} {:>12} {:>8}",
                "NAME",
                "STATE",
                "TAP",
                "GUEST",
                "OUT PKTS",
                "OUT BYTES",
                "IN PKTS",
                "IN BYTES",
                "BLOCKED"
            ));
            for vm in &s.pool_leases {
                let c = vm.counters.clone().unwrap_or_default();
                crate::out(format_args!(
                    "{:<24} {:<8} {:<12} {:<16} {:>10} {:>12} {:>10} {:>12} {:>8}",
                    vm.name,
                    vm.state,
                    if vm.tap_present { vm.tap.as_str() } else { "-" },
                    vm.guest_ip,
                    c.out_packets,
                    c.out_bytes,
                    c.in_packets,
                    c.in_bytes,
                    c.blocked_packets + c.spoofed_packets
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
