//! Emulated devices and the port-I/O / MMIO buses that dispatch guest accesses to them.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod legacy;
pub mod serial;

pub use bus::{Bus, BusDevice, DeviceAction};

use std::io::Write;
use std::sync::{Arc, Mutex};

/// The console sink, shared by COM1, int 10h output and the debug port.
#[derive(Clone)]
pub struct ConsoleOut(Arc<Mutex<Box<dyn Write + Send>>>);

impl ConsoleOut {
    /// Wraps the caller's sink.
    pub fn new(out: Box<dyn Write + Send>) -> ConsoleOut {
        ConsoleOut(Arc::new(Mutex::new(out)))
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}
