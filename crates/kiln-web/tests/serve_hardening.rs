//! `kiln serve` is safe on loopback and on a network: DNS rebinding, VM-role spoofing, slow
//! readers, oversized messages, the `/net` relay cap and symlinks that leave a site.
//!
//! Each test runs a real server in a child process (this test binary re-run as the ignored
//! `server_process` test), so its memory (VmRSS) and its passt children can be measured from
//! outside, and talks to it with real HTTP requests and WebSocket clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

const MIB: usize = 1 << 20;

/// The server process the other tests start: `KILN_TEST_SERVE` names the image or site,
/// `KILN_TEST_MAX_RELAYS` and `KILN_TEST_ALLOW_HOST` (comma-separated) set the options.
#[test]
#[ignore = "the server process the other tests start; not a test by itself"]
fn server_process() {
    let Some(src) = std::env::var_os("KILN_TEST_SERVE") else {
        return;
    };
    let mut opts = kiln_web::ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    if let Ok(n) = std::env::var("KILN_TEST_MAX_RELAYS") {
        opts.max_relays = n.parse().unwrap();
    }
    if let Ok(h) = std::env::var("KILN_TEST_ALLOW_HOST") {
        opts.allow_hosts = h.split(',').map(str::to_string).collect();
    }
    let src = kiln_web::ServeSource::from_path(Path::new(&src)).unwrap();
    kiln_web::serve(src, opts, |s| {
        println!("READY {} {}", s.addr, s.console_url);
        let _ = std::io::stdout().flush();
    })
    .unwrap();
}

