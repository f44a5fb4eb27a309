//! Emulated devices and the port-I/O / MMIO buses that dispatch guest accesses to them.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod legacy;
pub mod serial;

pub use bus::{Bus, BusDevice, DeviceAction};

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::console::{ConsoleMerge, MergeOrder};

/// The console sink, shared by COM1, int 10h output and the debug port. COM1 and the debug
/// port write to it as [`Write`]; the BIOS screen mirror through [`ConsoleOut::video`]. Both
/// go through one [`ConsoleMerge`] in exact order, so a character the guest writes to the
/// screen and to COM1 reaches the sink once.
#[derive(Clone)]
pub struct ConsoleOut(Arc<Mutex<Sink>>);

struct Sink {
    out: Box<dyn Write + Send>,
    merge: ConsoleMerge,
    buf: Vec<u8>,
}

impl Sink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.out.write_all(&buf).and_then(|_| self.out.flush());
        self.buf = buf;
        self.buf.clear();
        result
    }
}

impl ConsoleOut {
    /// Wraps the caller's sink.
    pub fn new(out: Box<dyn Write + Send>) -> ConsoleOut {
        ConsoleOut(Arc::new(Mutex::new(Sink {
            out,
            merge: ConsoleMerge::new(MergeOrder::Exact),
            buf: Vec::new(),
        })))
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What one int 10h call mirrored (held until the next output event).
    pub fn video(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.sink();
        let Sink { merge, buf, .. } = &mut *s;
        merge.video(bytes, Instant::now(), buf);
        s.send()
    }

    /// The guest waits (`hlt`, a key): show whatever is held.
    pub fn idle(&self) {
        let mut s = self.sink();
        let Sink { merge, buf, .. } = &mut *s;
        merge.flush(buf);
        let _ = s.send();
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut s = self.sink();
        let Sink { merge, buf, .. } = &mut *s;
        merge.serial(bytes, Instant::now(), buf);
        s.send()?;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sink().out.flush()
    }
}
