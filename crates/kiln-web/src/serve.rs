//! `kiln serve`: the site over HTTP, a `/ctl` debug console and a `/net` network relay.
//!
//! Safe on loopback and on a network:
//! - every request's Host must be a name this server answers to (else 421), and a WebSocket's
//!   Origin must be that same origin (else 403): see [`crate::access`];
//! - the served `kiln.json` carries a per-server random key in its `ctl` and `net` URLs; only
//!   it lets a client act as the VM or open a relay. Debug consoles need a second key, given
//!   to the caller (printed by the CLI) in [`Serving::console_url`]. Keys are compared in
//!   constant time;
//! - WebSocket messages, queues and the serial backlog are bounded (see [`crate::ctl`]), and
//!   at most [`ServeOptions::max_relays`] relays (each a passt process) run at once; the rest
//!   get a 503 before the upgrade;
//! - a site directory is served without following symlinks (see [`crate::sitefs`]).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::access::{key_matches, origin_ok, random_key, Hosts};
use crate::ctl::{self, Hub, CONSOLE_MSG_MAX};
use crate::site::Content;
use crate::sitefs::{self, Refused};
use crate::{build_site, PrepareOptions, Result, Site, WebError};

/// Default for [`ServeOptions::max_relays`].
pub const DEFAULT_MAX_RELAYS: usize = 4;
/// Largest kiln.json read from a site directory.
const CONFIG_MAX: u64 = 1 << 20;

/// What to serve.
#[derive(Clone, Debug)]
pub enum ServeSource {
    /// A disk image or a Linux image directory: prepared in memory (a Linux image's 9p
    /// content files stay on disk); saved states go beside a disk, into a Linux image's
    /// directory as `saved.state.zst` (never over its `initial.state.zst`).
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
            } else if crate::linux::is_linux_image(path) {
                Ok(ServeSource::Image(path.to_path_buf()))
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
    /// Host names (no port) the server also answers to, besides its address (and `localhost`
    /// on loopback): e.g. the name of a reverse proxy in front of it.
    pub allow_hosts: Vec<String>,
    /// Network relays (one passt each) at once; more get HTTP 503. 0 turns `/net` off.
    pub max_relays: usize,
    /// Host ports forwarded into the guest through a relay's passt (`-p`). A port can be
    /// bound once: the first relay holds them until it ends, the next one then takes them.
    pub forwards: Vec<kiln_net::ports::PortForward>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8086)),
            public: false,
            prepare: PrepareOptions::default(),
            passt: PathBuf::from("passt"),
            allow_hosts: Vec::new(),
            max_relays: DEFAULT_MAX_RELAYS,
            forwards: Vec::new(),
        }
    }
}

/// A running server, as handed to `on_ready`.
#[derive(Clone, Debug)]
pub struct Serving {
    /// The bound address.
    pub addr: SocketAddr,
    /// The page: `http://ADDR/`.
    pub url: String,
    /// The debug console, with its key: `ws://ADDR/ctl?key=CONSOLE_KEY`. Whoever has it can
    /// type into the VM, pause, reset and save it.
    pub console_url: String,
}

enum Files {
    Memory(Site),
    Dir(PathBuf),
}

struct App {
    files: Files,
    passt: PathBuf,
    hub: Arc<Hub>,
    hosts: Hosts,
    /// Lets the served page act as the VM (`/ctl?role=vm`) and open relays (`/net`).
    vm_key: String,
    /// Lets a debug console connect to `/ctl`.
    console_key: String,
    relays: Arc<Semaphore>,
    max_relays: usize,
    forwards: Vec<kiln_net::ports::PortForward>,
    /// Held by the relay whose passt holds `forwards`.
    forwards_slot: Arc<Semaphore>,
}

fn listen_err(addr: &str) -> impl Fn(std::io::Error) -> WebError + '_ {
    move |e| WebError::Listen {
        addr: addr.to_string(),
        msg: e.to_string(),
    }
}

/// The largest state the page's machine can produce: v86 saves guest RAM, VGA memory and a
/// synchronously loaded disk, plus a little device state; 16 MiB covers that and the header.
fn state_max(config: &serde_json::Value) -> usize {
    let field = |k: &str, default: u64| config[k].as_u64().unwrap_or(default);
    let total = field("memory_size", 64 << 20)
        .saturating_add(field("vga_memory_size", 8 << 20))
        .saturating_add(config["disk"]["size"].as_u64().unwrap_or(0))
        .saturating_add(16 << 20);
    usize::try_from(total).unwrap_or(usize::MAX)
}

fn read_small(file: std::fs::File, max: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max), &mut v)?;
    Ok(v)
}