struct Server {
    child: Child,
    addr: SocketAddr,
    console_url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(source: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "server_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_TEST_SERVE", source)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the server process");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest prints "test server_process ... " before it on the same line.
                if let Some(i) = line.find("READY ") {
                    let _ = tx.send(line[i + 6..].to_string());
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not start: {e}")
            });
        let (addr, console_url) = ready.split_once(' ').unwrap();
        Server {
            child,
            addr: addr.parse().unwrap(),
            console_url: console_url.to_string(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory in bytes.
    fn rss(&self) -> usize {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: usize = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    /// Living passt processes whose parent is the server (Debian's passt execs passt.avx2
    /// where the CPU has AVX2).
    fn passt_children(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some((comm, state, ppid)) = proc_stat(pid) {
                if comm.starts_with("passt") && ppid == self.pid() && state != 'Z' {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn wait_passt(&self, n: usize) -> Vec<u32> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.passt_children();
            if p.len() == n {
                return p;
            }
            assert!(
                Instant::now() < end,
                "expected {n} passt children, have {p:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The page key, as the page gets it: from the served kiln.json.
    fn vm_key(&self) -> String {
        let (status, body) = http_get(self.addr, "/kiln.json", Some(&self.host()));
        assert_eq!(status, 200, "{body}");
        let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ctl = cfg["ctl"].as_str().unwrap();
        let key = ctl.strip_prefix("ctl?key=").unwrap().to_string();
        assert_eq!(cfg["net"].as_str().unwrap(), format!("net?key={key}"));
        key
    }

    fn console_key(&self) -> String {
        self.console_url.split_once("key=").unwrap().1.to_string()
    }

    fn console(&self) -> Ws {
        ws(
            self.addr,
            &format!("/ctl?key={}", self.console_key()),
            None,
            None,
        )
        .expect("console connects")
    }

    fn vm(&self) -> Ws {
        ws(
            self.addr,
            &format!("/ctl?role=vm&key={}", self.vm_key()),
            None,
            None,
        )
        .expect("VM connects")
    }

    /// The server still answers: the page and a fresh console.
    fn assert_alive(&self) {
        let (status, body) = http_get(self.addr, "/", Some(&self.host()));
        assert_eq!(status, 200, "{body}");
        let mut c = self.console();
        let e = next_event(&mut c);
        assert_eq!(e["ev"], "vm", "{e}");
    }
}

/// (comm, state, ppid) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(String, char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let mut rest = s[close + 2..].split(' ');
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, state, _)| state != 'Z')
}

/// A raw HTTP/1.1 GET with the given Host header (None: no Host at all, HTTP/1.0).
fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = match host {
        Some(h) => format!("GET {path} HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"),
        None => format!("GET {path} HTTP/1.0\r\n\r\n"),
    };
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// A WebSocket client with optional Host and Origin headers; Err is the refusal's status and
/// body.
fn ws(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    origin: Option<&str>,
) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(h) = host {
        req.headers_mut().insert("host", h.parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = WebSocketConfig::default()
        .max_message_size(Some(256 * MIB))
        .max_frame_size(Some(256 * MIB));
    match tungstenite::client::client_with_config(req, stream, Some(config)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            let body = r
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("ws://{addr}{path}: {e}"),
    }
}

fn refused(r: Result<Ws, (u16, String)>) -> (u16, String) {
    match r {
        Ok(_) => panic!("connection accepted"),
        Err(e) => e,
    }
}

fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into())).unwrap();
}

/// The next JSON text message (skipping pings).
fn next_event(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read an event") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Read events until one satisfies `f`.
fn wait_event(ws: &mut Ws, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let e = next_event(ws);
        if f(&e) {
            return e;
        }
        assert!(Instant::now() < end, "no matching event; last {e}");
    }
}

/// The connection ends (a close frame or an error) within a few messages.
fn assert_closed(ws: &mut Ws) -> Option<tungstenite::protocol::CloseFrame> {
    for _ in 0..10_000 {
        match ws.read() {
            Ok(Message::Close(c)) => return c,
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    panic!("connection still open");
}

fn image() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    (tmp, img)
}

/// Wait until the server has taken `vm` as the page: a serial marker it sends reaches `con`.
fn registered(vm: &mut Ws, con: &mut Ws) {
    let marker = format!("marker-{:?}", Instant::now());
    send_json(vm, serde_json::json!({"ev": "serial", "data": marker}));
    wait_event(con, |e| e["ev"] == "serial" && e["data"] == marker.as_str());
}

/// The serial backlog a console gets on connect (empty when there is none).
fn backlog(server: &Server) -> String {
    try_backlog(server).expect("a console gets the backlog")
}

fn try_backlog(server: &Server) -> Option<String> {
    let path = format!("/ctl?key={}", server.console_key());
    let mut c = ws(server.addr, &path, None, None).ok()?;
    let read = |c: &mut Ws| -> Option<serde_json::Value> {
        loop {
            match c.read().ok()? {
                Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
                Message::Close(_) => return None,
                _ => {}
            }
        }
    };
    let e = read(&mut c)?;
    assert_eq!(e["ev"], "vm", "{e}");
    // The backlog, if any, comes right after; the reply to a bad command marks its end.
    c.send(Message::Text(r#"{"cmd":"nonsense"}"#.into())).ok()?;
    let e = read(&mut c)?;
    if e["ev"] == "serial" {
        Some(e["data"].as_str()?.to_string())
    } else {
        assert_eq!(e["ev"], "error", "{e}");
        Some(String::new())
    }
}

#[test]
fn dns_rebinding_foreign_host_and_origin_are_refused() {
    let (_tmp, img) = image();
    let s = Server::start(&img, &[("KILN_TEST_ALLOW_HOST", "kiln.test")]);
    let port = s.addr.port();
    let own = s.host();
    // Names we serve.
    for host in [
        own.clone(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "kiln.test".into(),
        "kiln.test:8443".into(),
    ] {
        let (status, body) = http_get(s.addr, "/", Some(&host));
        assert_eq!(status, 200, "Host {host}: {body}");
        assert!(
            body.contains("<html") || body.contains("<!doctype"),
            "{body}"
        );
    }
    // A rebinding page's requests name its own host: refused, the key in kiln.json included.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".into(),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("10.0.0.1:{port}"),
        format!("kiln.test.evil.example:{port}"),
    ] {
        for path in ["/", "/kiln.json", "/index.html"] {
            let (status, body) = http_get(s.addr, path, Some(&host));
            assert_eq!(status, 421, "Host {host} {path}: {body}");
            assert!(!body.contains("key="), "{body}");
            assert_eq!(body.lines().count(), 1, "{body}");
        }
    }
    let (status, body) = http_get(s.addr, "/", None);
    assert_eq!(status, 400, "{body}");

    let ckey = s.console_key();
    let vkey = s.vm_key();
    let evil = format!("evil.example:{port}");
    let evil_origin = format!("http://{evil}");
    for path in [
        format!("/ctl?key={ckey}"),
        format!("/ctl?role=vm&key={vkey}"),
        format!("/net?key={vkey}"),
    ] {
        // DNS rebinding: Host and Origin both the attacker's name.
        let (status, body) = refused(ws(s.addr, &path, Some(&evil), Some(&evil_origin)));
        assert_eq!(status, 421, "{path}: {body}");
        // A page of another origin talking to our real address.
        let (status, body) = refused(ws(s.addr, &path, None, Some(&evil_origin)));
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("cross-origin"), "{body}");
        let other = format!("http://127.0.0.1:{}", port.wrapping_add(1));
        let (status, _) = refused(ws(s.addr, &path, None, Some(&other)));
        assert_eq!(status, 403, "{path} from {other}");
        let (status, _) = refused(ws(s.addr, &path, None, Some("null")));
        assert_eq!(status, 403);
    }
    assert!(
        s.passt_children().is_empty(),
        "a refused /net started passt"
    );
    // The right ones: our own origin (as the page sends it), an allowed name, no Origin.
    let mut c = ws(
        s.addr,
        &format!("/ctl?key={ckey}"),
        None,
        Some(&format!("http://{own}")),
    )
    .expect("same-origin console");
    assert_eq!(next_event(&mut c)["ev"], "vm");
    let mut c = ws(
        s.addr,
        &format!("/ctl?key={ckey}"),
        Some(&format!("localhost:{port}")),
        Some(&format!("http://localhost:{port}")),
    )
    .expect("localhost console");
    assert_eq!(next_event(&mut c)["ev"], "vm");
    let mut c = ws(
        s.addr,
        &format!("/ctl?key={ckey}"),
        Some("kiln.test"),
        Some("https://kiln.test"),
    )
    .expect("console through an allowed name");
    assert_eq!(next_event(&mut c)["ev"], "vm");
    let mut v = ws(
        s.addr,
        &format!("/ctl?role=vm&key={vkey}"),
        None,
        Some(&format!("http://{own}")),
    )
    .expect("same-origin VM");
    send_json(&mut v, serde_json::json!({"ev": "hello", "serial": "hi"}));
    assert_eq!(
        wait_event(&mut c, |e| e["ev"] == "vm")["connected"],
        true,
        "the console sees the VM"
    );
}

#[test]
fn vm_role_and_state_saves_need_the_page_key() {
    let (tmp, img) = image();
    let s = Server::start(&img, &[]);
    let vkey = s.vm_key();
    let ckey = s.console_key();
    assert_ne!(vkey, ckey);
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    let mut wrong = vkey.clone().into_bytes();
    wrong[10] = if wrong[10] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).unwrap();
    for path in [
        "/ctl?role=vm".to_string(),
        "/ctl?role=vm&key=".to_string(),
        format!("/ctl?role=vm&key={wrong}"),
        format!("/ctl?role=vm&key={}", &vkey[..32]),
        format!("/ctl?role=vm&key={ckey}"),
        "/ctl".to_string(),
        format!("/ctl?key={vkey}"),
        format!("/ctl?key={wrong}"),
        "/net".to_string(),
        format!("/net?key={ckey}"),
    ] {
        let (status, body) = refused(ws(s.addr, &path, None, None));
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("key"), "{body}");
        assert_eq!(body.lines().count(), 1, "{body}");
    }
    let mut con = s.console();
    assert_eq!(next_event(&mut con)["connected"], false);

    // The page's key works, and the console sees the VM.
    let mut vm = s.vm();
    assert_eq!(wait_event(&mut con, |e| e["ev"] == "vm")["connected"], true);
    send_json(
        &mut vm,
        serde_json::json!({"ev": "serial", "data": "from the vm\r\n"}),
    );
    let e = wait_event(&mut con, |e| e["ev"] == "serial");
    assert_eq!(e["data"], "from the vm\r\n");
    // Events a page might forge are not passed on as they are.
    send_json(
        &mut vm,
        serde_json::json!({"ev": "saved", "path": "/etc/passwd", "bytes": 1}),
    );

    // A state nobody asked for is ignored, whatever name it carries.
    let state: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    send_json(
        &mut vm,
        serde_json::json!({"ev": "state", "bytes": state.len(), "path": "/tmp/kiln-evil.zst", "name": "../evil.zst"}),
    );
    vm.send(Message::Binary(state.clone().into())).unwrap();
    let e = wait_event(&mut con, |e| e["ev"] == "error" || e["ev"] == "saved");
    assert_eq!(e["ev"], "error", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("nobody asked"),
        "{e}"
    );
    assert_eq!(listing(), before, "an unrequested state was written");
    assert!(!Path::new("/tmp/kiln-evil.zst").exists());

    // A save the console asked for goes where kiln decides.
    send_json(
        &mut con,
        serde_json::json!({"cmd": "save", "path": "/tmp/kiln-evil.zst"}),
    );
    let cmd = next_event(&mut vm);
    assert_eq!(cmd, serde_json::json!({"cmd": "save"}));
    send_json(
        &mut vm,
        serde_json::json!({"ev": "state", "bytes": state.len(), "path": "/tmp/kiln-evil.zst", "name": "../evil.zst"}),
    );
    vm.send(Message::Binary(state.clone().into())).unwrap();
    let e = wait_event(&mut con, |e| e["ev"] == "error" || e["ev"] == "saved");
    assert_eq!(e["ev"], "saved", "{e}");
    let want = tmp.path().join("boot.state.zst");
    assert_eq!(e["path"].as_str().unwrap(), want.to_str().unwrap());
    let saved = zstd::decode_all(std::fs::File::open(&want).unwrap()).unwrap();
    assert!(saved == state, "the saved state is not what the page sent");
    assert_eq!(e["bytes"], std::fs::metadata(&want).unwrap().len());
    let mut after = before.clone();
    after.push("boot.state.zst".into());
    after.sort();
    assert_eq!(listing(), after);
    assert!(!Path::new("/tmp/kiln-evil.zst").exists());
    assert!(!tmp.path().parent().unwrap().join("evil.zst").exists());

    // A second page replaces the first, which is closed.
    let mut vm2 = s.vm();
    // Closed (with the reason, when the close frame wins the race with the reset).
    if let Some(c) = assert_closed(&mut vm) {
        assert!(c.reason.contains("another page"), "{c:?}");
    }
    registered(&mut vm2, &mut con);
    send_json(&mut con, serde_json::json!({"cmd": "pause"}));
    assert_eq!(next_event(&mut vm2), serde_json::json!({"cmd": "pause"}));
}

#[test]
fn a_console_that_never_reads_does_not_grow_the_server() {
    let (_tmp, img) = image();
    let s = Server::start(&img, &[]);
    let mut vm = s.vm();
    // Every console slot taken by consoles that never read; one more is refused.
    let idle: Vec<Ws> = (0..8).map(|_| s.console()).collect();
    let (status, body) = refused(ws(
        s.addr,
        &format!("/ctl?key={}", s.console_key()),
        None,
        None,
    ));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("consoles"), "{body}");
    let chunk = serde_json::json!({"ev": "serial", "data": "x".repeat(MIB)}).to_string();
    // Warm up (buffers, allocator), then measure.
    for _ in 0..4 {
        vm.send(Message::Text(chunk.clone().into())).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = s.rss();
    let t = Instant::now();
    for _ in 0..128 {
        vm.send(Message::Text(chunk.clone().into())).unwrap();
    }
    vm.flush().unwrap();
    send_json(&mut vm, serde_json::json!({"ev": "serial", "data": "END"}));
    // Let the server take it all in: the backlog ends with the marker. (A console connected
    // during the flood that reads slower than the flood comes would be dropped too.)
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if try_backlog(&s).is_some_and(|log| log.ends_with("END")) {
            break;
        }
        assert!(Instant::now() < end, "the server did not take in the flood");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = s.rss();
    eprintln!(
        "128 MiB through 8 idle consoles in {:?}: server RSS {} -> {} MiB",
        t.elapsed(),
        before / MIB,
        after / MIB
    );
    assert!(
        after < before + 64 * MIB,
        "server grew from {} to {} MiB",
        before / MIB,
        after / MIB
    );
    // The idle consoles were dropped (their slots are free again), the backlog stayed capped.
    for mut c in idle {
        assert_closed(&mut c);
    }
    let log = backlog(&s);
    assert_eq!(log.len(), MIB, "backlog is {} bytes", log.len());
    assert!(log.ends_with("END"));
    s.assert_alive();
}

#[test]
fn a_vm_that_never_reads_does_not_grow_the_server() {
    let (_tmp, img) = image();
    let s = Server::start(&img, &[]);
    let vm = s.vm();
    let mut con = s.console();
    assert_eq!(next_event(&mut con)["ev"], "vm");
    let cmd = serde_json::json!({"cmd": "serial", "data": "y".repeat(60 << 10)}).to_string();
    for _ in 0..4 {
        con.send(Message::Text(cmd.clone().into())).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = s.rss();
    let n = (200 * MIB) / (60 << 10);
    for _ in 0..n {
        con.send(Message::Text(cmd.clone().into())).unwrap();
    }
    send_json(&mut con, serde_json::json!({"cmd": "nonsense"}));
    // The console was told its commands were dropped, then got the reply to the last one.
    let mut told = false;
    loop {
        let e = next_event(&mut con);
        let m = e["message"].as_str().unwrap_or("");
        told |= m.contains("not reading its commands");
        if m.contains("unknown command") {
            break;
        }
    }
    assert!(told, "the console was not told that the VM does not read");
    let after = s.rss();
    eprintln!(
        "200 MiB of commands to a VM that never reads: server RSS {} -> {} MiB",
        before / MIB,
        after / MIB
    );
    assert!(
        after < before + 64 * MIB,
        "server grew from {} to {} MiB",
        before / MIB,
        after / MIB
    );
    drop(vm);
    s.assert_alive();
}

#[test]
fn oversized_messages_close_the_connection() {
    let (_tmp, img) = image();
    let s = Server::start(&img, &[]);
    let base = s.rss();

    // A hello bigger than the text limit: closed, and none of it is kept.
    let mut vm = s.vm();
    let hello = serde_json::json!({"ev": "hello", "serial": "h".repeat(15 * MIB)});
    send_json(&mut vm, hello);
    let c = assert_closed(&mut vm);
    assert_eq!(c.map(|c| u16::from(c.code)), Some(1009));
    assert!(backlog(&s).is_empty());

    // A hello within the text limit but over the 1 MiB log cap: only the last 1 MiB is kept.
    let mut con = s.console();
    let mut vm = s.vm();
    let serial = format!("{}{}", "a".repeat(MIB / 2), "b".repeat(MIB));
    send_json(
        &mut vm,
        serde_json::json!({"ev": "hello", "serial": serial}),
    );
    send_json(&mut vm, serde_json::json!({"ev": "serial", "data": "!"}));
    assert_eq!(wait_event(&mut con, |e| e["ev"] == "serial")["data"], "!");
    let log = backlog(&s);
    assert_eq!(log.len(), MIB);
    assert!(
        log.ends_with("bbb!") && !log.contains('a'),
        "the cap kept the wrong part"
    );

    // An 8 MiB event for the consoles: closed, consoles unaffected.
    let pad = serde_json::json!({"ev": "paused", "pad": "p".repeat(8 * MIB)});
    send_json(&mut vm, pad);
    assert_eq!(
        assert_closed(&mut vm).map(|c| u16::from(c.code)),
        Some(1009)
    );

    // A binary message larger than any state the 16 MiB machine can make: closed.
    let mut vm = s.vm();
    registered(&mut vm, &mut con);
    send_json(&mut con, serde_json::json!({"cmd": "save"}));
    let _ = next_event(&mut vm);
    send_json(&mut vm, serde_json::json!({"ev": "state"}));
    let r = vm.send(Message::Binary(vec![7u8; 64 * MIB].into()));
    if r.is_ok() {
        assert_closed(&mut vm);
    }

    // A console message over 64 KiB: closed.
    let mut big = s.console();
    let r = big.send(Message::Text(
        serde_json::json!({"cmd": "serial", "data": "q".repeat(MIB)})
            .to_string()
            .into(),
    ));
    if r.is_ok() {
        assert_closed(&mut big);
    }

    // A /net frame over 64 KiB: closed (and its passt with it).
    let mut net = ws(s.addr, &format!("/net?key={}", s.vm_key()), None, None).unwrap();
    s.wait_passt(1);
    let r = net.send(Message::Binary(vec![0u8; 70_000].into()));
    if r.is_ok() {
        assert_closed(&mut net);
    }
    s.wait_passt(0);

    s.assert_alive();
    let end = s.rss();
    eprintln!("server RSS {} -> {} MiB", base / MIB, end / MIB);
    assert!(
        end < base + 96 * MIB,
        "server grew from {} to {} MiB",
        base / MIB,
        end / MIB
    );
}

#[test]
fn net_relays_are_capped_and_passt_dies_with_its_connection_and_the_server() {
    let (_tmp, img) = image();
    let s = Server::start(&img, &[("KILN_TEST_MAX_RELAYS", "2")]);
    let key = s.vm_key();
    let path = format!("/net?key={key}");
    let mut a = ws(s.addr, &path, None, None).expect("relay 1");
    let b = ws(s.addr, &path, None, None).expect("relay 2");
    let two = s.wait_passt(2);
    let (status, body) = refused(ws(s.addr, &path, None, None));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.contains("2 network relays"), "{body}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.passt_children().len(), 2, "a refused relay started passt");

    // Closing one ends its passt and frees its slot.
    a.close(None).unwrap();
    let _ = assert_closed(&mut a);
    drop(a);
    let one = s.wait_passt(1);
    let c = ws(s.addr, &path, None, None).expect("a relay after one closed");
    let now = s.wait_passt(2);
    assert!(one.iter().all(|p| two.contains(p)));
    // A client that just vanishes (no close frame) frees its slot too.
    drop(b);
    drop(c);
    s.wait_passt(0);
    let _d = ws(s.addr, &path, None, None).expect("relay after all closed");
    let _e = ws(s.addr, &path, None, None).expect("relay after all closed");
    let last = s.wait_passt(2);
    assert!(last.iter().all(|p| !now.contains(p)));

    // The server dies without any cleanup: its passt processes die too.
    let mut s = s;
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while last.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < end, "passt {last:?} outlived the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn symlinks_in_a_site_directory_are_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    let site = tmp.path().join("site");
    kiln_web::prepare(&img, &site, &kiln_web::PrepareOptions::default()).expect("prepare");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), site.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(&outside, site.join("out")).unwrap();
    std::os::unix::fs::symlink("index.html", site.join("inner.html")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", site.join("passwd")).unwrap();
    // Saved states go to state/: a symlink there must not send them outside.
    std::os::unix::fs::symlink(&outside, site.join("state")).unwrap();
    let s = Server::start(&site, &[]);
    let host = s.host();
    let (status, body) = http_get(s.addr, "/index.html", Some(&host));
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(s.addr, "/libv86.js", Some(&host));
    assert_eq!(status, 200);
    assert_eq!(
        body.len() as u64,
        std::fs::metadata(site.join("libv86.js")).unwrap().len()
    );
    for path in [
        "/leak.txt",
        "/out/secret.txt",
        "/inner.html",
        "/passwd",
        "/state/secret.txt",
    ] {
        let (status, body) = http_get(s.addr, path, Some(&host));
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            body.contains("symlink") && !body.contains("SECRET") && !body.contains("root:"),
            "{body}"
        );
    }
    for path in [
        "/../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/nope",
    ] {
        let (status, body) = http_get(s.addr, path, Some(&host));
        assert_eq!(status, 404, "{path}: {body}");
    }
    let mut vm = s.vm();
    let mut con = s.console();
    registered(&mut vm, &mut con);
    send_json(&mut con, serde_json::json!({"cmd": "save"}));
    assert_eq!(next_event(&mut vm)["cmd"], "save");
    send_json(&mut vm, serde_json::json!({"ev": "state"}));
    vm.send(Message::Binary(vec![1u8; 1000].into())).unwrap();
    let e = wait_event(&mut con, |e| e["ev"] == "error" || e["ev"] == "saved");
    assert_eq!(e["ev"], "error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("symlink"), "{e}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "a state was written outside the site"
    );
}
