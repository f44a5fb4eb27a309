//! `kiln serve`: the site over HTTP, a `/ctl` debug console and a `/net` network relay.
//!
//! `/ctl` protocol (JSON text messages). The page connects with `?role=vm` and drives its VM;
//! any other client is a console:
//! - console → server: `{"cmd":"serial","data":"hello\r"}`, `{"cmd":"pause"}`,
//!   `{"cmd":"resume"}`, `{"cmd":"save"}`, `{"cmd":"reset"}`;
//! - server → console: `{"ev":"serial","data":"..."}` (all serial output so far on connect, then
//!   as it comes), `{"ev":"vm","connected":bool}`, `{"ev":"saved","path":"...","bytes":N}`,
//!   `{"ev":"paused"}`, `{"ev":"resumed"}`, `{"ev":"reset"}`, `{"ev":"error","message":"..."}`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};

use crate::{build_site, PrepareOptions, Result, Site, WebError};

/// Serial output kept for consoles that connect late.
const LOG_MAX: usize = 1 << 20;

/// What to serve.
#[derive(Clone, Debug)]
pub enum ServeSource {
    /// A disk image: prepared in memory; saved states go beside it.
    Image(PathBuf),
    /// A directory written by `kiln prepare`; saved states go into its `state/` directory.
    Site(PathBuf),
}

impl ServeSource {
    /// A directory is a site (it must hold kiln.json), anything else an image.
    pub fn from_path(path: &Path) -> Result<ServeSource> {
        if path.is_dir() {
            if path.join("kiln.json").is_file() {
                Ok(ServeSource::Site(path.to_path_buf()))
            } else {
                Err(WebError::NotASite {
                    path: path.to_path_buf(),
                })
            }
        } else {
            Ok(ServeSource::Image(path.to_path_buf()))
        }
    }
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Listen address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Allow a non-loopback address.
    pub public: bool,
    /// Used when preparing an image in memory.
    pub prepare: PrepareOptions,
    /// The passt binary for `/net` (default: `passt` on PATH).
    pub passt: PathBuf,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8086)),
            public: false,
            prepare: PrepareOptions::default(),
            passt: PathBuf::from("passt"),
        }
    }
}

enum Files {
    Memory(Site),
    Dir(PathBuf),
}

struct App {
    files: Files,
    /// Where `/ctl` save writes the state.
    save_path: PathBuf,
    passt: PathBuf,
    hub: Hub,
}

struct Hub {
    vm: Mutex<Option<(u64, mpsc::UnboundedSender<Message>)>>,
    events: broadcast::Sender<String>,
    /// Serial output so far; its lock also orders backlog vs. live events for new consoles.
    log: Mutex<String>,
    next_id: AtomicU64,
}

/// Serve `source` until Ctrl-C (or SIGTERM). `on_ready` gets the bound address once listening.
pub fn serve(
    source: ServeSource,
    opts: ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let addr_s = opts.addr.to_string();
    if !opts.addr.ip().is_loopback() && !opts.public {
        return Err(WebError::Listen {
            addr: addr_s,
            msg: "not a loopback address; other machines are served only when `public` is set"
                .into(),
        });
    }
    let (files, save_path) = match &source {
        ServeSource::Image(p) => {
            let site = build_site(p, &opts.prepare)?;
            let stem = p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("disk")
                .to_string();
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (Files::Memory(site), dir.join(format!("{stem}.state.zst")))
        }
        ServeSource::Site(d) => (Files::Dir(d.clone()), d.join("state/saved.bin.zst")),
    };
    let listener = TcpListener::bind(opts.addr).map_err(|e| WebError::Listen {
        addr: addr_s.clone(),
        msg: if e.kind() == std::io::ErrorKind::AddrInUse {
            "address already in use (is another server running on that port?)".into()
        } else {
            e.to_string()
        },
    })?;
    let bound = listener.local_addr().map_err(|e| WebError::Listen {
        addr: addr_s.clone(),
        msg: e.to_string(),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| WebError::Listen {
            addr: addr_s.clone(),
            msg: e.to_string(),
        })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WebError::Listen {
            addr: addr_s.clone(),
            msg: format!("tokio runtime: {e}"),
        })?;
    let app = Arc::new(App {
        files,
        save_path,
        passt: opts.passt,
        hub: Hub {
            vm: Mutex::new(None),
            events: broadcast::channel(1024).0,
            log: Mutex::new(String::new()),
            next_id: AtomicU64::new(1),
        },
    });
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|e| WebError::Listen {
                addr: addr_s.clone(),
                msg: e.to_string(),
            })?;
        let router = Router::new()
            .route("/ctl", get(ctl))
            .route("/net", get(net))
            .fallback(get(file))
            .with_state(app);
        on_ready(bound);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| WebError::Listen {
                addr: addr_s,
                msg: e.to_string(),
            })
    })
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

