//! `/ctl`: the served page (the VM) and debug consoles, with every queue and message bounded.
//!
//! Protocol (JSON text messages). The page connects with `?role=vm&key=VM_KEY` (the key is in
//! the `ctl` URL of the `kiln.json` that `kiln serve` hands out); a console connects with
//! `?key=CONSOLE_KEY` (printed when the server starts):
//! - console → server: `{"cmd":"serial","data":"hello\r"}`, `{"cmd":"pause"}`,
//!   `{"cmd":"resume"}`, `{"cmd":"save"}`, `{"cmd":"reset"}`;
//! - server → console: `{"ev":"serial","data":"..."}` (the last 1 MiB of serial output on
//!   connect, then as it comes), `{"ev":"vm","connected":bool}`,
//!   `{"ev":"saved","path":"...","bytes":N}`, `{"ev":"paused"}`, `{"ev":"resumed"}`,
//!   `{"ev":"reset"}`, `{"ev":"error","message":"..."}`;
//! - page → server: `{"ev":"hello","serial":"..."}`, `{"ev":"serial","data":"..."}`,
//!   `{"ev":"paused"}` (and the other replies), and for a save `{"ev":"state"}` followed by
//!   the state as one binary message. A state is taken only after a console asked for one,
//!   and kiln alone chooses where it is written.
//!
//! Bounds: a console's messages are at most [`CONSOLE_MSG_MAX`]; the page's text messages at
//! most [`VM_TEXT_MAX`] and its state at most the size the site's machine can produce; the
//! serial backlog at most [`LOG_MAX`] whatever the input (the hello included); each console
//! has an outgoing queue of at most [`CONSOLE_QUEUE_MAX`] bytes and is disconnected when it
//! does not keep up; commands wait for the page in a queue of [`VM_QUEUE`] and are refused
//! (with an error to the console) when it is full; at most [`MAX_CONSOLES`] consoles at once;
//! one page at a time (a new one replaces the old).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

/// Serial output kept for consoles that connect late.
pub(crate) const LOG_MAX: usize = 1 << 20;
/// Largest text message from the page (a hello carries up to [`LOG_MAX`] of serial, JSON-
/// escaped).
pub(crate) const VM_TEXT_MAX: usize = 2 << 20;
/// Largest message from a console.
pub(crate) const CONSOLE_MSG_MAX: usize = 64 << 10;
/// Bytes queued for one console before it is dropped as too slow.
pub(crate) const CONSOLE_QUEUE_MAX: usize = 8 << 20;
/// Commands queued for the page.
pub(crate) const VM_QUEUE: usize = 64;
/// Consoles at once.
pub(crate) const MAX_CONSOLES: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn event(v: serde_json::Value) -> Utf8Bytes {
    v.to_string().into()
}

fn error_event(msg: impl Into<String>) -> Utf8Bytes {
    event(serde_json::json!({"ev": "error", "message": msg.into()}))
}

/// One console's outgoing messages, bounded in bytes. Messages are shared between consoles
/// (cheap clones), so all queues together hold at most one queue's worth of broadcast data.
struct Outbox {
    inner: Mutex<OutboxInner>,
    ready: Notify,
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct OutboxInner {
    queue: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            inner: Mutex::default(),
            ready: Notify::new(),
            closed: watch::channel(false).0,
        }
    }

    /// Queue `m`; false (and the console is closed) when it would exceed the budget.
    fn push(&self, m: Utf8Bytes) -> bool {
        let mut i = lock(&self.inner);
        if i.closed {
            return false;
        }
        let n = m.as_str().len();
        if i.bytes + n > CONSOLE_QUEUE_MAX {
            i.closed = true;
            i.queue.clear();
            i.bytes = 0;
            drop(i);
            self.closed.send_replace(true);
            self.ready.notify_one();
            return false;
        }
        i.bytes += n;
        i.queue.push_back(m);
        drop(i);
        self.ready.notify_one();
        true
    }

    async fn pop(&self) -> Option<Utf8Bytes> {
        loop {
            {
                let mut i = lock(&self.inner);
                if i.closed {
                    return None;
                }
                if let Some(m) = i.queue.pop_front() {
                    i.bytes -= m.as_str().len();
                    return Some(m);
                }
            }
            self.ready.notified().await;
        }
    }

    fn close(&self) {
        lock(&self.inner).closed = true;
        self.closed.send_replace(true);
        self.ready.notify_one();
    }
}

struct VmSlot {
    id: u64,
    cmds: mpsc::Sender<Message>,
    kick: oneshot::Sender<()>,
}

