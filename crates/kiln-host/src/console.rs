//! The serial console of a running VM (a Unix socket QEMU serves) and its log.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Host, HostError, VmState};

/// Ctrl-] leaves an interactive console, as in telnet.
pub const DETACH_KEY: u8 = 0x1d;

/// How a console session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user pressed Ctrl-] (interactive).
    Detached,
    /// Input ended and the output went quiet (pipes).
    InputDone,
    /// The VM closed the console: it ended.
    VmEnded,
}

/// Connects to `socket` and relays stdin to the guest's serial port and its output to stdout.
/// `interactive` puts a terminal stdin in raw mode and makes Ctrl-] detach; otherwise stdin is
/// sent as is and, once it ends, output is relayed until `linger` passes without any.
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
        RawMode::enable(0)
    } else {
        None
    };
    relay(stream, interactive, linger)
}

fn relay(
    mut stream: UnixStream,
    interactive: bool,
    linger: Duration,
) -> Result<ConsoleEnd, HostError> {
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    let mut quiet_since = Instant::now();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: 0,
                events: if stdin_open { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        let n_fds = if stdin_open { 2 } else { 1 };
        // SAFETY: poll on a valid array of pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n_fds, 100) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(HostError::io("console: poll failed", e));
        }
        if fds[0].revents != 0 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(ConsoleEnd::VmEnded),
                Ok(n) => {
                    let _ = stdout.write_all(&buf[..n]);
                    let _ = stdout.flush();
                    quiet_since = Instant::now();
                }
            }
        }
        if stdin_open && fds[1].revents != 0 {
            // SAFETY: read(2) into our buffer from fd 0.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                stdin_open = false;
                quiet_since = Instant::now();
            } else {
                let data = &buf[..n as usize];
                if interactive {
                    if let Some(i) = data.iter().position(|&b| b == DETACH_KEY) {
                        let _ = stream.write_all(&data[..i]);
                        return Ok(ConsoleEnd::Detached);
                    }
                }
                stream
                    .write_all(data)
                    .map_err(|e| HostError::io("console: cannot write to the guest", e))?;
            }
        }
        if !stdin_open && quiet_since.elapsed() >= linger {
            return Ok(ConsoleEnd::InputDone);
        }
    }
}

/// A terminal in raw mode, restored on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enable(fd: i32) -> Option<RawMode> {
        // SAFETY: tcgetattr/tcsetattr on fd with a zeroed struct it fills.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores attributes read from the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

impl Host {
    /// Writes the VM's serial log to `out`; with `follow`, keeps writing what the guest prints
    /// until the VM stops.
    pub fn write_log(
        &self,
        name: &str,
        follow: bool,
        out: &mut dyn Write,
    ) -> Result<(), HostError> {
        let rec = self.get(name)?;
        let path = &rec.meta.log;
        let mut pos = 0u64;
        loop {
            let running = follow && self.get(name)?.effective_state() != VmState::Stopped;
            match fs::File::open(path) {
                Ok(mut f) => {
                    f.seek(SeekFrom::Start(pos)).map_err(|e| {
                        HostError::io(format!("{}: cannot read", path.display()), e)
                    })?;
                    let mut chunk = Vec::new();
                    f.read_to_end(&mut chunk).map_err(|e| {
                        HostError::io(format!("{}: cannot read", path.display()), e)
                    })?;
                    pos += chunk.len() as u64;
                    if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                        return Ok(()); // the reader went away (a closed pipe)
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HostError::io(format!("{}: cannot read", path.display()), e)),
            }
            if !running {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
