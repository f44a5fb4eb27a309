//! A minimal QMP (QEMU Machine Protocol) client: one JSON object per line over a Unix socket.
//!
//! A reader thread splits the stream into command responses and asynchronous events, so a
//! `SHUTDOWN` event is captured even while nobody is waiting for a response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors of a QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no QMP response within {0:?}")]
    Timeout(Duration),
    #[error("QMP greeting missing or malformed: {0}")]
    Greeting(String),
    #[error("QMP command {command} failed: {message}")]
    Command { command: String, message: String },
}

/// A connected QMP session in command mode.
pub struct Qmp {
    writer: UnixStream,
    responses: Mutex<Receiver<Value>>,
    events: Arc<Mutex<Vec<Value>>>,
}

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let qmp = Qmp::open(path)?;
        qmp.negotiate()?;
        Ok(qmp)
    }

    /// Leaves capabilities-negotiation mode: commands work and events flow from here on.
    pub fn negotiate(&self) -> Result<(), QmpError> {
        self.execute("qmp_capabilities", None).map(|_| ())
    }

    /// Connects and reads the greeting only. QEMU sends the greeting as soon as it listens, but
    /// answers commands only once its main loop has time for them (tens of milliseconds later
    /// while TCG starts the guest), so a caller that only needs "QEMU is up" stops here and
    /// calls [`Qmp::negotiate`] later.
    pub fn open(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                        tracing::warn!("unparsable QMP line: {line}");
                        continue;
                    };
                    if msg.get("event").is_some() {
                        tracing::debug!("QMP event: {msg}");
                        if let Ok(mut ev) = sink.lock() {
                            ev.push(msg);
                        }
                    } else if tx.send(msg).is_err() {
                        break;
                    }
                }
            })?;
        let qmp = Qmp {
            writer,
            responses: Mutex::new(rx),
            events,
        };
        let greeting = qmp.next_response(RESPONSE_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting.to_string()));
        }
        Ok(qmp)
    }

    fn next_response(&self, timeout: Duration) -> Result<Value, QmpError> {
        let rx = self.responses.lock().map_err(|_| QmpError::Closed)?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => QmpError::Timeout(timeout),
            RecvTimeoutError::Disconnected => QmpError::Closed,
        })
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (&self.writer).write_all(line.as_bytes())?;
        let resp = self.next_response(RESPONSE_TIMEOUT)?;
        if let Some(err) = resp.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                message: err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        Ok(resp.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Events received so far (oldest first).
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The first `SHUTDOWN` event's data (`guest`, `reason`), if QEMU sent one.
    pub fn shutdown_event(&self) -> Option<Value> {
        self.events()
            .into_iter()
            .find(|e| e["event"] == "SHUTDOWN")
            .map(|e| e["data"].clone())
    }
}
