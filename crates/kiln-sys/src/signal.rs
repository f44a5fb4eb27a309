//! Termination signals delivered as values on a thread of their own.

use std::io;

/// SIGTERM and SIGHUP: the signals that ask a supervisor to stop its VM.
pub const STOP_SIGNALS: [i32; 2] = [libc::SIGTERM, libc::SIGHUP];

/// Calls `deliver(signal)` on a background thread for every SIGTERM and SIGHUP this process
/// gets, until `deliver` returns false.
pub fn on_stop_signals(mut deliver: impl FnMut(i32) -> bool + Send + 'static) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if !deliver(sig) {
                    break;
                }
            }
        })?;
    Ok(())
}

/// Restores the default action of SIGPIPE (Rust ignores it), so a command whose output is
/// closed (`kiln inspect big.vmdk | head -1`) ends quietly, as every Unix filter does, instead
/// of failing on the next write.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler and touches no memory of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
