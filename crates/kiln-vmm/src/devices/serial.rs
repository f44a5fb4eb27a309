//! COM1: a 16550 UART from vm-superio, fed from the shared console input queue.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use super::{BusDevice, DeviceAction};
use crate::shared::Shared;

/// COM1 I/O base.
pub const COM1_BASE: u16 = 0x3f8;

/// Interrupt trigger that does nothing: there is no irqchip, guests poll the LSR.
#[derive(Debug)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    shared: Arc<Shared>,
}

impl SerialDevice {
    /// A UART writing its output to `out` and reading from the shared input queue.
    pub(crate) fn new(out: Box<dyn Write + Send>, shared: Arc<Shared>) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(NoIrq, out),
            shared,
        }
    }

    /// Moves queued console input into the receive FIFO while it has room.
    fn fill_rx(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 {
            return;
        }
        let mut inner = self.shared.lock();
        if inner.input.is_empty() {
            return;
        }
        let n = room.min(inner.input.len());
        let bytes: Vec<u8> = inner.input.iter().take(n).copied().collect();
        if let Ok(taken) = self.uart.enqueue_raw_bytes(&bytes) {
            inner.input.drain(..taken);
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // RBR (0) and LSR (5) are where a polling guest looks for input.
        if offset == 0 || offset == 5 {
            self.fill_rx();
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.uart.read((offset as u8).wrapping_add(i as u8));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        for (i, b) in data.iter().enumerate() {
            if let Err(e) = self.uart.write((offset as u8).wrapping_add(i as u8), *b) {
                tracing::warn!("COM1 write failed: {e:?}");
            }
        }
        DeviceAction::None
    }
}
