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

// Consoles: one escape sequence for all of them (kiln-host's consoles, kiln-web's `kiln boot`).
// Keys: Ctrl-A X quits, Ctrl-A D detaches (only where there is something to detach from),
// Ctrl-A Ctrl-A sends one Ctrl-A.

/// Ctrl-A, the console escape (as in QEMU and screen).
pub const ESCAPE: u8 = 0x01;

/// The line shown when a console opens on a terminal.
pub fn escape_help(detach: bool) -> &'static str {
    if detach {
        "Ctrl-A X quits (ends the VM), Ctrl-A D detaches"
    } else {
        "Ctrl-A X quits"
    }
}

/// What a key press sequence asks for besides data for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscapeAction {
    Quit,
    Detach,
}

/// The escape-sequence decoder: feeds bytes typed by the user, yields what goes to the guest.
#[derive(Clone, Debug, Default)]
pub struct Escape {
    pending: bool,
    /// Whether Ctrl-A D detaches (else it is passed on like any other key).
    pub detach: bool,
}

impl Escape {
    /// A decoder; `detach` makes Ctrl-A D detach.
    pub fn new(detach: bool) -> Escape {
        Escape {
            pending: false,
            detach,
        }
    }

    /// Splits `input` into the bytes for the guest (appended to `out`) and the first action,
    /// if any; bytes after an action are dropped.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<EscapeAction> {
        for &b in input {
            if !self.pending {
                if b == ESCAPE {
                    self.pending = true;
                } else {
                    out.push(b);
                }
                continue;
            }
            self.pending = false;
            match b {
                b'x' | b'X' => return Some(EscapeAction::Quit),
                b'd' | b'D' if self.detach => return Some(EscapeAction::Detach),
                // Ctrl-A Ctrl-A sends one Ctrl-A; any other key after Ctrl-A goes as itself.
                other => out.push(other),
            }
        }
        None
    }
}
