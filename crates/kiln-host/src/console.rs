//! Consoles: one escape sequence for all of them, the serial console a supervisor serves on a
//! Unix socket, and the client that attaches a terminal to it.
//!
//! Keys: **Ctrl-A X** quits (ends the VM), **Ctrl-A D** detaches (leaves the VM running; only
//! where there is something to detach from), **Ctrl-A Ctrl-A** sends one Ctrl-A.
//!
//! Every console is a [`SocketConsole`]: a background VM's is served to `kiln vm console`, a
//! foreground VM's to the relay of its own terminal ([`TerminalConsole`]), whatever the
//! engine.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::HostError;

pub use kiln_sys::term::{escape_help, Escape, EscapeAction, ESCAPE};

/// How much recent output a newly connected console client is shown.
pub const BACKLOG: usize = 64 << 10;

/// A serial console served on a Unix socket by the supervisor: one client at a time gets the
/// output (starting with a replay of the last [`BACKLOG`] bytes, so a late client still sees
/// the banner) and its input goes to the guest; everything is also appended to a log.
#[derive(Clone)]
pub struct SocketConsole {
    listener: Arc<UnixListener>,
    path: PathBuf,
    state: Arc<Mutex<SocketState>>,
}

#[derive(Default)]
struct SocketState {
    backlog: VecDeque<u8>,
    client: Option<UnixStream>,
    log: Option<fs::File>,
}

impl SocketConsole {
    /// Listens on `path` (replacing a stale socket), appending output to `log`.
    pub fn bind(path: &Path, log: Option<&Path>) -> Result<SocketConsole, HostError> {
        let _ = fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| HostError::io(format!("{}: cannot listen", path.display()), e))?;
        let log = log
            .map(|l| {
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(l)
                    .map_err(|e| HostError::io(format!("{}: cannot open", l.display()), e))
            })
            .transpose()?;
        Ok(SocketConsole {
            listener: Arc::new(listener),
            path: path.to_path_buf(),
            state: Arc::new(Mutex::new(SocketState {
                log,
                ..SocketState::default()
            })),
        })
    }

    /// Accepts clients one after another, each replacing the previous one; what a client
    /// sends goes to `input`.
    pub fn serve(&self, input: impl Fn(&[u8]) + Clone + Send + 'static) {
        let this = self.clone();
        thread::spawn(move || {
            for conn in this.listener.incoming().map_while(Result::ok) {
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                {
                    let Ok(mut state) = this.state.lock() else {
                        return;
                    };
                    let (a, b) = state.backlog.as_slices();
                    let mut w = &conn;
                    if w.write_all(a).and_then(|_| w.write_all(b)).is_err() {
                        continue;
                    }
                    state.client = Some(conn);
                }
                let input = input.clone();
                thread::spawn(move || {
                    let mut reader = reader;
                    let mut buf = [0u8; 512];
                    while let Ok(n @ 1..) = reader.read(&mut buf) {
                        input(&buf[..n]);
                    }
                });
            }
        });
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the current client the console has ended: it reads the end of the output.
    pub(crate) fn hang_up(&self) {
        if let Ok(mut state) = self.state.lock() {
            if let Some(client) = state.client.take() {
                let _ = client.shutdown(std::net::Shutdown::Write);
            }
        }
    }
}

impl Write for SocketConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("console lock poisoned"))?;
        state.backlog.extend(buf);
        let excess = state.backlog.len().saturating_sub(BACKLOG);
        state.backlog.drain(..excess);
        if let Some(log) = &mut state.log {
            let _ = log.write_all(buf);
        }
        if let Some(client) = &state.client {
            let mut w = client;
            if w.write_all(buf).is_err() {
                // The client went away; output keeps filling the backlog for the next one.
                state.client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a console session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user pressed Ctrl-A D (interactive).
    Detached,
    /// The user pressed Ctrl-A X: the caller ends the VM.
    Quit,
    /// Input ended and the output went quiet (pipes).
    InputDone,
    /// The VM closed the console: it ended.
    VmEnded,
}

/// Connects to the console `socket` and relays stdin to the guest's serial port and its output
/// to stdout. `interactive` puts a terminal stdin in raw mode and decodes the escape keys;
/// otherwise stdin is sent as is and, once it ends, output is relayed until `linger` passes
/// without any.
pub fn attach_console(
    socket: &Path,
    interactive: bool,
    linger: Duration,
) -> Result<ConsoleEnd, HostError> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        HostError::io(
            format!("{}: cannot connect to the console", socket.display()),
            e,
        )
    })?;
    let _raw = if interactive {
        kiln_sys::term::SavedTerminal::raw(0)
    } else {
        None
    };
    relay(stream, interactive.then(|| Escape::new(true)), Some(linger))
}

/// A foreground VM's console on this process's terminal: the VM's output goes to a
/// [`SocketConsole`] like a background VM's, and a thread relays it to stdout and stdin to
/// it, as `kiln vm console` does. A terminal stdin is put in raw mode (restored when this is
/// dropped); the escape keys are decoded whether or not stdin is a terminal (Ctrl-A X quits,
/// there is nothing to detach from). The end of stdin does not end the VM.
pub(crate) struct TerminalConsole {
    server: SocketConsole,
    quit: Receiver<()>,
    /// Disconnected when the relay has ended.
    relayed: Receiver<()>,
    _raw: Option<kiln_sys::term::SavedTerminal>,
}

