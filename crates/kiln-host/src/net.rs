//! A Linux VM's network, from request to teardown: the mode asked for becomes a [`NetSpec`]
//! (a lease of the pool for TAP, a free SSH port and passt or slirp for user mode), the
//! supervisor attaches it when the engine starts ([`attach`]: the TAP device, the VM's
//! nftables chains and port relays, or a passt process) and detaches it when the VM ends,
//! whatever ends it; `kiln vm rm` releases the lease. `kiln net up|down|status` are
//! [`Host::net_up`], [`Host::net_down`] and [`Host::net_status`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use kiln_net::passt::{self, layout, PasstOptions};
use kiln_net::{nat, pool, Ipv4Net, PortForward};
use kiln_qemu::NetBackend;
use serde::{Deserialize, Serialize};

use crate::{Host, HostError, VmRecord, VmState};

/// The network a request asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetMode {
    /// No network card.
    #[default]
    None,
    /// TAP when root, else user mode.
    Auto,
    /// User-mode networking: no privileges.
    User,
    /// A TAP device and a /30 of the pool: needs root.
    Tap,
}

/// What a request asks of the network.
#[derive(Clone, Debug, Default)]
pub struct NetRequest {
    pub mode: NetMode,
    /// Published ports (asking for some turns [`NetMode::None`] into `Auto`).
    pub ports: Vec<PortForward>,
    /// The TAP pool (default [`kiln_net::DEFAULT_POOL`]).
    pub pool: Option<Ipv4Net>,
}

/// Which user-mode stack a VM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStack {
    Passt,
    /// QEMU's own, where passt is not installed.
    Slirp,
}

/// A VM's network as its engine attaches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum NetSpec {
    #[default]
    None,
    /// User mode: the guest is 10.0.2.15/24 behind passt (or slirp); its SSH port is published
    /// on 127.0.0.1:`ssh_port` (one of `forwards`).
    User {
        stack: UserStack,
        mac: String,
        ssh_port: u16,
        forwards: Vec<PortForward>,
    },
    /// A TAP device (named after the subnet, [`kiln_net::pool::tap_of`]) and the /30
    /// `subnet`: the host is `.1`, the guest `.2`.
    Tap {
        mac: String,
        subnet: Ipv4Net,
        dns: Vec<IpAddr>,
        forwards: Vec<PortForward>,
    },
}

/// The guest's address as it configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestAddress {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<IpAddr>,
}

