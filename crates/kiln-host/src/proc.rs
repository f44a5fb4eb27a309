//! Process liveness through /proc, robust to zombies and pid reuse.

use std::fs;

/// The start time (clock ticks since boot, field 22 of /proc/PID/stat) of a live process;
/// `None` when it does not exist or is a zombie.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
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
pub(crate) fn alive(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Sends `sig` to `pid`; false when it is gone.
pub(crate) fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) with a plain pid and signal number has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
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
    }
}
