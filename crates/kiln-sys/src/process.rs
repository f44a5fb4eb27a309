//! Processes: liveness robust to zombies and pid reuse, signals, memory, and what a child is set
//! up with before it runs (parent-death signal, its own session, no inherited descriptors).

use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The start time (clock ticks since boot, field 22 of /proc/PID/stat) of a live process;
/// `None` when it does not exist or is a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True when `pid` runs and, if `started` is known, is the same process (not a reused pid).
pub fn alive(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Sends `sig` to `pid`; false when it is gone (or not ours).
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negative pids address process groups: never what a caller means here.
        return false;
    }
    // SAFETY: kill(2) with a positive pid and a signal number touches no memory of ours.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Resident set size of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A callback to run once something (a process, a vCPU thread) has ended, whichever of "the
/// end" and "the callback is registered" comes first.
#[derive(Default)]
pub struct EndHook {
    inner: std::sync::Mutex<HookState>,
}

/// Whether the end happened, and who to tell when it does.
type HookState = (bool, Option<Box<dyn FnOnce() + Send>>);

impl EndHook {
    /// Registers `notify`, or runs it now if the end already happened.
    pub fn set(&self, notify: Box<dyn FnOnce() + Send>) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if h.0 {
            drop(h);
            notify();
        } else {
            h.1 = Some(notify);
        }
    }

    /// Records the end and runs a registered callback.
    pub fn fire(&self) {
        let notify = {
            let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            h.0 = true;
            h.1.take()
        };
        if let Some(f) = notify {
            f();
        }
    }
}

/// How a child process is set up between fork and exec.
#[derive(Clone, Debug, Default)]
pub struct ChildSetup {
    /// The child gets SIGKILL when the thread that spawned it dies (no orphan engines).
    pub die_with_parent: bool,
    /// The child leads a new session: no controlling terminal, no signals from the caller's
    /// terminal or process group.
    pub new_session: bool,
    /// Descriptors the child inherits under the same numbers (every other descriptor kiln
    /// opens is close-on-exec): a TAP device or a socket handed to QEMU or passt.
    pub keep_fds: Vec<RawFd>,
}

/// Applies `setup` to `command`'s child (in the forked child, before exec).
pub fn configure(command: &mut Command, setup: ChildSetup) {
    let ChildSetup {
        die_with_parent,
        new_session,
        keep_fds,
    } = setup;
    if !die_with_parent && !new_session && keep_fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // setsid(2) and fcntl(2), which are async-signal-safe, and allocates nothing (keep_fds
    // was allocated before the fork and is only read).
    unsafe {
        command.pre_exec(move || {
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &keep_fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// How running a tool to its end went wrong ([`run_tool`]).
#[derive(Debug)]
pub enum ToolError {
    /// The program is not installed.
    Missing,
    /// Starting it, feeding it its input or waiting for it failed.
    Io(io::Error),
    /// It ran and failed: its exit status and what it printed on stderr.
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The first (or, with `last`, the last) non-empty line of what a tool printed on stderr.
pub fn stderr_line(stderr: &str, last: bool) -> Option<&str> {
    let mut lines = stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    if last {
        lines.next_back()
    } else {
        lines.next()
    }
}

/// Runs `cmd` to its end with `stdin` as its input (none: /dev/null) and returns its stdout;
/// a non-zero exit is [`ToolError::Failed`] with its stderr. For short tools (nft, ip,
/// ssh-keygen, mkfs.ext4): their output is kept in memory.
pub fn run_tool(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Vec<u8>, ToolError> {
    use std::io::Write;
    use std::process::Stdio;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ToolError::Missing,
        _ => ToolError::Io(e),
    })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(bytes).map_err(ToolError::Io)?;
    }
    let out = child.wait_with_output().map_err(ToolError::Io)?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// Marks every descriptor from `first` up close-on-exec, so children started later inherit
/// none of them (a shell's pipes kept open for a VM's lifetime would hang its caller).
pub fn cloexec_from(first: u32) {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC (4) only sets descriptor flags; it closes
    // nothing and touches no memory.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 4u32) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(alive(me, Some(t)));
        assert!(!alive(me, Some(t + 1)));
        assert!(rss_kib(me).unwrap() > 0);
        assert!(!signal(0, 0), "pid 0 is a process group, never signalled");
    }
}