impl NetSpec {
    pub fn mode(&self) -> &'static str {
        match self {
            NetSpec::None => "none",
            NetSpec::User { .. } => "user",
            NetSpec::Tap { .. } => "tap",
        }
    }

    /// The guest's address, gateway and resolvers.
    pub fn guest(&self) -> Option<GuestAddress> {
        match self {
            NetSpec::None => None,
            NetSpec::User { .. } => Some(GuestAddress {
                ip: layout::GUEST,
                prefix: layout::PREFIX,
                gateway: layout::GATEWAY,
                dns: vec![IpAddr::V4(layout::DNS)],
            }),
            NetSpec::Tap { subnet, dns, .. } => Some(GuestAddress {
                ip: subnet.host(2),
                prefix: 30,
                gateway: subnet.host(1),
                dns: dns.clone(),
            }),
        }
    }

    /// The VM's TAP device, in TAP mode.
    pub fn tap(&self) -> Option<String> {
        match self {
            NetSpec::Tap { subnet, .. } => Some(pool::tap_of(*subnet)),
            _ => None,
        }
    }

    /// Where the host reaches the guest's sshd.
    pub fn ssh_endpoint(&self) -> Option<SocketAddr> {
        match self {
            NetSpec::None => None,
            NetSpec::User { ssh_port, .. } => {
                Some(SocketAddr::from((Ipv4Addr::LOCALHOST, *ssh_port)))
            }
            NetSpec::Tap { subnet, .. } => Some(SocketAddr::from((subnet.host(2), 22))),
        }
    }

    /// The ports published, the SSH port of user mode included.
    pub fn forwards(&self) -> &[PortForward] {
        match self {
            NetSpec::None => &[],
            NetSpec::User { forwards, .. } | NetSpec::Tap { forwards, .. } => forwards,
        }
    }

    /// The kernel command line that configures the guest (kiln's image hook reads it).
    pub(crate) fn kernel_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let dns = match self.guest() {
            Some(g) => {
                args.push(format!("kiln.ip={}/{},{}", g.ip, g.prefix, g.gateway));
                if let NetSpec::User {
                    stack: UserStack::Passt,
                    ..
                } = self
                {
                    args.push(format!("kiln.mtu={}", layout::MTU));
                }
                g.dns
            }
            None => kiln_net::dns::upstream_nameservers(),
        };
        if !dns.is_empty() {
            let list: Vec<String> = dns.iter().map(IpAddr::to_string).collect();
            args.push(format!("kiln.dns={}", list.join(",")));
        }
        args
    }

    /// The engine's view: `fd`s when kiln opened them, by name for running by hand.
    pub(crate) fn backend(&self, dir: &Path, fd: Option<i32>) -> Option<kiln_qemu::MicrovmNet> {
        let (mac, backend) = match self {
            NetSpec::None => return None,
            NetSpec::User {
                stack: UserStack::Slirp,
                mac,
                forwards,
                ..
            } => (
                mac,
                NetBackend::Slirp {
                    forwards: forwards.clone(),
                },
            ),
            NetSpec::User {
                stack: UserStack::Passt,
                mac,
                ..
            } => (
                mac,
                NetBackend::Passt {
                    fd,
                    socket: dir.join("passt.socket"),
                },
            ),
            NetSpec::Tap { mac, subnet, .. } => (
                mac,
                NetBackend::Tap {
                    ifname: pool::tap_of(*subnet),
                    fd,
                },
            ),
        };
        Some(kiln_qemu::MicrovmNet {
            mac: mac.clone(),
            backend,
        })
    }

    /// Checks a spec read back from vm.json before anything acts on it.
    pub(crate) fn validate(&self) -> Result<(), HostError> {
        let bad = |why: &str| HostError::invalid("net", self.mode(), why);
        let mac_ok = |m: &str| {
            m.len() == 17
                && m.split(':')
                    .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
        };
        if self
            .forwards()
            .iter()
            .any(|f| f.host_port == 0 || f.guest_port == 0)
        {
            return Err(bad("published ports are 1 to 65535"));
        }
        match self {
            NetSpec::None => Ok(()),
            NetSpec::User {
                mac,
                ssh_port,
                forwards,
                ..
            } => {
                if !mac_ok(mac) || *ssh_port == 0 || forwards.len() > MAX_FORWARDS {
                    return Err(bad("a MAC, an SSH port and at most 64 published ports"));
                }
                Ok(())
            }
            NetSpec::Tap {
                mac,
                subnet,
                dns,
                forwards,
            } => {
                if subnet.prefix() != 30 || !mac_ok(mac) {
                    return Err(bad("a /30 and a MAC"));
                }
                if dns.len() > 3 || forwards.len() > MAX_FORWARDS {
                    return Err(bad("at most 3 resolvers and 64 published ports"));
                }
                Ok(())
            }
        }
    }
}

/// Most ports one VM may publish.
pub const MAX_FORWARDS: usize = 64;

/// What `meta.net` of vm.json shows: the network as the guest and the host see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetMeta {
    /// `none`, `user` or `tap`.
    pub mode: String,
    /// User mode: `passt` or `slirp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<UserStack>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// Published ports, the SSH port of user mode included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
    /// Where `kiln vm ssh` connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SocketAddr>,
    /// The passt process while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passt_pid: Option<u32>,
}

impl NetMeta {
    pub(crate) fn of(spec: &NetSpec) -> NetMeta {
        let guest = spec.guest();
        NetMeta {
            mode: spec.mode().into(),
            stack: match spec {
                NetSpec::User { stack, .. } => Some(*stack),
                _ => None,
            },
            tap: spec.tap(),
            mac: match spec {
                NetSpec::User { mac, .. } | NetSpec::Tap { mac, .. } => Some(mac.clone()),
                NetSpec::None => None,
            },
            guest_ip: guest.as_ref().map(|g| g.ip),
            prefix: guest.as_ref().map(|g| g.prefix),
            gateway: guest.as_ref().map(|g| g.gateway),
            dns: guest.map(|g| g.dns).unwrap_or_default(),
            ports: spec.forwards().to_vec(),
            ssh: spec.ssh_endpoint(),
            passt_pid: None,
        }
    }
}

