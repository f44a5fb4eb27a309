//! The pool of /30 networks TAP VMs get theirs from, one lease file per VM under
//! `$KILN_HOME/net/leases/`, taken under a lock so that parallel `kiln vm run`s never collide.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use kiln_sys::lock::FileLock;
use serde::{Deserialize, Serialize};

use crate::{Ipv4Net, NetError, TAP_PREFIX};

/// The default pool: 16,384 VMs' worth of /30s.
pub const DEFAULT_POOL: &str = "172.16.0.0/16";

/// One VM's network: a /30, the host's side `.1`, the guest `.2`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub vm: String,
}

impl Lease {
    /// The host side of the link, the guest's gateway.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.subnet.host(1)
    }

    pub fn guest_ip(&self) -> Ipv4Addr {
        self.subnet.host(2)
    }

    /// The TAP device's name (see [`tap_of`]).
    pub fn tap(&self) -> String {
        tap_of(self.subnet)
    }
}

/// The TAP device of the VM on the /30 `subnet`: kiln's prefix and the guest address (`.2`) in
/// hex (`kn-ac100002`), 11 characters whatever the VM's name (Linux takes 15).
pub fn tap_of(subnet: Ipv4Net) -> String {
    format!("{TAP_PREFIX}{:08x}", u32::from(subnet.host(2)))
}

/// The lease directory of a kiln home.
fn leases_dir(home: &Path) -> PathBuf {
    home.join("net").join("leases")
}

/// Leases `vm` a /30 of `pool` (its existing lease if it has one). A /30 is free when no lease
/// holds it and no route of the host overlaps it (another kiln home's TAP, anything else).
/// The pool itself must not overlap a route of the host other than kiln's own TAPs. Leases of
/// VMs for which `exists` answers false are stale and reclaimed.
pub fn lease(
    home: &Path,
    pool: Ipv4Net,
    vm: &str,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Lease, NetError> {
    if pool.prefix() > 30 {
        return Err(NetError::invalid(
            "pool",
            pool,
            "holds no /30 (use a prefix of 30 or less)",
        ));
    }
    let routes = host_routes()?;
    if let Some(r) = routes
        .iter()
        .find(|r| r.net.prefix() > 0 && !r.dev.starts_with(TAP_PREFIX) && r.net.overlaps(pool))
    {
        return Err(NetError::PoolOverlaps {
            pool,
            route: r.net,
            dev: r.dev.clone(),
        });
    }
    let dir = leases_dir(home);
    fs::create_dir_all(&dir)
        .map_err(|e| NetError::io(format!("{}: cannot create", dir.display()), e))?;
    let lock_path = dir.join(".lock");
    let _lock = FileLock::exclusive(&lock_path)
        .map_err(|e| NetError::io(format!("{}: cannot lock", lock_path.display()), e))?;
    let mut held = Vec::new();
    for l in read_leases(&dir)? {
        if l.vm == vm {
            return Ok(l);
        }
        if exists(&l.vm) {
            held.push(l.subnet);
        } else {
            tracing::info!("net: reclaiming {} of removed VM {}", l.subnet, l.vm);
            let _ = fs::remove_file(lease_file(&dir, l.subnet));
        }
    }
    // Bounded by the pool's size (at most 2^28 /30s for a /2), and in practice by the first
    // free one: leases and routes are few.
    for n in 0..pool.subnets(30) {
        let Some(subnet) = pool.subnet(30, n) else {
            break;
        };
        if held.contains(&subnet)
            || routes
                .iter()
                .any(|r| r.net.prefix() > 0 && r.net.overlaps(subnet))
        {
            continue;
        }
        let lease = Lease {
            subnet,
            vm: vm.to_string(),
        };
        let path = lease_file(&dir, subnet);
        kiln_sys::temp::write_atomic(&path, format!("{vm}\n").as_bytes(), None, 0o644)
            .map_err(|e| NetError::io(format!("{}: cannot write", path.display()), e))?;
        return Ok(lease);
    }
    Err(NetError::PoolExhausted { pool })
}

/// Releases `vm`'s lease, if it has one.
pub fn release(home: &Path, vm: &str) -> Result<(), NetError> {
    let dir = leases_dir(home);
    if !dir.exists() {
        return Ok(());
    }
    let lock_path = dir.join(".lock");
    let _lock = FileLock::exclusive(&lock_path)
        .map_err(|e| NetError::io(format!("{}: cannot lock", lock_path.display()), e))?;
    for l in read_leases(&dir)?.into_iter().filter(|l| l.vm == vm) {
        let path = lease_file(&dir, l.subnet);
        fs::remove_file(&path)
            .map_err(|e| NetError::io(format!("{}: cannot remove", path.display()), e))?;
    }
    Ok(())
}

/// Every lease of a kiln home.
pub fn leases(home: &Path) -> Result<Vec<Lease>, NetError> {
    let dir = leases_dir(home);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    read_leases(&dir)
}

fn lease_file(dir: &Path, subnet: Ipv4Net) -> PathBuf {
    dir.join(subnet.addr().to_string())
}

/// The lease files: named by the /30's address, holding the VM's name. Anything else in the
/// directory (temporaries, garbage) is skipped.
fn read_leases(dir: &Path) -> Result<Vec<Lease>, NetError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir)
        .map_err(|e| NetError::io(format!("{}: cannot read", dir.display()), e))?;
    for entry in entries.take(1 << 20) {
        let entry =
            entry.map_err(|e| NetError::io(format!("{}: cannot read", dir.display()), e))?;
        let name = entry.file_name();
        let Some(subnet) = name
            .to_str()
            .and_then(|n| n.parse::<Ipv4Addr>().ok())
            .and_then(|a| Ipv4Net::new(a, 30))
        else {
            continue;
        };
        let Ok(text) = read_small(&entry.path()) else {
            continue;
        };
        let vm = text.trim().to_string();
        if vm.is_empty()
            || vm.len() > 64
            || !vm.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            continue;
        }
        out.push(Lease { subnet, vm });
    }
    out.sort_by_key(|l| l.subnet);
    Ok(out)
}

fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    fs::File::open(path)?.take(256).read_to_string(&mut s)?;
    Ok(s)
}

/// An IPv4 route of the host's main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub net: Ipv4Net,
    pub dev: String,
    pub gateway: Option<Ipv4Addr>,
}

/// The host's IPv4 routes (the main table of the calling thread's network namespace).
pub fn host_routes() -> Result<Vec<Route>, NetError> {
    let path = "/proc/thread-self/net/route";
    let text =
        fs::read_to_string(path).map_err(|e| NetError::io(format!("{path}: cannot read"), e))?;
    Ok(parse_routes(&text))
}

/// The device of the default route, if there is one.
pub fn default_route_dev() -> Result<Option<String>, NetError> {
    Ok(host_routes()?
        .into_iter()
        .find(|r| r.net.prefix() == 0)
        .map(|r| r.dev))
}

fn parse_routes(text: &str) -> Vec<Route> {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in hex, in the
    // kernel's (little-endian) byte order.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.swap_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw, mask) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(7)?)?);
            let prefix = u32::from(mask).leading_ones() as u8;
            Some(Route {
                net: Ipv4Net::new(dest, prefix)?,
                dev: f[0].to_string(),
                gateway: (!gw.is_unspecified()).then_some(gw),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0164A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0064A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
kn-ac100002\t000010AC\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";

    #[test]
    fn routes_parse() {
        let r = parse_routes(ROUTES);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].net.to_string(), "0.0.0.0/0");
        assert_eq!(r[0].gateway, Some(Ipv4Addr::new(192, 168, 100, 1)));
        assert_eq!(r[1].net.to_string(), "192.168.100.0/24");
        assert_eq!(r[2].net.to_string(), "172.16.0.0/30");
        assert_eq!(r[2].dev, "kn-ac100002");
    }

    #[test]
    fn leases_are_unique_kept_and_released() {
        let home = tempfile::tempdir().unwrap();
        // A pool that overlaps no route here (documentation range).
        let pool: Ipv4Net = "198.18.0.0/29".parse().unwrap();
        let all = |_: &str| true;
        let a = lease(home.path(), pool, "a", &all).unwrap();
        let b = lease(home.path(), pool, "b", &all).unwrap();
        assert_eq!(a.subnet.to_string(), "198.18.0.0/30");
        assert_eq!(b.subnet.to_string(), "198.18.0.4/30");
        assert_eq!(
            (a.host_ip().to_string(), a.guest_ip().to_string()),
            ("198.18.0.1".into(), "198.18.0.2".into())
        );
        assert_eq!(a.tap(), "kn-c6120002");
        assert_eq!(
            lease(home.path(), pool, "a", &all).unwrap(),
            a,
            "a VM keeps its lease"
        );
        let e = lease(home.path(), pool, "c", &all).unwrap_err();
        assert!(matches!(e, NetError::PoolExhausted { .. }), "{e}");
        // A lease of a VM that no longer exists is reclaimed.
        let c = lease(home.path(), pool, "c", &|n| n != "a").unwrap();
        assert_eq!(c.subnet, a.subnet);
        release(home.path(), "c").unwrap();
        release(home.path(), "c").unwrap();
        assert_eq!(leases(home.path()).unwrap(), vec![b]);
    }
}
