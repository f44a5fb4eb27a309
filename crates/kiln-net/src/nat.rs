//! Forwarding and NAT for TAP VMs, in one nftables table of kiln's own (`ip kiln`): kiln never
//! reads or writes a rule outside it.
//!
//! ```text
//! table ip kiln
//!   set uplink      the uplink device while NAT is up, empty while it is down
//!   map from_vm     TAP -> jump from-TAP      map to_vm   TAP -> jump to-TAP
//!   chain forward   (filter hook)  iifname vmap @from_vm; oifname vmap @to_vm;
//!                                  any other kiln TAP: drop
//!   chain postrouting (srcnat)     from a kiln TAP out of @uplink: masquerade
//!   chain from-TAP  source is not the VM's address: drop ("spoofed");
//!                   out of @uplink: accept ("out"); anything else (another VM): drop ("blocked")
//!   chain to-TAP    from @uplink, established/related: accept ("in"); else drop ("blocked")
//! ```
//!
//! A VM's chains exist while it runs; `up` and `down` only fill and empty `@uplink`, so the
//! VMs' counters survive them. VMs never reach each other: one VM's traffic to another is
//! forwarded to no uplink and dropped. Host-to-guest traffic (SSH, published ports) is the
//! host's own and needs no forwarding. Every change is one `nft -f` transaction, and changes
//! are serialised by a lock, so two supervisors never interleave theirs. The table goes away
//! when NAT is down and no VM has chains.

use std::net::Ipv4Addr;
use std::path::Path;

use kiln_sys::lock::FileLock;
use serde::{Deserialize, Serialize};

use crate::{NetError, TAP_PREFIX};

const TABLE: &str = "ip kiln";
/// Serialises kiln's nftables changes (root only, like nftables).
const LOCK: &str = "/run/lock/kiln-nft.lock";

fn nft(script: &str) -> Result<String, NetError> {
    crate::run_tool("nft", "nftables", &["-f", "-"], Some(script))
}

fn locked() -> Result<FileLock, NetError> {
    if !kiln_sys::process::is_root() {
        return Err(NetError::NeedsRoot {
            what: "NAT (nftables)",
            hint: "",
        });
    }
    FileLock::exclusive(Path::new(LOCK))
        .map_err(|e| NetError::io(format!("{LOCK}: cannot lock"), e))
}

/// The table as nftables shows it; `None` when it does not exist.
fn table() -> Result<Option<Table>, NetError> {
    Ok(table_json()?.map(|j| Table::parse(&j)))
}

