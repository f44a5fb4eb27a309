//! The one supervisor. Every VM, foreground or background, whatever its engine, is run by
//! [`run_vm`]: it holds the VM's supervisor lock, serves its control socket, starts the
//! engine, records `running`, turns signals and control requests into "press the power
//! button, kill after the timeout", and records how the VM ended.
//!
//! Control protocol (`DIR/control.sock`): one JSON request line per connection
//! (`{"op":"stop","timeout_s":30}`, `{"op":"kill"}` or `{"op":"quit"}`), answered by one JSON
//! line once the VM has ended (`{"end":{"kind":"powered-off"},"description":"guest powered off"}`);
//! `screendump` and `snapshot` are answered as soon as they are done (`{"error":null}`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kiln_sys::lock::FileLock;
use serde::{Deserialize, Serialize};

use crate::engine::{engine, Running};
use crate::state::{creator_died, record_path, VmState, LOCK, SUPERVISOR_LOCK};
use crate::{End, HostError, VmRecord};

/// A request to a VM's supervisor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Press the ACPI power button; kill after `timeout_s`.
    Stop { timeout_s: f64 },
    /// End the VM at once.
    Kill,
    /// End the VM at once because its console's user quit (Ctrl-A X).
    Quit,
    /// Write a PNG picture of the screen to `path`; answered at once with a [`Done`].
    Screendump { path: std::path::PathBuf },
    /// Take snapshot `tag` (see [`crate::snapshot::take`]); with `stop`, end the VM after it.
    /// Answered with a [`Done`] once the snapshot is complete.
    Snapshot { tag: String, stop: bool },
}

/// The answer to a request that does not wait for the VM's end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Done {
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The supervisor's answer, sent when the VM has ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub end: End,
    pub description: String,
}

/// The longest request line a supervisor reads: the socket is hostile input like any other.
const MAX_REQUEST: u64 = 4096;
/// At most this many clients wait for a VM's end at once; more are refused.
const MAX_WAITING: usize = 64;

/// A request that arrived on the control socket, with the way back to its client.
pub(crate) struct Incoming {
    request: Request,
    reply: UnixStream,
}

impl Incoming {
    fn answer(mut self, end: &End) {
        let reply = Reply {
            end: end.clone(),
            description: end.to_string(),
        };
        if let Ok(mut line) = serde_json::to_string(&reply) {
            line.push('\n');
            let _ = self.reply.write_all(line.as_bytes());
        }
    }
}

/// What reaches a supervisor while its VM runs.
pub(crate) enum Event {
    /// SIGTERM or SIGHUP: the first acts as `kiln stop`, a second kills.
    Signal,
    /// A request from the control socket.
    Control(Incoming),
    /// The VM has ended (posted by its engine, so the supervisor need not poll).
    Ended,
}

/// Serves `path` on a thread of its own, delivering requests as events.
fn serve_control(path: &Path, events: Sender<Event>) -> Result<(), HostError> {
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| HostError::io(format!("{}: cannot listen", path.display()), e))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let Ok(reader) = conn.try_clone() else {
                continue;
            };
            if BufReader::new(reader.take(MAX_REQUEST))
                .read_line(&mut line)
                .is_err()
            {
                continue;
            }
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let incoming = Incoming {
                        request,
                        reply: conn,
                    };
                    if events.send(Event::Control(incoming)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = (&conn).write_all(
                        format!(
                            "{{\"error\":{}}}\n",
                            serde_json::json!(format!("bad request: {e}"))
                        )
                        .as_bytes(),
                    );
                }
            }
        }
    });
    Ok(())
}

/// The error of a control exchange with `name`'s supervisor.
fn control_error(name: &str, detail: String) -> HostError {
    HostError::Control {
        name: name.to_string(),
        detail,
    }
}