async fn file(State(app): State<Arc<App>>, uri: Uri) -> Response {
    let mut path = uri.path().trim_start_matches('/').to_string();
    if path.is_empty() || path.ends_with('/') {
        path.push_str("index.html");
    }
    if path
        .split('/')
        .any(|s| s == ".." || s.is_empty() || s.starts_with('.'))
    {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    let content: Option<Bytes> = match &app.files {
        Files::Memory(site) => site.get(&path).cloned(),
        Files::Dir(dir) => tokio::fs::read(dir.join(&path)).await.ok().map(Bytes::from),
    };
    let Some(mut content) = content else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    if path == "kiln.json" {
        // Served by kiln serve: tell the page where the console and the relay are.
        if let Ok(mut cfg) = serde_json::from_slice::<serde_json::Value>(&content) {
            cfg["ctl"] = "ctl".into();
            cfg["net"] = "net".into();
            content = Bytes::from(cfg.to_string());
        }
    }
    (
        [
            (header::CONTENT_TYPE, content_type(&path)),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        content,
    )
        .into_response()
}

/// Browsers always send Origin on WebSocket requests: it must name the host we are served as,
/// so other sites cannot drive the VM. Non-browser clients send none.
fn origin_ok(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(|h| h.to_str()),
    ) else {
        return false;
    };
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    rest.is_some_and(|r| r.eq_ignore_ascii_case(host))
}

#[derive(serde::Deserialize)]
struct CtlQuery {
    role: Option<String>,
}

async fn ctl(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<CtlQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_ok(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin WebSocket refused\n").into_response();
    }
    let vm = q.role.as_deref() == Some("vm");
    ws.on_upgrade(move |s| async move {
        if vm {
            vm_conn(s, app).await
        } else {
            console_conn(s, app).await
        }
    })
}

async fn net(State(app): State<Arc<App>>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    if !origin_ok(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin WebSocket refused\n").into_response();
    }
    let passt = app.passt.clone();
    ws.on_upgrade(move |s| crate::net::relay(s, passt))
}

fn event(v: serde_json::Value) -> String {
    v.to_string()
}

impl Hub {
    fn broadcast(&self, s: String) {
        let _ = self.events.send(s);
    }

    fn append_serial(&self, data: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.push_str(data);
        if log.len() > LOG_MAX {
            let mut cut = log.len() - LOG_MAX;
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            log.drain(..cut);
        }
        self.broadcast(event(serde_json::json!({"ev": "serial", "data": data})));
    }
}

async fn vm_conn(ws: WebSocket, app: Arc<App>) {
    let hub = &app.hub;
    let (mut tx, mut rx) = ws.split();
    let (stx, mut srx) = mpsc::unbounded_channel::<Message>();
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    *hub.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, stx));
    hub.broadcast(event(serde_json::json!({"ev": "vm", "connected": true})));
    let sender = tokio::spawn(async move {
        while let Some(m) = srx.recv().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut expect_state = false;
    while let Some(Ok(msg)) = rx.next().await {
        match msg {
            Message::Text(t) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                    continue;
                };
                match v["ev"].as_str() {
                    Some("hello") => {
                        // A (re)loaded page: its serial history replaces ours.
                        let mut log = hub.log.lock().unwrap_or_else(|e| e.into_inner());
                        *log = v["serial"].as_str().unwrap_or("").to_string();
                    }
                    Some("serial") => hub.append_serial(v["data"].as_str().unwrap_or("")),
                    Some("state") => expect_state = true,
                    _ => hub.broadcast(t.to_string()),
                }
            }
            Message::Binary(state) if expect_state => {
                expect_state = false;
                let path = app.save_path.clone();
                let res = tokio::task::spawn_blocking(move || save_state(&path, &state)).await;
                let ev = match res {
                    Ok(Ok(n)) => {
                        serde_json::json!({"ev": "saved", "path": app.save_path, "bytes": n})
                    }
                    Ok(Err(e)) => serde_json::json!({"ev": "error", "message": e}),
                    Err(e) => serde_json::json!({"ev": "error", "message": e.to_string()}),
                };
                hub.broadcast(event(ev));
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    {
        let mut vm = hub.vm.lock().unwrap_or_else(|e| e.into_inner());
        if vm.as_ref().is_some_and(|(i, _)| *i == id) {
            *vm = None;
        }
    }
    hub.broadcast(event(serde_json::json!({"ev": "vm", "connected": false})));
    sender.abort();
}

/// Compress with zstd (v86 restores .zst states directly) and write atomically.
fn save_state(path: &Path, state: &[u8]) -> std::result::Result<u64, String> {
    let z = zstd::bulk::compress(state, 3).map_err(|e| format!("zstd: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension("zst.tmp");
    std::fs::write(&tmp, &z).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(z.len() as u64)
}

async fn console_conn(ws: WebSocket, app: Arc<App>) {
    let hub = &app.hub;
    let (mut tx, mut rx) = ws.split();
    let (mut events, backlog) = {
        let log = hub.log.lock().unwrap_or_else(|e| e.into_inner());
        (hub.events.subscribe(), log.clone())
    };
    let connected = hub.vm.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let hello = event(serde_json::json!({"ev": "vm", "connected": connected}));
    if tx.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    if !backlog.is_empty() {
        let b = event(serde_json::json!({"ev": "serial", "data": backlog}));
        if tx.send(Message::Text(b.into())).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(s) => if tx.send(Message::Text(s.into())).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let reply = match serde_json::from_str::<serde_json::Value>(t.as_str()) {
                        Ok(v) if matches!(v["cmd"].as_str(), Some("serial" | "pause" | "resume" | "save" | "reset")) => {
                            let vm = hub.vm.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, s)| s.clone());
                            match vm {
                                Some(s) if s.send(Message::Text(t)).is_ok() => None,
                                _ => Some("no VM page is connected: open the served page in a browser".to_string()),
                            }
                        }
                        Ok(v) => Some(format!("unknown command {}: expected serial, pause, resume, save or reset", v["cmd"])),
                        Err(e) => Some(format!("not JSON: {e}")),
                    };
                    if let Some(msg) = reply {
                        let e = event(serde_json::json!({"ev": "error", "message": msg}));
                        if tx.send(Message::Text(e.into())).await.is_err() { break }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            }
        }
    }
}