/// Turns a request's network into a spec for the VM `name` (leasing a /30 in TAP mode).
/// Ports that are taken are an error here, before anything starts.
pub(crate) fn resolve(host: &Host, name: &str, req: &NetRequest) -> Result<NetSpec, HostError> {
    let mode = match (req.mode, req.ports.is_empty()) {
        (NetMode::None, true) => return Ok(NetSpec::None),
        (NetMode::None | NetMode::Auto, _) if kiln_sys::process::is_root() => NetMode::Tap,
        (NetMode::None | NetMode::Auto, _) => NetMode::User,
        (m, _) => m,
    };
    if req.ports.len() > MAX_FORWARDS {
        return Err(HostError::invalid(
            "ports",
            req.ports.len(),
            "at most 64 published ports",
        ));
    }
    let mac = kiln_net::mac_for(&crate::host::random_id());
    match mode {
        NetMode::Tap => {
            if !kiln_sys::process::is_root() {
                return Err(kiln_net::NetError::NeedsRoot {
                    what: "--net tap",
                    hint: ", or use --net user",
                }
                .into());
            }
            kiln_net::ports::check_free(&req.ports)?;
            let pool: Ipv4Net = match req.pool {
                Some(p) => p,
                None => kiln_net::DEFAULT_POOL
                    .parse()
                    .map_err(|e: String| HostError::invalid("pool", kiln_net::DEFAULT_POOL, e))?,
            };
            let vms = host.vms_dir();
            let lease = pool::lease(&host.net_dir(), pool, name, &|vm| vms.join(vm).exists())?;
            Ok(NetSpec::Tap {
                mac,
                subnet: lease.subnet,
                dns: kiln_net::dns::upstream_nameservers(),
                forwards: req.ports.clone(),
            })
        }
        _ => {
            let ssh_port = free_port()?;
            let mut forwards = vec![PortForward {
                protocol: kiln_net::Protocol::Tcp,
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: ssh_port,
                guest_port: 22,
            }];
            forwards.extend(req.ports.iter().copied());
            kiln_net::ports::check_free(&forwards)?;
            let stack = if passt::find().is_some() {
                UserStack::Passt
            } else {
                tracing::warn!("passt is not installed (apt-get install passt): using QEMU's slirp for user-mode networking");
                UserStack::Slirp
            };
            Ok(NetSpec::User {
                stack,
                mac,
                ssh_port,
                forwards,
            })
        }
    }
}

/// A free TCP port on 127.0.0.1 (the kernel picks it).
fn free_port() -> Result<u16, HostError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HostError::io("cannot find a free port on 127.0.0.1", e))
}

/// A VM's network while it runs: dropping it detaches it (passt killed, relays closed, the
/// VM's nftables chains removed; the TAP device goes with QEMU's descriptor).
#[derive(Default)]
pub(crate) struct Attached {
    tap: Option<kiln_net::tap::Tap>,
    tap_name: Option<String>,
    /// QEMU's end of passt's socket pair, until QEMU has it.
    peer: Option<std::os::unix::net::UnixStream>,
    passt: Option<Child>,
    proxy: Option<kiln_net::proxy::Proxy>,
}