/// Sends `request` to the supervisor on `socket` and reads its one-line answer (empty when it
/// closed the socket without one), waiting up to `wait`; `late` says what did not happen in
/// time.
fn exchange(
    name: &str,
    socket: &Path,
    request: &Request,
    wait: Duration,
    late: &str,
) -> Result<String, HostError> {
    let control = |detail: String| control_error(name, detail);
    let mut conn = UnixStream::connect(socket).map_err(|e| {
        control(format!(
            "cannot reach its supervisor at {}: {e}",
            socket.display()
        ))
    })?;
    conn.set_read_timeout(Some(wait))
        .map_err(|e| control(e.to_string()))?;
    let mut line = serde_json::to_string(request).map_err(|e| control(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes())
        .map_err(|e| control(format!("cannot send to its supervisor: {e}")))?;
    let mut answer = String::new();
    BufReader::new(conn.take(1 << 16))
        .read_line(&mut answer)
        .map_err(|_| control(late.to_string()))?;
    Ok(answer)
}

/// Sends `request` to the supervisor on `socket` and waits up to `wait` for the VM's end.
pub(crate) fn request(
    name: &str,
    socket: &Path,
    request: &Request,
    wait: Duration,
) -> Result<End, HostError> {
    let late = format!("did not end within {} s", wait.as_secs());
    let answer = exchange(name, socket, request, wait, &late)?;
    if answer.is_empty() {
        return Err(control_error(
            name,
            "its supervisor closed the control socket without an answer".into(),
        ));
    }
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| control_error(name, format!("unreadable answer from its supervisor: {e}")))?;
    Ok(reply.end)
}

/// Sends `request` (one answered by a [`Done`]) to the supervisor on `socket` and waits up to
/// `wait` for it to be done; `late` and `ended` say what went wrong otherwise.
pub(crate) fn done(
    name: &str,
    socket: &Path,
    request: &Request,
    wait: Duration,
    late: &str,
    ended: &str,
) -> Result<(), HostError> {
    let answer = exchange(name, socket, request, wait, late)?;
    match serde_json::from_str::<Done>(&answer) {
        Ok(Done { error: None }) => Ok(()),
        Ok(Done { error: Some(e) }) => Err(control_error(name, e)),
        Err(_) => Err(control_error(name, ended.into())),
    }
}

/// Asks the supervisor on `socket` for a PNG of the screen at `path` (absolute).
pub(crate) fn screendump(name: &str, socket: &Path, path: &Path) -> Result<(), HostError> {
    let request = Request::Screendump {
        path: path.to_path_buf(),
    };
    done(
        name,
        socket,
        &request,
        Duration::from_secs(10),
        "no screen within 10 s",
        "it ended before its screen could be saved",
    )
}

/// Takes a snapshot of the running VM: `(vm, tag, stop)`.
pub(crate) type TakeSnapshot<'a> =
    dyn FnMut(&mut dyn Running, &str, bool) -> Result<(), HostError> + 'a;

/// Runs `vm` until it ends, answering signals and control requests: a stop presses the power
/// button and kills the VM if it is still running `stop_timeout` later; a snapshot is taken
/// by `snapshot`.
pub(crate) fn supervise(
    vm: &mut dyn Running,
    events: &Receiver<Event>,
    stop_timeout: Duration,
    snapshot: &mut TakeSnapshot,
) -> (End, Vec<Incoming>) {
    let mut deadline: Option<(Instant, Duration)> = None;
    let mut waiting: Vec<Incoming> = Vec::new();
    let end = 'run: loop {
        // Block until something happens: an event, the VM's end (its engine posts
        // `Event::Ended`), or the stop deadline. The 1 s cap is a safety net, not a poll.
        let wait = deadline
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let first = match events.recv_timeout(wait) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            // Nobody can send any more; only the VM's own end is left to wait for.
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(end) = vm.wait_timeout(Duration::from_secs(1)) {
                    break end;
                }
                None
            }
        };
        if let Some(end) = vm.wait_timeout(Duration::ZERO) {
            if let Some(Event::Control(incoming)) = first {
                waiting.push(incoming);
            }
            break end;
        }
        let mut ended = false;
        for event in first
            .into_iter()
            .chain(std::iter::from_fn(|| events.try_recv().ok()))
        {
            // Everything but a kill presses the button (once) with its timeout.
            let timeout = match event {
                // The VM ended while this batch was handled: look right after it (the wake-up
                // is used up here; waiting for another would cost the full safety-net second).
                Event::Ended => {
                    ended = true;
                    continue;
                }
                Event::Signal if deadline.is_some() => break 'run vm.kill(),
                Event::Signal => stop_timeout,
                Event::Control(mut incoming) => {
                    let done = match &incoming.request {
                        Request::Screendump { path } => Some(vm.screendump(path).map(|()| None)),
                        Request::Snapshot { tag, stop } => {
                            Some(snapshot(vm, tag, *stop).map(|()| stop.then(|| tag.clone())))
                        }
                        _ => None,
                    };
                    if let Some(result) = done {
                        let (error, stopped) = match result {
                            Ok(stopped) => (None, stopped),
                            Err(e) => (Some(e.to_string()), None),
                        };
                        if let Ok(mut line) = serde_json::to_string(&Done { error }) {
                            line.push('\n');
                            let _ = incoming.reply.write_all(line.as_bytes());
                        }
                        if let Some(tag) = stopped {
                            vm.kill();
                            break 'run End::Snapshotted { tag };
                        }
                        continue;
                    }
                    let what = incoming.request.clone();
                    if waiting.len() < MAX_WAITING {
                        waiting.push(incoming);
                    }
                    match what {
                        Request::Kill => break 'run vm.kill(),
                        Request::Quit => {
                            vm.kill();
                            break 'run End::Quit;
                        }
                        Request::Screendump { .. } | Request::Snapshot { .. } => continue,
                        Request::Stop { timeout_s } => {
                            let t = if timeout_s.is_finite() {
                                timeout_s
                            } else {
                                0.0
                            };
                            Duration::from_secs_f64(t.clamp(0.0, 1e6))
                        }
                    }
                }
            };
            if deadline.is_none() {
                tracing::info!("pressing the ACPI power button");
                if let Err(e) = vm.power_button() {
                    tracing::warn!("power button: {e}");
                }
                deadline = Some((Instant::now() + timeout, timeout));
            }
        }
        if ended {
            if let Some(end) = vm.wait_timeout(Duration::from_millis(100)) {
                break end;
            }
        }
        if let Some((at, timeout)) = deadline {
            if Instant::now() >= at {
                // The guest may have powered off at the last moment.
                if let Some(end) = vm.wait_timeout(Duration::ZERO) {
                    break end;
                }
                vm.kill();
                break End::KilledAfterTimeout {
                    timeout_s: timeout.as_secs_f64(),
                };
            }
        }
    };
    (end, waiting)
}