/// How long the end of a VM waits for its last output to reach the terminal.
const DRAIN: Duration = Duration::from_secs(1);

impl TerminalConsole {
    /// Connects to `server` and starts relaying; `on_quit` runs on Ctrl-A X, after
    /// [`TerminalConsole::quit_pressed`] starts answering true. The socket is removed once
    /// connected, so no other client can take the console over.
    pub(crate) fn attach(
        server: &SocketConsole,
        on_quit: impl FnOnce() + Send + 'static,
    ) -> Result<TerminalConsole, HostError> {
        let stream = UnixStream::connect(server.path()).map_err(|e| {
            HostError::io(
                format!("{}: cannot connect to the console", server.path().display()),
                e,
            )
        })?;
        let _ = fs::remove_file(server.path());
        let raw = kiln_sys::term::SavedTerminal::raw(0);
        let (tx, quit) = mpsc::channel();
        let (relaying, relayed) = mpsc::channel::<()>();
        thread::spawn(move || {
            let _relaying = relaying;
            if let Ok(ConsoleEnd::Quit) = relay(stream, Some(Escape::new(false)), None) {
                let _ = tx.send(());
                on_quit();
            }
        });
        Ok(TerminalConsole {
            server: server.clone(),
            quit,
            relayed,
            _raw: raw,
        })
    }

    /// Whether the user pressed Ctrl-A X (true from then on).
    pub(crate) fn quit_pressed(&self) -> bool {
        self.quit.try_recv().is_ok()
    }
}

impl Drop for TerminalConsole {
    /// The VM has ended (its output is all in the console): the relay shows the rest, then the
    /// terminal is restored.
    fn drop(&mut self) {
        self.server.hang_up();
        let _ = self.relayed.recv_timeout(DRAIN);
    }
}

/// Reads `from` on a thread of its own, sending each chunk as `data(bytes)` and the end as
/// `closed`.
fn forward<T: Send + 'static>(
    mut from: impl Read + Send + 'static,
    to: std::sync::mpsc::SyncSender<T>,
    data: fn(Vec<u8>) -> T,
    closed: T,
) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.send(closed);
                    return;
                }
                Ok(n) => {
                    if to.send(data(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Relays `stream` to stdout and stdin to `stream`, decoding the escape keys with `escape`
/// when given. Once stdin ends, output is relayed until `linger` passes without any (for
/// ever when `None`: until the VM closes the console).
fn relay(
    mut stream: UnixStream,
    escape: Option<Escape>,
    linger: Option<Duration>,
) -> Result<ConsoleEnd, HostError> {
    // Two threads feed one channel: the guest's output and the user's input.
    enum Chunk {
        Guest(Vec<u8>),
        GuestClosed,
        User(Vec<u8>),
        UserClosed,
    }
    let (tx, rx) = mpsc::sync_channel::<Chunk>(64);
    let from_guest = stream
        .try_clone()
        .map_err(|e| HostError::io("console: cannot clone the socket", e))?;
    forward(from_guest, tx.clone(), Chunk::Guest, Chunk::GuestClosed);
    forward(std::io::stdin(), tx, Chunk::User, Chunk::UserClosed);
    let mut stdout = std::io::stdout();
    let mut escape = escape;
    let mut input_done: Option<Instant> = None;
    loop {
        let lingering = input_done.zip(linger);
        let wait = match lingering {
            Some((at, linger)) => linger.saturating_sub(at.elapsed()),
            None => Duration::from_secs(3600),
        };
        let chunk = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) if lingering.is_some() => {
                return Ok(ConsoleEnd::InputDone)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(ConsoleEnd::VmEnded),
        };
        match chunk {
            Chunk::Guest(data) => {
                if stdout
                    .write_all(&data)
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    // Our reader went away (a closed pipe): nothing more to show.
                    return Ok(ConsoleEnd::InputDone);
                }
                if input_done.is_some() {
                    input_done = Some(Instant::now());
                }
            }
            Chunk::GuestClosed => return Ok(ConsoleEnd::VmEnded),
            Chunk::UserClosed => input_done = Some(Instant::now()),
            Chunk::User(data) => {
                let mut out = Vec::with_capacity(data.len());
                let action = match &mut escape {
                    Some(escape) => escape.feed(&data, &mut out),
                    None => {
                        out = data;
                        None
                    }
                };
                if !out.is_empty() {
                    stream
                        .write_all(&out)
                        .map_err(|e| HostError::io("console: cannot write to the guest", e))?;
                }
                match action {
                    Some(EscapeAction::Detach) => return Ok(ConsoleEnd::Detached),
                    Some(EscapeAction::Quit) => return Ok(ConsoleEnd::Quit),
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keys() {
        let mut e = Escape::new(true);
        let mut out = Vec::new();
        assert_eq!(e.feed(b"ab\x01\x01c", &mut out), None);
        assert_eq!(out, b"ab\x01c");
        out.clear();
        // An escape split across two reads still counts.
        assert_eq!(e.feed(b"z\x01", &mut out), None);
        assert_eq!(e.feed(b"d", &mut out), Some(EscapeAction::Detach));
        assert_eq!(out, b"z");
        let mut e = Escape::new(false);
        out.clear();
        assert_eq!(e.feed(b"\x01d\x01X", &mut out), Some(EscapeAction::Quit));
        assert_eq!(out, b"d", "without detaching, Ctrl-A D sends d");
    }
}
