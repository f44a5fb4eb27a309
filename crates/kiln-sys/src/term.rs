//! Terminals: raw mode for a console, and putting a terminal back the way it was.

/// Whether descriptor `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty(3) only queries the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// A terminal's saved attributes, put back on drop.
pub struct SavedTerminal {
    fd: i32,
    saved: libc::termios,
}

impl SavedTerminal {
    /// Saves `fd`'s attributes when it is a terminal.
    pub fn save(fd: i32) -> Option<SavedTerminal> {
        if !is_tty(fd) {
            return None;
        }
        // SAFETY: termios is a plain C struct; all-zero is a valid value for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr(3) writes into the struct we own and pass by pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        Some(SavedTerminal { fd, saved })
    }

    /// Saves `fd`'s attributes and puts it in raw mode (no echo, no line editing, no signals
    /// from keys, no output processing: the guest sends its own CR LF).
    pub fn raw(fd: i32) -> Option<SavedTerminal> {
        let saved = SavedTerminal::save(fd)?;
        let mut raw = saved.saved;
        // SAFETY: cfmakeraw(3) edits the struct we own; tcsetattr(3) reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw);
        }
        Some(saved)
    }

    /// Puts the saved attributes back now (also done on drop).
    pub fn restore(&self) {
        // SAFETY: tcsetattr(3) reads attributes previously read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

impl Drop for SavedTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}