/// Updates the record in `dir` under its lock.
pub(crate) fn update(dir: &Path, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord, HostError> {
    let lock_path = dir.join(LOCK);
    let _lock = FileLock::exclusive(&lock_path)
        .map_err(|e| HostError::io(format!("{}: cannot lock", lock_path.display()), e))?;
    let path = record_path(dir);
    let mut rec = VmRecord::load(&path)?;
    f(&mut rec);
    rec.save(&path)?;
    Ok(rec)
}

/// How long a stop from a signal waits for the guest.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a supervisor starts its VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Boots it.
    Boot,
    /// Resumes it from its own snapshot `TAG`, its disks put back to the snapshot's.
    Resume(String),
    /// A VM just cloned from snapshot `tag` of VM `from`, its disks made from that snapshot's.
    Clone { from: String, tag: String },
}

/// Runs the VM recorded in `dir` to its end: the body of every supervisor, started as `start`
/// says. `ready` is told once, with the
/// record as it runs or why the VM could not start; when it answers `false` (nobody wants the
/// VM any more: its creator died) the VM is ended at once. Returns how the VM ended; an error
/// means it never ran (and `dir`'s record says so).
pub(crate) fn run_vm(
    dir: &Path,
    stop_timeout: Duration,
    start: &Start,
    ready: &mut dyn FnMut(Result<&VmRecord, String>) -> bool,
) -> Result<End, HostError> {
    let mut told = false;
    let result = start_and_run(dir, stop_timeout, start, &mut |r| {
        told = true;
        ready(r)
    });
    if let (Err(e), false) = (&result, told) {
        ready(Err(e.to_string()));
    }
    result
}