/// Where the page and the consoles meet.
pub(crate) struct Hub {
    vm: Mutex<Option<VmSlot>>,
    consoles: Mutex<Vec<(u64, Arc<Outbox>)>>,
    console_slots: Arc<Semaphore>,
    /// Serial output so far; its lock also orders backlog vs. live output for new consoles.
    log: Mutex<String>,
    next_id: AtomicU64,
    /// A console asked for a save the page has not delivered yet.
    save_requested: AtomicBool,
    /// Where a save goes: kiln's choice, never the page's.
    save_path: PathBuf,
    /// Largest state the page may send.
    state_max: usize,
}

/// Keep the last `max` bytes of `s` (at a character boundary).
fn keep_tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    &s[cut..]
}

impl Hub {
    pub(crate) fn new(save_path: PathBuf, state_max: usize) -> Hub {
        Hub {
            vm: Mutex::new(None),
            consoles: Mutex::new(Vec::new()),
            console_slots: Arc::new(Semaphore::new(MAX_CONSOLES)),
            log: Mutex::new(String::new()),
            next_id: AtomicU64::new(1),
            save_requested: AtomicBool::new(false),
            save_path,
            state_max,
        }
    }

    pub(crate) fn state_max(&self) -> usize {
        self.state_max
    }

    /// A console slot, or None when [`MAX_CONSOLES`] are connected.
    pub(crate) fn console_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.console_slots.clone().try_acquire_owned().ok()
    }

    fn broadcast(&self, m: Utf8Bytes) {
        lock(&self.consoles).retain(|(_, ob)| ob.push(m.clone()));
    }

    fn append_serial(&self, data: &str) {
        if data.is_empty() {
            return;
        }
        let mut log = lock(&self.log);
        let data = keep_tail(data, LOG_MAX);
        log.push_str(data);
        if log.len() > LOG_MAX {
            let keep = keep_tail(&log, LOG_MAX).len();
            let cut = log.len() - keep;
            log.drain(..cut);
        }
        // Under the log lock: a console that connects now gets this in its backlog or live.
        self.broadcast(event(serde_json::json!({"ev": "serial", "data": data})));
    }

    fn vm_connected(&self) -> bool {
        lock(&self.vm).is_some()
    }
}

