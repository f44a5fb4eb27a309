//! `kiln boot IMAGE`: a Linux image on v86 under Node, its serial console on the terminal.
//!
//! The image's saved state (checked: [`crate::state`]) is resumed unless `cold`; with `save`,
//! the machine's state is written into the image when the session ends (Ctrl-A X, the
//! `exit_on` text, SIGTERM or SIGHUP), so the next boot resumes there. A guest that powers
//! off or reboots ends the session too (the kernel's `reboot: Power down` and the like on
//! serial); there is then no machine to save, so with `save` the image's state is removed and
//! the next boot is cold. With `net` the guest's network card is connected to a passt of its
//! own (DHCP, DNS, NAT to the host), which also forwards `forwards` into the guest.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_net::ports::PortForward;
use kiln_sys::term::{Escape, EscapeAction};

use crate::linux::{load_linux_image, Start};
use crate::session::{Event, Session};
use crate::{state, Assets, Result, WebError};

/// What `kiln boot` does.
#[derive(Clone, Debug, Default)]
pub struct BootOptions {
    /// Ignore the image's saved state.
    pub cold: bool,
    /// Write the machine's state into the image when the session ends.
    pub save: bool,
    /// Give the guest a network through passt.
    pub net: bool,
    /// Host ports forwarded to the guest (through passt; implies `net`).
    pub forwards: Vec<PortForward>,
    /// End the session when this text appears on serial.
    pub exit_on: Option<String>,
    /// Guest memory in MiB (default: the image's).
    pub memory_mib: Option<u32>,
    pub assets: Option<Assets>,
    /// The passt binary (default: [`kiln_net::passt::find`]).
    pub passt: Option<PathBuf>,
}

/// How the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootEnd {
    /// Ctrl-A X.
    Quit,
    /// The `exit_on` text appeared.
    ExitOn,
    /// SIGTERM or SIGHUP.
    Signal,
    /// The guest powered off or halted.
    PoweredOff,
    /// The guest rebooted.
    Reset,
}

/// What happened.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BootReport {
    /// "cold" or "warm" (resumed from the saved state).
    pub mode: &'static str,
    /// Milliseconds from start until v86 ran (the state restored).
    pub loaded_ms: u64,
    pub end: BootEnd,
    /// The saved state's compressed size, when one was written.
    pub saved_bytes: Option<u64>,
    /// The saved state was removed (the guest powered off with `save`).
    pub state_removed: bool,
}

/// The kernel's last words on serial, by what they mean.
const GUEST_ENDS: &[(&str, BootEnd)] = &[
    ("reboot: Power down", BootEnd::PoweredOff),
    ("reboot: System halted", BootEnd::PoweredOff),
    ("reboot: Restarting system", BootEnd::Reset),
];

