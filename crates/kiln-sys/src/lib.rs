//! kiln's one system-call module: every `unsafe` call into libc that kiln makes for terminals,
//! file locks, signals, processes and sparse files lives here, each justified, behind a safe function; and
//! the temporary-file discipline every writer shares ([`temp`]).
//! Everything above it (kiln-host, the CLI, the engines) is safe Rust.

pub mod fs;
pub mod lock;
pub mod net;
pub mod process;
pub mod signal;
pub mod sparse;
pub mod temp;
pub mod term;

/// Now as RFC 3339 UTC with milliseconds (`2025-01-31T12:34:56.789Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// How long ago the RFC 3339 time `at` was (`None` for a time that cannot be read, or one in
/// the future).
pub fn age(at: &str) -> Option<std::time::Duration> {
    let then = humantime::parse_rfc3339(at).ok()?;
    std::time::SystemTime::now().duration_since(then).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_rfc3339_utc_with_millis() {
        let now = super::now_rfc3339();
        assert!(super::age(&now).is_some_and(|a| a.as_secs() < 60), "{now}");
        assert_eq!(super::age("yesterday"), None);
        assert_eq!(now.len(), "2025-01-31T12:34:56.789Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
        assert!(humantime::parse_rfc3339(&now).is_ok(), "{now}");
    }
}
