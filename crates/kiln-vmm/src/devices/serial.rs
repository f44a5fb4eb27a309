//! COM1: a 16550 UART from vm-superio, fed from the shared console input queue.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

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

/// Empty LSR polls in a row, without COM1 output, before the guest counts as idle.
const IDLE_POLLS: u32 = 256;

/// How long an idle guest's LSR read may wait for input, the power button or a kill. Any of
/// those wakes it at once; a guest that polls for other reasons is slowed to ~1000 polls/s.
const IDLE_WAIT: Duration = Duration::from_millis(1);

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    shared: Arc<Shared>,
    /// Consecutive LSR reads that found no input while the guest wrote nothing.
    empty_polls: u32,
}

impl SerialDevice {
    /// A UART writing its output to `out` and reading from the shared input queue.
    pub(crate) fn new(out: Box<dyn Write + Send>, shared: Arc<Shared>) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(NoIrq, out),
            shared,
            empty_polls: 0,
        }
    }

    /// Whether the receive FIFO holds bytes the guest has not read.
    pub(crate) fn has_input(&self) -> bool {
        !self.uart.state().in_buffer.is_empty()
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

impl SerialDevice {
    /// The UART's registers and receive FIFO.
    pub(crate) fn state(&self) -> crate::persist::UartState {
        let s = self.uart.state();
        crate::persist::UartState {
            dll: s.baud_divisor_low,
            dlm: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            rx: s.in_buffer,
        }
    }

    /// Puts the UART back in `state` (its output stays where it went).
    pub(crate) fn restore(&mut self, state: &crate::persist::UartState) -> Result<(), String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.dll,
            baud_divisor_high: state.dlm,
            interrupt_enable: state.ier,
            interrupt_identification: state.iir,
            line_control: state.lcr,
            line_status: state.lsr,
            modem_control: state.mcr,
            modem_status: state.msr,
            scratch: state.scr,
            in_buffer: state.rx.clone(),
        };
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(NoIrq, Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        self.uart = Serial::from_state(&s, NoIrq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("COM1: {e:?}"))?;
        Ok(())
    }
}

impl SerialDevice {
    /// A guest waiting for a key polls the LSR in a tight loop: every poll is a VM exit (several
    /// µs each on a paravirtual KVM) and a host core at 100 %. After [`IDLE_POLLS`] empty polls
    /// with no output, each further empty poll waits up to [`IDLE_WAIT`] for something to
    /// happen, so an idle VM costs almost nothing and still reacts at once.
    fn throttle_idle_poll(&mut self, lsr: u8) {
        const DATA_READY: u8 = 1;
        if lsr & DATA_READY != 0 {
            self.empty_polls = 0;
            return;
        }
        self.empty_polls = self.empty_polls.saturating_add(1);
        if self.empty_polls >= IDLE_POLLS {
            self.shared.wait_new_event(IDLE_WAIT);
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
        if offset == 5 {
            self.throttle_idle_poll(data.first().copied().unwrap_or(0));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        self.empty_polls = 0;
        for (i, b) in data.iter().enumerate() {
            if let Err(e) = self.uart.write((offset as u8).wrapping_add(i as u8), *b) {
                tracing::warn!("COM1 write failed: {e:?}");
            }
        }
        DeviceAction::None
    }
}