impl Attached {
    /// The descriptor QEMU inherits, if any.
    pub(crate) fn fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.tap
            .as_ref()
            .map(|t| t.raw_fd())
            .or_else(|| self.peer.as_ref().map(|p| p.as_raw_fd()))
    }

    /// QEMU runs with its copies of the descriptors: close kiln's, and check passt is alive.
    pub(crate) fn started(&mut self, log: &Path) -> Result<(), HostError> {
        self.tap = None;
        self.peer = None;
        if let Some(p) = self.passt.as_mut() {
            if let Ok(Some(status)) = p.try_wait() {
                return Err(HostError::Tool {
                    tool: "passt".into(),
                    detail: format!("exited at start ({status}); see {}", log.display()),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn passt_pid(&self) -> Option<u32> {
        self.passt.as_ref().map(Child::id)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut p) = self.passt.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.proxy = None;
        if let Some(tap) = &self.tap_name {
            if let Err(e) = nat::remove_vm(tap) {
                tracing::warn!("{tap}: cannot remove its rules: {e}");
            }
        }
    }
}

/// Attaches `spec`'s network as its engine starts (engine.log gets passt's messages).
pub(crate) fn attach(net: &NetSpec, log: &Path) -> Result<Attached, HostError> {
    let mut a = Attached::default();
    match net {
        NetSpec::None
        | NetSpec::User {
            stack: UserStack::Slirp,
            ..
        } => {}
        NetSpec::User {
            stack: UserStack::Passt,
            forwards,
            ..
        } => {
            let binary = passt::find().ok_or(kiln_net::NetError::MissingTool {
                tool: "passt",
                package: "passt",
            })?;
            let socket = passt::socket_pair()?;
            let mut cmd = passt::command(
                &binary,
                &socket,
                &PasstOptions {
                    forwards: forwards.clone(),
                    guest_layout: true,
                },
            );
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| HostError::io(format!("{}: cannot open", log.display()), e))?;
            cmd.stderr(Stdio::from(log_file));
            let child = cmd
                .spawn()
                .map_err(|e| HostError::io(format!("cannot start {}", binary.display()), e))?;
            a.passt = Some(child);
            a.peer = Some(socket.peer);
        }
        NetSpec::Tap {
            subnet, forwards, ..
        } => {
            // The relays bind first: a port taken since the request fails the start.
            let proxy = kiln_net::proxy::Proxy::bind(forwards)?;
            let device = kiln_net::tap::Tap::create(*subnet)?;
            let guest = subnet.host(2);
            a.tap_name = Some(device.name().to_string());
            nat::add_vm(device.name(), guest)?;
            proxy.start(guest)?;
            a.tap = Some(device);
            a.proxy = Some(proxy);
        }
    }
    Ok(a)
}

/// Removes what a VM whose supervisor is gone left of its network (its chains).
pub(crate) fn tidy(net: &NetSpec) {
    if let Some(tap) = net.tap() {
        if kiln_sys::process::is_root() && !kiln_net::tap::exists(&tap) {
            let _ = nat::remove_vm(&tap);
        }
    }
}

/// `kiln net status`: NAT and every TAP VM of this home.
#[derive(Clone, Debug, Serialize)]
pub struct NetStatus {
    #[serde(flatten)]
    pub nat: nat::NatStatus,
    pub pool_leases: Vec<VmNet>,
}

/// One VM of `kiln net status`.
#[derive(Clone, Debug, Serialize)]
pub struct VmNet {
    pub name: String,
    pub state: String,
    pub tap: String,
    pub tap_present: bool,
    pub guest_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub counters: Option<nat::VmCounters>,
}

impl Host {
    /// `$KILN_HOME/net`: leases and NAT state.
    pub(crate) fn net_dir(&self) -> PathBuf {
        self.home().join("net")
    }

    /// `kiln net up`: NAT for every TAP VM through `uplink` (default: the default route's
    /// device).
    pub fn net_up(&self, uplink: Option<&str>) -> Result<(String, nat::Up), HostError> {
        let uplink = match uplink {
            Some(u) => u.to_string(),
            None => pool::default_route_dev()?.ok_or_else(|| {
                HostError::invalid(
                    "uplink",
                    "(default route)",
                    "the host has no default route; name the uplink device",
                )
            })?,
        };
        let up = nat::up(&uplink, &self.net_dir())?;
        Ok((uplink, up))
    }

    /// `kiln net down`: false when NAT was not up.
    pub fn net_down(&self) -> Result<bool, HostError> {
        Ok(nat::down(&self.net_dir())?)
    }

    /// `kiln net status`.
    pub fn net_status(&self) -> Result<NetStatus, HostError> {
        let nat = nat::status()?;
        let mut vms = Vec::new();
        for lease in pool::leases(&self.net_dir())? {
            let state = match self.get(&lease.vm) {
                Ok(rec) => rec.effective_state(),
                Err(_) => VmState::Stopped,
            };
            let tap = lease.tap();
            vms.push(VmNet {
                name: lease.vm.clone(),
                state: state.name().into(),
                tap_present: kiln_net::tap::exists(&tap),
                counters: nat.vms.iter().find(|c| c.tap == tap).cloned(),
                guest_ip: lease.guest_ip(),
                host_ip: lease.host_ip(),
                tap,
            });
        }
        Ok(NetStatus {
            nat,
            pool_leases: vms,
        })
    }
}

/// Releases what a removed VM held of the network (its lease).
pub(crate) fn release(host: &Host, rec: Option<&VmRecord>, name: &str) -> Result<(), HostError> {
    if let Some(rec) = rec {
        tidy(&rec.config.net);
    }
    Ok(pool::release(&host.net_dir(), name)?)
}

/// `meta.net` as written now, or as kiln wrote it before (`"none"`, `"user"`).
pub(crate) fn net_meta_compat<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NetMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Mode(String),
        Meta(Box<NetMeta>),
    }
    Ok(match Either::deserialize(d)? {
        Either::Mode(mode) => NetMeta {
            mode,
            ..NetMeta::default()
        },
        Either::Meta(m) => *m,
    })
}