/// Serve `source` until Ctrl-C (or SIGTERM). `on_ready` gets the address and the console URL
/// once listening.
pub fn serve(
    source: ServeSource,
    opts: ServeOptions,
    on_ready: impl FnOnce(&Serving),
) -> Result<()> {
    let addr_s = opts.addr.to_string();
    if !opts.addr.ip().is_loopback() && !opts.public {
        return Err(WebError::Listen {
            addr: addr_s,
            msg: "not a loopback address; other machines are served only when `public` is set"
                .into(),
        });
    }
    // Checked before anything slow happens.
    Hosts::new(opts.addr, &opts.allow_hosts)?;
    kiln_net::ports::check_free(&opts.forwards).map_err(|e| WebError::BadOption {
        field: "-p",
        msg: e.to_string(),
    })?;
    let (files, save_path, config) = match &source {
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
            let config = site
                .get("kiln.json")
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            let save = if p.is_dir() {
                p.join("saved.state.zst")
            } else {
                dir.join(format!("{stem}.state.zst"))
            };
            (Files::Memory(site), save, config)
        }
        ServeSource::Site(d) => {
            let cfg_path = d.join("kiln.json");
            let (f, _) = sitefs::open_inside(d, "kiln.json").map_err(|r| {
                WebError::io(
                    &cfg_path,
                    "open",
                    std::io::Error::other(match r {
                        Refused::Symlink => "a symlink; kiln serves no symlinks",
                        Refused::NotFound => "not a readable regular file",
                    }),
                )
            })?;
            let bytes =
                read_small(f, CONFIG_MAX).map_err(|e| WebError::io(&cfg_path, "read", e))?;
            let config = serde_json::from_slice(&bytes).map_err(|e| {
                WebError::io(&cfg_path, "parse", std::io::Error::other(e.to_string()))
            })?;
            (Files::Dir(d.clone()), d.join("state/saved.bin.zst"), config)
        }
    };
    let listener = TcpListener::bind(opts.addr).map_err(|e| WebError::Listen {
        addr: addr_s.clone(),
        msg: if e.kind() == std::io::ErrorKind::AddrInUse {
            "address already in use (is another server running on that port?)".into()
        } else {
            e.to_string()
        },
    })?;
    let bound = listener.local_addr().map_err(listen_err(&addr_s))?;
    listener
        .set_nonblocking(true)
        .map_err(listen_err(&addr_s))?;
    let key = |what: &str| {
        random_key().map_err(|e| WebError::Listen {
            addr: addr_s.clone(),
            msg: format!("cannot make the {what} key: /dev/urandom: {e}"),
        })
    };
    let app = Arc::new(App {
        files,
        passt: opts.passt,
        hub: Arc::new(Hub::new(save_path, state_max(&config))),
        hosts: Hosts::new(bound, &opts.allow_hosts)?,
        vm_key: key("page")?,
        console_key: key("console")?,
        relays: Arc::new(Semaphore::new(opts.max_relays)),
        max_relays: opts.max_relays,
        forwards: opts.forwards,
        forwards_slot: Arc::new(Semaphore::new(1)),
    });
    let serving = Serving {
        addr: bound,
        url: format!("http://{bound}/"),
        console_url: format!("ws://{bound}/ctl?key={}", app.console_key),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WebError::Listen {
            addr: addr_s.clone(),
            msg: format!("tokio runtime: {e}"),
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_err(&addr_s))?;
        let router = Router::new()
            .route("/ctl", get(ctl))
            .route("/net", get(net))
            .fallback(get(file))
            .layer(middleware::from_fn_with_state(app.clone(), check_host))
            .with_state(app);
        on_ready(&serving);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(listen_err(&addr_s))
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

fn refuse(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut msg = msg.into();
    msg.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    match headers.get(header::HOST) {
        Some(h) => h.to_str().ok().map(str::to_string),
        None => uri.authority().map(|a| a.as_str().to_string()),
    }
}

/// The DNS-rebinding defence: a request naming a host we do not serve is misdirected.
async fn check_host(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match request_host(req.headers(), req.uri()) {
        None => refuse(StatusCode::BAD_REQUEST, "request has no Host header"),
        Some(h) if !app.hosts.allows(&h) => refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {h:?} is not a name this server answers to (allow it with kiln serve --allow-host NAME)"
            ),
        ),
        Some(_) => next.run(req).await,
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

fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "not found")
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
        return not_found();
    }
    let headers = [
        (header::CONTENT_TYPE, content_type(&path)),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    if path == "kiln.json" {
        let content = match &app.files {
            Files::Memory(site) => site.get(&path).cloned(),
            Files::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    let (f, _) = sitefs::open_inside(&dir, "kiln.json").ok()?;
                    read_small(f, CONFIG_MAX).ok().map(Bytes::from)
                })
                .await
                .ok()
                .flatten()
            }
        };
        let Some(content) = content else {
            return not_found();
        };
        // Served by kiln serve: tell the page where the console and the relay are, with the
        // key that lets it act as the VM (only pages of this origin can read it).
        let Ok(mut cfg) = serde_json::from_slice::<serde_json::Value>(&content) else {
            return (headers, content).into_response();
        };
        cfg["ctl"] = format!("ctl?key={}", app.vm_key).into();
        cfg["net"] = if app.max_relays > 0 {
            format!("net?key={}", app.vm_key).into()
        } else {
            serde_json::Value::Null
        };
        return (headers, cfg.to_string()).into_response();
    }
    match &app.files {
        Files::Memory(site) => match site.entry(&path) {
            Some(Content::Bytes(b)) => (headers, b.clone()).into_response(),
            // A file kiln checked when it built the site (a Linux image's 9p content).
            Some(Content::File(p, _)) => match std::fs::File::open(p).and_then(|f| {
                let len = f.metadata()?.len();
                Ok((f, len))
            }) {
                Ok((f, len)) => stream(headers, f, len),
                Err(_) => not_found(),
            },
            None => not_found(),
        },
        Files::Dir(dir) => {
            let (dir, rel) = (dir.clone(), path.clone());
            let opened = tokio::task::spawn_blocking(move || sitefs::open_inside(&dir, &rel))
                .await
                .unwrap_or(Err(Refused::NotFound));
            match opened {
                Ok((f, len)) => stream(headers, f, len),
                Err(Refused::Symlink) => refuse(
                    StatusCode::FORBIDDEN,
                    format!("/{path}: a symlink; kiln serve serves no symlinks"),
                ),
                Err(Refused::NotFound) => not_found(),
            }
        }
    }
}