fn table_json() -> Result<Option<serde_json::Value>, NetError> {
    match crate::run_tool(
        "nft",
        "nftables",
        &["-j", "list", "table", "ip", "kiln"],
        None,
    ) {
        Ok(out) => serde_json::from_str(&out)
            .map(Some)
            .map_err(|e| NetError::Tool {
                tool: "nft",
                detail: format!("unreadable JSON from nft -j: {e}"),
            }),
        Err(NetError::Tool { detail, .. }) if detail.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn base_script() -> String {
    let any = format!("\"{TAP_PREFIX}*\"");
    format!(
        "create table {TABLE} {{ comment \"kiln: forwarding, NAT and isolation of kiln's TAP VMs (kiln net)\"; }}
add set {TABLE} uplink {{ type ifname; }}
add map {TABLE} from_vm {{ type ifname : verdict; }}
add map {TABLE} to_vm {{ type ifname : verdict; }}
add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add rule {TABLE} forward iifname vmap @from_vm
add rule {TABLE} forward oifname vmap @to_vm
add rule {TABLE} forward iifname {any} drop
add rule {TABLE} forward oifname {any} drop
add rule {TABLE} postrouting iifname {any} oifname @uplink masquerade
"
    )
}

/// The table, made first if it does not exist (a `create` that fails atomically if it does).
fn ensure_table() -> Result<Table, NetError> {
    if let Some(t) = table()? {
        return Ok(t);
    }
    nft(&base_script())?;
    Ok(Table::default())
}

fn check_tap(tap: &str) -> Result<(), NetError> {
    if tap.len() > kiln_sys::net::IFNAME_MAX
        || !tap.starts_with(TAP_PREFIX)
        || !tap.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(NetError::invalid("TAP device", tap, "not a kiln TAP name"));
    }
    Ok(())
}

/// Installs `tap`'s chains (replacing any it had): the VM at `guest` reaches the uplink while
/// NAT is up, and nothing else.
pub fn add_vm(tap: &str, guest: Ipv4Addr) -> Result<(), NetError> {
    check_tap(tap)?;
    let _lock = locked()?;
    let mut script = removal_script(&ensure_table()?, tap);
    script.push_str(&format!(
        "add chain {TABLE} from-{tap}
add rule {TABLE} from-{tap} ip saddr != {guest} counter drop comment \"spoofed\"
add rule {TABLE} from-{tap} oifname @uplink counter accept comment \"out\"
add rule {TABLE} from-{tap} counter drop comment \"blocked\"
add chain {TABLE} to-{tap}
add rule {TABLE} to-{tap} iifname @uplink ct state established,related counter accept comment \"in\"
add rule {TABLE} to-{tap} counter drop comment \"blocked\"
add element {TABLE} from_vm {{ \"{tap}\" : jump from-{tap} }}
add element {TABLE} to_vm {{ \"{tap}\" : jump to-{tap} }}
"
    ));
    nft(&script).map(drop)
}

/// Removes `tap`'s chains (nothing when it has none), and the table once NAT is down and no VM
/// has chains.
pub fn remove_vm(tap: &str) -> Result<(), NetError> {
    check_tap(tap)?;
    if !kiln_sys::process::is_root() {
        return Ok(());
    }
    let _lock = locked()?;
    let Some(t) = table()? else {
        return Ok(());
    };
    let mut script = removal_script(&t, tap);
    if t.uplink.is_empty() && !t.has_vm_chains(Some(tap)) {
        script.push_str(&format!("delete table {TABLE}\n"));
    }
    if !script.is_empty() {
        nft(&script)?;
    }
    Ok(())
}

/// The commands that remove `tap`'s map entries and chains, those that exist in `t`.
fn removal_script(t: &Table, tap: &str) -> String {
    let mut s = String::new();
    for (map, chain) in [
        ("from_vm", format!("from-{tap}")),
        ("to_vm", format!("to-{tap}")),
    ] {
        if t.map_keys(map).iter().any(|k| k == tap) {
            s.push_str(&format!("delete element {TABLE} {map} {{ \"{tap}\" }}\n"));
        }
        if t.chains.contains(&chain) {
            s.push_str(&format!(
                "flush chain {TABLE} {chain}\ndelete chain {TABLE} {chain}\n"
            ));
        }
    }
    s
}

/// What `up` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Up {
    /// NAT is now up through this uplink.
    Started,
    /// It already was, through this uplink.
    AlreadyUp,
    /// It was up through another uplink, now through this one.
    Moved { from: String },
}

/// Turns NAT on through `uplink`: IPv4 forwarding on (recorded under `state_dir` when kiln
/// turned it on, so `down` turns it off again), `@uplink` set. Idempotent.
pub fn up(uplink: &str, state_dir: &Path) -> Result<Up, NetError> {
    if uplink.is_empty()
        || uplink.len() > kiln_sys::net::IFNAME_MAX
        || uplink.contains(['"', '/', ' '])
        || !crate::tap::exists(uplink)
    {
        return Err(NetError::invalid(
            "uplink",
            uplink,
            "no such network interface",
        ));
    }
    if uplink.starts_with(TAP_PREFIX) {
        return Err(NetError::invalid(
            "uplink",
            uplink,
            "is a kiln VM's TAP device",
        ));
    }
    let _lock = locked()?;
    let t = ensure_table()?;
    let result = match t.uplink.first() {
        Some(u) if u == uplink => Up::AlreadyUp,
        Some(u) => Up::Moved { from: u.clone() },
        None => Up::Started,
    };
    if !forwarding()? {
        let file = state_dir.join(FORWARDING_NOTE);
        std::fs::create_dir_all(state_dir)
            .map_err(|e| NetError::io(format!("{}: cannot create", state_dir.display()), e))?;
        kiln_sys::temp::write_atomic(&file, b"kiln turned IPv4 forwarding on\n", None, 0o644)
            .map_err(|e| NetError::io(format!("{}: cannot write", file.display()), e))?;
        set_forwarding(true)?;
    }
    if result != Up::AlreadyUp {
        nft(&format!(
            "flush set {TABLE} uplink\nadd element {TABLE} uplink {{ \"{uplink}\" }}\n"
        ))?;
    }
    Ok(result)
}

/// Turns NAT off: `@uplink` emptied (VMs reach nothing beyond the host), forwarding off again
/// if kiln turned it on. Returns false when NAT was not up (nothing done).
pub fn down(state_dir: &Path) -> Result<bool, NetError> {
    let _lock = locked()?;
    let Some(t) = table()? else {
        return Ok(false);
    };
    let was_up = !t.uplink.is_empty();
    let mut script = String::new();
    if was_up {
        script.push_str(&format!("flush set {TABLE} uplink\n"));
    }
    if !t.has_vm_chains(None) {
        script.push_str(&format!("delete table {TABLE}\n"));
    }
    if !script.is_empty() {
        nft(&script)?;
    }
    let note = state_dir.join(FORWARDING_NOTE);
    if note.exists() {
        set_forwarding(false)?;
        let _ = std::fs::remove_file(&note);
    }
    Ok(was_up)
}

/// Written while kiln has IPv4 forwarding on that was off before `up`.
const FORWARDING_NOTE: &str = "forwarding-was-off";

const FORWARD_SYSCTL: &str = "/proc/sys/net/ipv4/ip_forward";

/// Whether the host forwards IPv4.
pub fn forwarding() -> Result<bool, NetError> {
    let v = std::fs::read_to_string(FORWARD_SYSCTL)
        .map_err(|e| NetError::io(format!("{FORWARD_SYSCTL}: cannot read"), e))?;
    Ok(v.trim() == "1")
}

fn set_forwarding(on: bool) -> Result<(), NetError> {
    std::fs::write(FORWARD_SYSCTL, if on { "1\n" } else { "0\n" })
        .map_err(|e| NetError::io(format!("{FORWARD_SYSCTL}: cannot write"), e))
}

/// Counters of one VM's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCounters {
    pub tap: String,
    /// Forwarded from the VM to the uplink.
    pub out_packets: u64,
    pub out_bytes: u64,
    /// Forwarded from the uplink to the VM (replies).
    pub in_packets: u64,
    pub in_bytes: u64,
    /// Dropped: to or from anything but the uplink (another VM), or NAT down.
    pub blocked_packets: u64,
    /// Dropped: a source address that is not the VM's.
    pub spoofed_packets: u64,
}

/// The table's state, as nftables reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    /// The table exists.
    pub table: bool,
    /// NAT is up through `uplink`.
    pub up: bool,
    pub uplink: Option<String>,
    /// The host forwards IPv4.
    pub forwarding: bool,
    pub vms: Vec<VmCounters>,
}

/// Reads the table (no lock: one `nft -j list`).
pub fn status() -> Result<NatStatus, NetError> {
    let forwarding = forwarding()?;
    if !kiln_sys::process::is_root() {
        return Err(NetError::NeedsRoot {
            what: "kiln net status",
            hint: "",
        });
    }
    let Some(t) = table()? else {
        return Ok(NatStatus {
            forwarding,
            ..NatStatus::default()
        });
    };
    Ok(NatStatus {
        table: true,
        up: !t.uplink.is_empty(),
        uplink: t.uplink.first().cloned(),
        forwarding,
        vms: t.counters,
    })
}

/// What kiln reads from `nft -j list table ip kiln`.
#[derive(Default)]
struct Table {
    chains: Vec<String>,
    uplink: Vec<String>,
    maps: Vec<(String, Vec<String>)>,
    counters: Vec<VmCounters>,
}

impl Table {
    fn parse(json: &serde_json::Value) -> Table {
        let mut t = Table::default();
        let Some(items) = json.get("nftables").and_then(|v| v.as_array()) else {
            return t;
        };
        let str_of = |v: &serde_json::Value| v.as_str().map(String::from);
        for item in items {
            if let Some(c) = item.get("chain") {
                if let Some(name) = c.get("name").and_then(str_of) {
                    t.chains.push(name);
                }
            }
            for kind in ["set", "map"] {
                let Some(s) = item.get(kind) else { continue };
                let name = s.get("name").and_then(str_of).unwrap_or_default();
                // A set's elements are strings; a map's are [key, verdict] pairs.
                let keys: Vec<String> = s
                    .get("elem")
                    .and_then(|e| e.as_array())
                    .map(|e| {
                        e.iter()
                            .filter_map(|x| str_of(x).or_else(|| x.get(0).and_then(str_of)))
                            .collect()
                    })
                    .unwrap_or_default();
                if kind == "set" && name == "uplink" {
                    t.uplink = keys;
                } else {
                    t.maps.push((name, keys));
                }
            }
            if let Some(r) = item.get("rule") {
                let chain = r.get("chain").and_then(str_of).unwrap_or_default();
                let comment = r.get("comment").and_then(str_of).unwrap_or_default();
                let counter = r.get("expr").and_then(|e| e.as_array()).and_then(|e| {
                    e.iter().find_map(|x| {
                        let c = x.get("counter")?;
                        Some((c.get("packets")?.as_u64()?, c.get("bytes")?.as_u64()?))
                    })
                });
                let (Some((packets, bytes)), Some((dir, tap))) = (counter, split_vm_chain(&chain))
                else {
                    continue;
                };
                let i = match t.counters.iter().position(|c| c.tap == tap) {
                    Some(i) => i,
                    None => {
                        t.counters.push(VmCounters {
                            tap: tap.to_string(),
                            ..VmCounters::default()
                        });
                        t.counters.len() - 1
                    }
                };
                let c = &mut t.counters[i];
                match (dir, comment.as_str()) {
                    ("from", "out") => (c.out_packets, c.out_bytes) = (packets, bytes),
                    ("to", "in") => (c.in_packets, c.in_bytes) = (packets, bytes),
                    (_, "blocked") => c.blocked_packets += packets,
                    (_, "spoofed") => c.spoofed_packets += packets,
                    _ => {}
                }
            }
        }
        t
    }

    /// Whether a VM other than `except` (a TAP) has chains.
    fn has_vm_chains(&self, except: Option<&str>) -> bool {
        self.chains
            .iter()
            .filter_map(|c| split_vm_chain(c))
            .any(|(_, tap)| Some(tap) != except)
    }

    fn map_keys(&self, name: &str) -> Vec<String> {
        self.maps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.clone())
            .unwrap_or_default()
    }
}

/// `from-kn-...` / `to-kn-...` into the direction and the TAP.
fn split_vm_chain(chain: &str) -> Option<(&str, &str)> {
    let (dir, tap) = chain.split_once('-')?;
    (matches!(dir, "from" | "to") && tap.starts_with(TAP_PREFIX)).then_some((dir, tap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_json() {
        let json: serde_json::Value = serde_json::from_str(r#"{"nftables":[
            {"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"ip","name":"kiln","handle":1}},
            {"chain":{"family":"ip","table":"kiln","name":"forward","handle":1}},
            {"chain":{"family":"ip","table":"kiln","name":"from-kn-ac100002","handle":2}},
            {"set":{"family":"ip","name":"uplink","table":"kiln","type":"ifname","handle":3,"elem":["eth0"]}},
            {"map":{"family":"ip","name":"from_vm","table":"kiln","type":"ifname","map":"verdict","elem":[["kn-ac100002",{"jump":{"target":"from-kn-ac100002"}}]]}},
            {"rule":{"family":"ip","table":"kiln","chain":"from-kn-ac100002","handle":9,"comment":"out","expr":[{"counter":{"packets":3,"bytes":180}},{"accept":null}]}},
            {"rule":{"family":"ip","table":"kiln","chain":"from-kn-ac100002","handle":10,"comment":"blocked","expr":[{"counter":{"packets":2,"bytes":100}},{"drop":null}]}},
            {"rule":{"family":"ip","table":"kiln","chain":"to-kn-ac100002","handle":11,"comment":"in","expr":[{"counter":{"packets":4,"bytes":400}},{"accept":null}]}}
        ]}"#).unwrap();
        let t = Table::parse(&json);
        assert_eq!(t.uplink, vec!["eth0"]);
        assert_eq!(t.map_keys("from_vm"), vec!["kn-ac100002"]);
        assert!(t.chains.contains(&"from-kn-ac100002".to_string()));
        assert_eq!(
            t.counters,
            vec![VmCounters {
                tap: "kn-ac100002".into(),
                out_packets: 3,
                out_bytes: 180,
                in_packets: 4,
                in_bytes: 400,
                blocked_packets: 2,
                spoofed_packets: 0
            }]
        );
    }
}