fn start_and_run(
    dir: &Path,
    stop_timeout: Duration,
    start: &Start,
    ready: &mut dyn FnMut(Result<&VmRecord, String>) -> bool,
) -> Result<End, HostError> {
    let lock_path = dir.join(SUPERVISOR_LOCK);
    let _held = FileLock::try_exclusive(&lock_path)
        .map_err(|e| HostError::io(format!("{}: cannot lock", lock_path.display()), e))?
        .ok_or_else(|| HostError::State {
            path: lock_path.clone(),
            why: "another supervisor already runs this VM".into(),
        })?;
    // Names this process in the lock, so `kiln vm rm --force` can prove whom to kill even when
    // vm.json is broken.
    _held
        .record_holder()
        .map_err(|e| HostError::io(format!("{}: cannot write", lock_path.display()), e))?;
    let rec = VmRecord::load(&record_path(dir))?;
    let spec = rec.config.clone();
    // vm.json is data like any other file: check it again before acting on it.
    spec.validate()?;
    let (tx, events) = mpsc::channel();
    serve_control(&spec.control_socket(), tx.clone())?;
    let signals = tx.clone();
    kiln_sys::signal::on_stop_signals(move |_| signals.send(Event::Signal).is_ok())
        .map_err(|e| HostError::io("cannot install signal handlers", e))?;
    let engine = engine(spec.engine);
    let started = match start {
        Start::Boot => engine.start(&spec, None),
        Start::Resume(tag) => crate::snapshot::restore(engine.as_ref(), &rec, tag)
            .and_then(|restore| engine.start(&spec, Some(&restore))),
        Start::Clone { from, tag } => crate::snapshot::clone_source(dir, from, tag, &spec)
            .and_then(|restore| engine.start(&spec, Some(&restore))),
    };
    let mut vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            let _ = update(dir, |r| {
                r.meta.state = VmState::Stopped;
                r.meta.stopped_at = Some(kiln_sys::now_rfc3339());
                let end = End::Crashed {
                    reason: format!("did not start: {e}"),
                };
                r.meta.exit_reason = Some(end.to_string());
                r.meta.end = Some(end);
            });
            cleanup(&spec);
            return Err(e);
        }
    };
    let ended = tx;
    vm.on_end(Box::new(move || {
        let _ = ended.send(Event::Ended);
    }));
    let pid = vm.pid();
    let passt_pid = vm.network_pid();
    let recorded = update(dir, |r| {
        r.meta.net.passt_pid = passt_pid;
        r.meta.pid = Some(pid);
        r.meta.pid_start = kiln_sys::process::start_time(pid);
        r.meta.supervisor_pid = Some(std::process::id());
        r.meta.started_at = Some(kiln_sys::now_rfc3339());
        r.meta.state = VmState::Running;
        r.meta.resumed_from = match start {
            Start::Boot => None,
            Start::Resume(tag) => Some(tag.clone()),
            Start::Clone { from, tag } => Some(format!("{from}:{tag}")),
        };
    });
    let running = match recorded {
        Ok(rec) => rec,
        Err(e) => {
            vm.kill();
            cleanup(&spec);
            return Err(e);
        }
    };
    if !ready(Ok(&running)) {
        // Its creator died before it heard that the VM runs: a failed create, undone.
        vm.kill();
        drop(vm);
        let end = creator_died(dir);
        let _ = update(dir, |r| {
            r.meta.state = VmState::Stopped;
            r.meta.stopped_at = Some(kiln_sys::now_rfc3339());
            r.meta.exit_reason = Some(end.to_string());
            r.meta.end = Some(end.clone());
        });
        cleanup(&spec);
        return Err(HostError::Start {
            name: spec.name.clone(),
            detail: end.to_string(),
        });
    }
    vm.settle();
    let mut snapshot = |vm: &mut dyn Running, tag: &str, stop: bool| {
        crate::snapshot::take(vm, engine.as_ref(), &running, tag, stop).map(|_| ())
    };
    let (end, waiting) = supervise(vm.as_mut(), &events, stop_timeout, &mut snapshot);
    if let Some(stats) = vm.statistics() {
        tracing::info!("{stats}");
    }
    drop(vm);
    let _ = update(dir, |r| {
        r.meta.state = VmState::Stopped;
        r.meta.stopped_at = Some(kiln_sys::now_rfc3339());
        r.meta.exit_reason = Some(end.to_string());
        r.meta.end = Some(end.clone());
        r.meta.net.passt_pid = None;
    });
    cleanup(&spec);
    // Answer only once the record says how the VM ended and the lock says it no longer runs,
    // so whoever asked sees the end everywhere at once.
    drop(_held);
    for w in waiting {
        w.answer(&end);
    }
    Ok(end)
}

/// Removes the sockets the supervisor served once nothing serves them (an engine removes its
/// own, e.g. QEMU's QMP socket, when it is dropped).
pub(crate) fn cleanup(spec: &crate::VmSpec) {
    let _ = fs::remove_file(spec.control_socket());
    if let Some(c) = spec.console_socket() {
        let _ = fs::remove_file(c);
    }
}
