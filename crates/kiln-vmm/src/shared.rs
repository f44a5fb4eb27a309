//! State shared between the vCPU thread and [`VmHandle`]s on other threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ExitCounters;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Mutable shared state, behind one mutex.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// Console input not yet taken by the UART or int 16h.
    pub input: VecDeque<u8>,
    /// Power button pressed and not yet latched into PM1_STS.
    pub power_button: bool,
    /// Bumped on every input, button press or kill, to wake `wait_new_event`.
    pub events: u64,
    /// pthread running `Vm::run`, to kick it out of KVM_RUN.
    pub vcpu_thread: Option<libc::pthread_t>,
    /// The vCPU thread is parked.
    pub parked: bool,
    /// A save of the machine asked of the parked vCPU thread.
    pub save: Option<std::path::PathBuf>,
    /// How the last save went.
    pub saved: Option<Result<(), String>>,
}

/// Exit counters, readable from any thread while the VM runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub hlt: AtomicU64,
    pub bios: AtomicU64,
    pub total: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ExitCounters {
        ExitCounters {
            io: self.io.load(Ordering::Relaxed),
            mmio: self.mmio.load(Ordering::Relaxed),
            hlt: self.hlt.load(Ordering::Relaxed),
            bios: self.bios.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
    pub killed: AtomicBool,
    /// A pause is asked for: the vCPU thread parks between instructions until it is lifted.
    /// Read without the lock (the vCPU loop checks it on every exit); changed only under it,
    /// so a waiter on `wake` cannot miss the change.
    pub pause: AtomicBool,
    pub counters: Counters,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until console input is queued or the VM is killed.
    pub fn wait_input(&self) {
        let guard = self.lock();
        drop(
            self.wake
                .wait_while(guard, |g| {
                    g.input.is_empty() && !self.paused() && !self.killed.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Blocks until a new event (input, power button, kill) arrives or `timeout` passes.
    pub fn wait_new_event(&self, timeout: Duration) {
        let start = self.lock().events;
        self.wait_new_event_since(start, timeout);
    }

    /// Blocks until an event newer than the count `start` (an earlier `events`) arrives or
    /// `timeout` passes: one that came meanwhile returns at once.
    pub fn wait_new_event_since(&self, start: u64, timeout: Duration) {
        let guard = self.lock();
        drop(
            self.wake
                .wait_timeout_while(guard, timeout, |g| {
                    g.events == start && !self.killed.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Whether a pause is asked for.
    pub fn paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    pub(crate) fn notify(&self) {
        self.wake.notify_all();
    }

    /// Waits on the shared condition (every change above notifies it), at most `timeout`.
    pub(crate) fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Inner>,
        timeout: Duration,
    ) -> MutexGuard<'a, Inner> {
        self.wake
            .wait_timeout(guard, timeout)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }
}

/// A cheap, cloneable, thread-safe handle to control a running [`crate::Vm`].
#[derive(Debug, Clone)]
pub struct VmHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) mem: crate::vstate::memory::GuestMem,
}

impl VmHandle {
    /// A picture of the guest's screen as it is now (see [`crate::Screenshot`]).
    pub fn screenshot(&self) -> crate::Screenshot {
        crate::screen::capture(&self.mem)
    }

    /// Presses the ACPI power button: sets PWRBTN_STS (bit 8 of PM1a_STS at port 0x600).
    ///
    /// There is no irqchip, so no SCI is raised; guests see the press by polling PM1_STS.
    pub fn press_power_button(&self) {
        // No kick: the guest sees the press on its next PM1_STS read (an exit anyway).
        {
            let mut inner = self.shared.lock();
            inner.power_button = true;
            inner.events += 1;
        }
        self.shared.notify();
    }

    /// Stops the VM: `Vm::run` returns `ExitReason::Killed` promptly, even if the guest
    /// spins without exits or waits for input.
    ///
    /// The kill is permanent: later `run` calls return `Killed` at once. It interrupts
    /// KVM_RUN with a real-time signal (SIGRTMIN+3) sent to the thread inside `run`.
    pub fn kill(&self) {
        self.shared.killed.store(true, Ordering::SeqCst);
        self.shared.lock().events += 1;
        self.shared.notify();
        self.kick();
    }

    /// Queues console input bytes; the guest reads them through COM1 (when it polls the
    /// UART and its receive FIFO has room) or through int 16h, whichever asks first.
    pub fn send_input(&self, bytes: &[u8]) {
        {
            let mut inner = self.shared.lock();
            inner.input.extend(bytes.iter().copied());
            inner.events += 1;
        }
        self.shared.notify();
    }

    /// VM-exit counters so far (also while the VM runs).
    pub fn counters(&self) -> ExitCounters {
        self.shared.counters.snapshot()
    }

    /// Pauses the guest between two instructions (also one waiting in the BIOS for a key):
    /// returns once the vCPU thread is parked, or fails after `timeout` (the VM is not
    /// running, or has ended).
    pub fn pause(&self, timeout: Duration) -> Result<(), crate::VmmError> {
        {
            let mut inner = self.shared.lock();
            self.shared.pause.store(true, Ordering::SeqCst);
            inner.events += 1;
        }
        self.shared.notify();
        self.kick();
        let deadline = std::time::Instant::now() + timeout;
        let mut inner = self.shared.lock();
        while !inner.parked {
            let now = std::time::Instant::now();
            if now >= deadline || self.shared.killed.load(Ordering::SeqCst) {
                self.shared.pause.store(false, Ordering::SeqCst);
                return Err(crate::VmmError::State(format!(
                    "the VM did not pause within {} ms (is it running?)",
                    timeout.as_millis()
                )));
            }
            inner = self.shared.wait(inner, deadline - now);
        }
        Ok(())
    }

    /// Writes the paused machine to the new file `path` (see [`crate::persist`]).
    pub fn save(&self, path: &std::path::Path) -> Result<(), crate::VmmError> {
        let mut inner = self.shared.lock();
        if !inner.parked {
            return Err(crate::VmmError::State("the VM is not paused".into()));
        }
        inner.saved = None;
        inner.save = Some(path.to_path_buf());
        self.shared.notify();
        loop {
            if let Some(result) = inner.saved.take() {
                return result.map_err(crate::VmmError::State);
            }
            if !inner.parked {
                return Err(crate::VmmError::State(
                    "the VM ended while it was saved".into(),
                ));
            }
            inner = self.shared.wait(inner, Duration::from_secs(1));
        }
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) {
        {
            let mut inner = self.shared.lock();
            self.shared.pause.store(false, Ordering::SeqCst);
            inner.events += 1;
        }
        self.shared.notify();
    }

    /// Interrupts KVM_RUN on the vCPU thread (if it is inside `run`).
    fn kick(&self) {
        let guard = self.shared.lock();
        if let Some(thread) = guard.vcpu_thread {
            crate::vstate::vcpu::kick_thread(thread);
        }
    }
}
