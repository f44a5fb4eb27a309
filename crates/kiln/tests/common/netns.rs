//! A small world of network namespaces for the network tests: a "host" namespace where kiln
//! runs and an "internet" namespace joined to it by a veth pair (198.51.100.0/30: the host is
//! .1, the internet router .2), with an HTTP server in "internet" on 203.0.113.80, an address
//! that is not the gateway. Nothing leaves the namespaces the test created.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// True when network tests must fail instead of skipping.
pub fn required() -> bool {
    std::env::var("KILN_REQUIRE_NET").is_ok_and(|v| v == "1")
}

/// The internet server's address.
pub const SERVER: &str = "203.0.113.80";
/// The host's address on the veth (what a masqueraded guest appears as).
pub const HOST_ADDR: &str = "198.51.100.1";
/// The TAP pool the tests use (inside the host namespace only).
pub const POOL: &str = "198.51.100.64/26";

pub struct World {
    pub host: String,
    pub inet: String,
    pub host_if: String,
    /// Peers the HTTP server saw, in order.
    pub seen: Arc<Mutex<Vec<IpAddr>>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    ip(&all);
}

impl World {
    /// The world for test `tag` (≤ 4 characters), or `None` (with a message) without root or
    /// network namespaces, unless KILN_REQUIRE_NET=1.
    pub fn new(tag: &str) -> Option<World> {
        if !kiln_sys::process::is_root() {
            assert!(
                !required(),
                "KILN_REQUIRE_NET=1 but not root: the network tests need root"
            );
            eprintln!("SKIP: the network tests need root (network namespaces, TAP, nftables)");
            return None;
        }
        let probe = Command::new("ip").args(["netns", "list"]).output();
        if !probe.is_ok_and(|o| o.status.success()) {
            assert!(
                !required(),
                "KILN_REQUIRE_NET=1 but `ip netns` does not work"
            );
            eprintln!("SKIP: `ip netns` does not work here");
            return None;
        }
        sweep_dead_worlds();
        let pid = std::process::id();
        let id = format!("{tag}{}", pid % 100000);
        let w = World {
            host: format!("kiln-t-{id}-{pid}-host"),
            inet: format!("kiln-t-{id}-{pid}-inet"),
            host_if: format!("kh{id}"),
            seen: Arc::default(),
        };
        let inet_if = format!("ki{id}");
        for ns in [&w.host, &w.inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
        }
        ip(&[
            "link", "add", &w.host_if, "netns", &w.host, "type", "veth", "peer", "name", &inet_if,
            "netns", &w.inet,
        ]);
        in_ns(&w.host, &["ip", "link", "set", "lo", "up"]);
        in_ns(
            &w.host,
            &[
                "ip",
                "addr",
                "add",
                &format!("{HOST_ADDR}/30"),
                "dev",
                &w.host_if,
            ],
        );
        in_ns(&w.host, &["ip", "link", "set", &w.host_if, "up"]);
        in_ns(
            &w.host,
            &["ip", "route", "add", "default", "via", "198.51.100.2"],
        );
        in_ns(&w.inet, &["ip", "link", "set", "lo", "up"]);
        in_ns(
            &w.inet,
            &["ip", "addr", "add", "198.51.100.2/30", "dev", &inet_if],
        );
        in_ns(
            &w.inet,
            &["ip", "addr", "add", &format!("{SERVER}/32"), "dev", "lo"],
        );
        in_ns(&w.inet, &["ip", "link", "set", &inet_if, "up"]);
        w.serve_http();
        Some(w)
    }

    fn ns_path(ns: &str) -> PathBuf {
        Path::new("/run/netns").join(ns)
    }

    /// The HTTP server in "internet": `GET /` answers `hello from the internet`, `GET /big`
    /// 100 MiB of zeros; every peer is logged.
    fn serve_http(&self) {
        let path = World::ns_path(&self.inet);
        let seen = Arc::clone(&self.seen);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            kiln_sys::net::enter_netns(&path).expect("setns into the internet namespace");
            let l = TcpListener::bind((SERVER, 80)).expect("bind the internet server");
            tx.send(()).unwrap();
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    seen.lock().unwrap().push(peer.ip());
                }
                std::thread::spawn(move || {
                    // The whole request is read before answering: closing a socket with unread
                    // input resets the connection, and the client would lose the answer.
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    let _ = reader.read_line(&mut line);
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header.trim() != ""
                    {
                        header.clear();
                    }
                    if line.starts_with("GET /big") {
                        let _ =
                            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 104857600\r\n\r\n");
                        let chunk = vec![0u8; 1 << 20];
                        for _ in 0..100 {
                            if conn.write_all(&chunk).is_err() {
                                return;
                            }
                        }
                    } else {
                        let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from the internet\n");
                    }
                });
            }
        });
        rx.recv().unwrap();
    }

    /// A TCP listener in the host namespace (bound by a thread that enters it).
    pub fn listen_in_host(&self, addr: &str) -> TcpListener {
        let (path, addr) = (World::ns_path(&self.host), addr.to_string());
        std::thread::spawn(move || {
            kiln_sys::net::enter_netns(&path).expect("setns into the host namespace");
            TcpListener::bind(addr).expect("bind in the host namespace")
        })
        .join()
        .unwrap()
    }

    /// A command run in the host namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host, program]);
        c
    }

    /// `kiln` with `KILN_HOME=home` in the host namespace.
    pub fn kiln(&self, home: &Path, args: &[&str]) -> Output {
        self.command(super::KILN)
            .env("KILN_HOME", home)
            .args(args)
            .output()
            .expect("kiln runs")
    }

    /// [`World::kiln`] of a command that must succeed.
    pub fn kiln_ok(&self, home: &Path, args: &[&str]) -> Output {
        let out = self.kiln(home, args);
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `script` in the guest over `kiln vm ssh`, returning (success, stdout).
    pub fn guest(&self, home: &Path, vm: &str, script: &str) -> (bool, String) {
        let out = self.kiln(home, &["vm", "ssh", vm, "--timeout", "300", "--", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The host namespace's interfaces.
    pub fn host_links(&self) -> String {
        let out = self.command("ip").args(["-br", "link"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nft list ruleset` in the host namespace.
    pub fn ruleset(&self) -> String {
        let out = self
            .command("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends one UDP datagram from the host namespace to `addr` (host:port) and returns the
    /// first answer (empty after 5 s).
    pub fn fetch_udp(&self, addr: &str, send: &str) -> String {
        self.exchange(
            "udp",
            addr,
            send,
            "timeout 5 dd bs=65536 count=1 status=none",
        )
    }

    /// Reads what a TCP client in the host namespace gets from `addr` (host:port), sending
    /// `send` first.
    pub fn fetch(&self, addr: &str, send: &str) -> String {
        self.exchange("tcp", addr, send, "timeout 10 cat")
    }

    /// bash's `/dev/PROTO/HOST/PORT` in the host namespace: `send` (a printf format), then
    /// what `read` prints of the answer.
    fn exchange(&self, proto: &str, addr: &str, send: &str, read: &str) -> String {
        let script = format!(
            "exec 3<>/dev/{proto}/{}; printf '{send}' >&3; {read} <&3",
            addr.replace(':', "/")
        );
        let out = self.command("bash").args(["-c", &script]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Removes the namespaces of test processes that died before their `World` was dropped.
fn sweep_dead_worlds() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("kiln-t-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let Some(pid) = parts.get(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !kiln_sys::process::alive(pid, None) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in [&self.host, &self.inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A guest command that GETs `/` from the internet server (failing after 5 s).
pub fn get_script() -> String {
    format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{SERVER}/80 && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3'")
}