/// A file's content as the response body, streamed in chunks: a large file costs no more
/// memory than a small one.
fn stream(
    headers: [(header::HeaderName, &'static str); 2],
    f: std::fs::File,
    len: u64,
) -> Response {
    let stream = futures_util::stream::unfold(tokio::fs::File::from_std(f), |mut f| async move {
        let mut buf = vec![0u8; 64 << 10];
        match tokio::io::AsyncReadExt::read(&mut f, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    (
        headers,
        [(header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    role: Option<String>,
    key: Option<String>,
}

/// Origin check for WebSocket routes (the Host was checked by [`check_host`]).
fn cross_origin(headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    let host = request_host(headers, uri).unwrap_or_default();
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{0}"));
    if origin_ok(origin, &host) {
        None
    } else {
        Some(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "cross-origin WebSocket refused: Origin {:?} is not http://{host}",
                origin.unwrap_or("")
            ),
        ))
    }
}

async fn ctl(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<KeyQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(r) = cross_origin(&headers, &uri) {
        return r;
    }
    let hub = app.hub.clone();
    if q.role.as_deref() == Some("vm") {
        if !key_matches(q.key.as_deref(), &app.vm_key) {
            return refuse(
                StatusCode::FORBIDDEN,
                "/ctl?role=vm: missing or wrong key; only the page this server serves may act as the VM",
            );
        }
        let max = hub.state_max();
        return ws
            .max_message_size(max)
            .max_frame_size(max)
            .on_upgrade(move |s| ctl::vm_conn(s, hub));
    }
    if !key_matches(q.key.as_deref(), &app.console_key) {
        return refuse(
            StatusCode::FORBIDDEN,
            "/ctl: missing or wrong key; the console URL with its key is printed when kiln serve starts",
        );
    }
    let Some(slot) = hub.console_slot() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "/ctl: {} consoles are connected, the most at once; close one and retry",
                ctl::MAX_CONSOLES
            ),
        );
    };
    ws.max_message_size(CONSOLE_MSG_MAX)
        .max_frame_size(CONSOLE_MSG_MAX)
        .on_upgrade(move |s| ctl::console_conn(s, hub, slot))
}

async fn net(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<KeyQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(r) = cross_origin(&headers, &uri) {
        return r;
    }
    if !key_matches(q.key.as_deref(), &app.vm_key) {
        return refuse(
            StatusCode::FORBIDDEN,
            "/net: missing or wrong key; only the page this server serves may open a relay",
        );
    }
    let Ok(slot) = app.relays.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "/net: {} network relays are open, the most at once (kiln serve --max-relays); close a page and retry",
                app.max_relays
            ),
        );
    };
    let passt = app.passt.clone();
    let forwards = if app.forwards.is_empty() {
        None
    } else {
        app.forwards_slot
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| (app.forwards.clone(), permit))
    };
    ws.max_message_size(crate::net::MAX_FRAME)
        .max_frame_size(crate::net::MAX_FRAME)
        .on_upgrade(move |s| crate::net::relay(s, passt, slot, forwards))
}