/// Boots the Linux image directory `image` with the terminal as its console; `on_start` gets
/// a line to show before the console opens.
pub fn boot(
    image: &Path,
    opts: &BootOptions,
    on_start: &mut dyn FnMut(&str),
) -> Result<BootReport> {
    let img = load_linux_image(image)?;
    let assets = opts.assets.clone().unwrap_or_else(Assets::locate);
    assets.check()?;
    let memory = opts
        .memory_mib
        .map(|m| u64::from(m) << 20)
        .unwrap_or(img.memory_size);
    let saved = if opts.cold { None } else { img.saved_state()? };
    if saved.is_none() {
        img.require_kernel()?;
    }
    let want_net = opts.net || !opts.forwards.is_empty();
    // passt first: a taken port or a missing passt is an error before anything boots.
    let mut passt = None;
    let mut net_peer = None;
    if want_net {
        kiln_net::ports::check_free(&opts.forwards).map_err(|e| WebError::BadOption {
            field: "-p",
            msg: e.to_string(),
        })?;
        let bin = opts
            .passt
            .clone()
            .or_else(kiln_net::passt::find)
            .ok_or_else(|| WebError::BadOption {
                field: "--net",
                msg: "passt is not installed (apt-get install passt)".into(),
            })?;
        let socket = kiln_net::passt::socket_pair().map_err(|e| WebError::BadOption {
            field: "--net",
            msg: e.to_string(),
        })?;
        let popts = kiln_net::passt::PasstOptions {
            forwards: opts.forwards.clone(),
            guest_layout: true,
        };
        let mut cmd = kiln_net::passt::command(&bin, &socket, &popts);
        cmd.stderr(std::process::Stdio::null());
        let child = cmd.spawn().map_err(|e| WebError::BadOption {
            field: "--net",
            msg: format!("cannot start {}: {e}", bin.display()),
        })?;
        passt = Some(KillOnDrop(child));
        net_peer = Some(socket.peer);
    }

    let scratch = kiln_sys::temp::TempDir::beside(&std::env::temp_dir().join("kiln-boot"))
        .map_err(|e| WebError::io(std::env::temp_dir(), "create temp dir", e))?;
    let (start, mode) = match &saved {
        Some((raw, _)) => (Start::Restore(raw), "warm"),
        None => (Start::Cold, "cold"),
    };
    let mut job = img.job(&assets, scratch.path(), memory, start)?;
    job.net = net_peer;
    let t0 = Instant::now();
    let mut session = Session::start(&assets, job)?;
    drop(saved);

    let tty = std::io::stdin().is_terminal();
    on_start(&format!(
        "kiln boot: {} ({mode} start{}){}",
        img.name,
        if want_net {
            ", network through passt"
        } else {
            ""
        },
        if tty { "; Ctrl-A X quits" } else { "" }
    ));
    let raw_mode = if tty {
        kiln_sys::term::SavedTerminal::raw(0)
    } else {
        None
    };
    // Keys: one thread reads the terminal; the escape decoder runs here.
    let (keys_tx, keys) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys_tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (sig_tx, signals) = mpsc::channel::<i32>();
    let _ = kiln_sys::signal::on_stop_signals(move |s| sig_tx.send(s).is_ok());

    let mut escape = Escape::new(false);
    let mut stdout = std::io::stdout();
    let mut tail: Vec<u8> = Vec::new();
    let mut loaded_ms = 0;
    let window = GUEST_ENDS
        .iter()
        .map(|(t, _)| t.len())
        .chain(opts.exit_on.as_ref().map(String::len))
        .max()
        .unwrap_or(0)
        + 4096;
    let end = 'run: loop {
        if signals.try_recv().is_ok() {
            break BootEnd::Signal;
        }
        // Keys typed before v86 runs wait for it (a restore would drop them).
        while let Some(k) = (loaded_ms > 0).then(|| keys.try_recv().ok()).flatten() {
            let mut out = Vec::new();
            let action = escape.feed(&k, &mut out);
            if !out.is_empty() {
                session.send_serial(&out)?;
            }
            if action == Some(EscapeAction::Quit) {
                break 'run BootEnd::Quit;
            }
        }
        match session.next(Duration::from_millis(20)) {
            Some(Event::Serial(b)) => {
                // A closed stdout must not end the machine (or panic): the output is dropped.
                let _ = stdout.write_all(&b).and_then(|_| stdout.flush());
                tail.extend_from_slice(&b);
                let text = String::from_utf8_lossy(&tail);
                if let Some(m) = &opts.exit_on {
                    if text.contains(m.as_str()) {
                        break BootEnd::ExitOn;
                    }
                }
                if let Some((_, e)) = GUEST_ENDS.iter().find(|(t, _)| text.contains(t)) {
                    break *e;
                }
                if tail.len() > window {
                    tail.drain(..tail.len() - window);
                }
            }
            Some(Event::Loaded(_)) => loaded_ms = (t0.elapsed().as_millis() as u64).max(1),
            Some(Event::Saved(_)) | None => {}
            Some(Event::Failed(m)) => {
                drop(raw_mode);
                return Err(WebError::bad(image, format!("v86 failed: {m}")));
            }
            Some(Event::Exited) => {
                drop(raw_mode);
                return Err(WebError::bad(image, "v86 (Node) ended unexpectedly"));
            }
        }
    };
    let mut saved_bytes = None;
    let mut state_removed = false;
    if opts.save {
        match end {
            BootEnd::PoweredOff | BootEnd::Reset => {
                for name in [crate::linux::STATE_FILE, crate::linux::RAW_STATE_FILE] {
                    state_removed |= std::fs::remove_file(img.dir.join(name)).is_ok();
                }
            }
            _ => {
                let raw = session.save(Duration::from_secs(120), &mut |b| {
                    let _ = stdout.write_all(b);
                })?;
                let path = img.dir.join(crate::linux::STATE_FILE);
                let (raw, _) = state::check_state(&path, &raw, &img)?;
                saved_bytes = Some(state::save(&img, &raw, state::LEVEL)?);
            }
        }
    }
    session.quit();
    drop(passt);
    drop(raw_mode);
    Ok(BootReport {
        mode,
        loaded_ms,
        end,
        saved_bytes,
        state_removed,
    })
}

/// A child process killed and reaped when dropped (passt).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