/// Serve the page's connection (already authenticated).
pub(crate) async fn vm_conn(ws: WebSocket, hub: Arc<Hub>) {
    let (mut tx, mut rx) = ws.split();
    let (cmds, mut cmds_rx) = mpsc::channel::<Message>(VM_QUEUE);
    let (kick, mut kicked) = oneshot::channel();
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let old = lock(&hub.vm).replace(VmSlot { id, cmds, kick });
    if let Some(old) = old {
        // A reloaded page (or another tab) replaces the old one, which is closed.
        let _ = old.kick.send(());
    }
    hub.broadcast(event(serde_json::json!({"ev": "vm", "connected": true})));

    let close: Option<CloseFrame> = {
        let sender = async {
            while let Some(m) = cmds_rx.recv().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            None
        };
        let receiver = async {
            let mut expect_state = false;
            while let Some(Ok(msg)) = rx.next().await {
                match msg {
                    Message::Text(t) if t.as_str().len() > VM_TEXT_MAX => {
                        return Some(CloseFrame {
                            code: 1009,
                            reason: format!(
                                "text message of {} bytes; the limit is {VM_TEXT_MAX}",
                                t.as_str().len()
                            )
                            .into(),
                        });
                    }
                    Message::Text(t) => {
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                            continue;
                        };
                        match v["ev"].as_str() {
                            Some("hello") => {
                                // A (re)loaded page: its serial history replaces ours.
                                let serial = v["serial"].as_str().unwrap_or("");
                                *lock(&hub.log) = keep_tail(serial, LOG_MAX).to_string();
                            }
                            Some("serial") => hub.append_serial(v["data"].as_str().unwrap_or("")),
                            Some("state") => {
                                expect_state = hub.save_requested.swap(false, Ordering::SeqCst);
                                if !expect_state {
                                    hub.broadcast(error_event(
                                        "the page sent a state nobody asked for; ignored",
                                    ));
                                }
                            }
                            Some(ev @ ("paused" | "resumed" | "reset")) => {
                                hub.broadcast(event(serde_json::json!({"ev": ev})));
                            }
                            Some("error") => {
                                let m = v["message"].as_str().unwrap_or("(no message)");
                                let m: String = m.chars().take(1000).collect();
                                hub.broadcast(error_event(format!("page: {m}")));
                            }
                            _ => {}
                        }
                    }
                    Message::Binary(state) if expect_state => {
                        expect_state = false;
                        let path = hub.save_path.clone();
                        let res =
                            tokio::task::spawn_blocking(move || save_state(&path, &state)).await;
                        let ev = match res {
                            Ok(Ok(n)) => event(
                                serde_json::json!({"ev": "saved", "path": hub.save_path, "bytes": n}),
                            ),
                            Ok(Err(e)) => error_event(e),
                            Err(e) => error_event(e.to_string()),
                        };
                        hub.broadcast(ev);
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            None
        };
        tokio::select! {
            c = sender => c,
            c = receiver => c,
            _ = &mut kicked => Some(CloseFrame {
                code: 1000,
                reason: "another page connected as the VM".into(),
            }),
        }
    };
    {
        let mut vm = lock(&hub.vm);
        if vm.as_ref().is_some_and(|s| s.id == id) {
            *vm = None;
        }
    }
    hub.broadcast(event(
        serde_json::json!({"ev": "vm", "connected": hub.vm_connected()}),
    ));
    if let Some(frame) = close {
        // Say why, and give the peer a moment to answer the close (dropping a socket with
        // unread input resets it, which can lose the reason); a peer that does not read
        // gets a second at most.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if tx.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(m)) = rx.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

/// Compress with zstd (v86 restores .zst states directly) and write atomically: a fresh
/// temporary file beside the target, renamed over it (a symlink there is replaced, never
/// followed).
fn save_state(path: &Path, state: &[u8]) -> std::result::Result<u64, String> {
    let z = zstd::bulk::compress(state, 3).map_err(|e| format!("zstd: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(format!(
                "{}: is a symlink; kiln writes states only into a real directory",
                dir.display()
            ))
        }
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?,
    }
    // Beside the target under a name recording this process (swept if a server is killed
    // mid-save), fsynced, renamed over it.
    kiln_sys::temp::write_atomic(path, &z, None, 0o644)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(z.len() as u64)
}

/// Serve a console's connection (already authenticated); `slot` is held until it ends.
pub(crate) async fn console_conn(ws: WebSocket, hub: Arc<Hub>, slot: OwnedSemaphorePermit) {
    let _slot = slot;
    let (mut tx, mut rx) = ws.split();
    let outbox = Arc::new(Outbox::new());
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let log = lock(&hub.log);
        outbox.push(event(
            serde_json::json!({"ev": "vm", "connected": hub.vm_connected()}),
        ));
        if !log.is_empty() {
            outbox.push(event(serde_json::json!({"ev": "serial", "data": *log})));
        }
        lock(&hub.consoles).push((id, outbox.clone()));
    }
    let mut closed = outbox.closed.subscribe();
    let sender = async {
        while let Some(m) = outbox.pop().await {
            if tx.send(Message::Text(m)).await.is_err() {
                break;
            }
        }
    };
    let receiver = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) => {
                    if let Err(msg) = command(&hub, t.as_str()) {
                        if !outbox.push(error_event(msg)) {
                            break;
                        }
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = sender => {}
        _ = receiver => {}
        // Too slow: its queue overflowed. Dropping the socket ends the connection.
        _ = closed.wait_for(|c| *c) => {}
    }
    outbox.close();
    lock(&hub.consoles).retain(|(i, _)| *i != id);
}

/// Pass a console's command to the page.
fn command(hub: &Hub, text: &str) -> std::result::Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let cmd = match v["cmd"].as_str() {
        Some("serial") => {
            let Some(data) = v["data"].as_str() else {
                return Err("serial: `data` must be a string".into());
            };
            serde_json::json!({"cmd": "serial", "data": data})
        }
        Some(c @ ("pause" | "resume" | "save" | "reset")) => serde_json::json!({ "cmd": c }),
        _ => {
            return Err(format!(
                "unknown command {}: expected serial, pause, resume, save or reset",
                v["cmd"]
            ))
        }
    };
    let vm = lock(&hub.vm).as_ref().map(|s| s.cmds.clone());
    let Some(vm) = vm else {
        return Err("no VM page is connected: open the served page in a browser".into());
    };
    let is_save = cmd["cmd"] == "save";
    match vm.try_send(Message::Text(cmd.to_string().into())) {
        Ok(()) => {
            if is_save {
                hub.save_requested.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
        Err(mpsc::error::TrySendError::Full(_)) => Err(format!(
            "the VM page is not reading its commands ({VM_QUEUE} waiting); command dropped"
        )),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Err("no VM page is connected: open the served page in a browser".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_char_boundaries() {
        assert_eq!(keep_tail("abc", 5), "abc");
        assert_eq!(keep_tail("abcdef", 2), "ef");
        assert_eq!(keep_tail("aé", 1), "");
        assert_eq!(keep_tail("éa", 2), "a");
    }

    #[test]
    fn outbox_is_bounded_and_closes_when_full() {
        let ob = Outbox::new();
        let big: Utf8Bytes = "x".repeat(CONSOLE_QUEUE_MAX / 2).into();
        assert!(ob.push(big.clone()));
        assert!(ob.push(big.clone()));
        assert!(!ob.push("y".into()));
        assert!(*ob.closed.borrow());
        assert_eq!(lock(&ob.inner).bytes, 0);
        assert!(!ob.push("z".into()));
    }
}
