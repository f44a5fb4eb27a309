//! The VM object: builds everything and runs the vCPU loop.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VcpuExit;

use crate::devices::acpi_pm::{AcpiPm, SmiCmd, PM_BASE, PM_LEN, SMI_CMD_PORT};
use crate::devices::cmos::Cmos;
use crate::devices::legacy::{DebugCon, Port92, Quiet, ResetControl, I8042};
use crate::devices::serial::{SerialDevice, COM1_BASE};
use crate::devices::{Bus, BusDevice, ConsoleOut, DeviceAction};
use crate::firmware::{Firmware, ServiceOutcome, SERVICE_PORT};
use crate::shared::{Counters, Shared};
use crate::vstate::memory::{create_guest_memory, GuestMem};
use crate::vstate::vcpu::{register_kick_handler, Vcpu};
use crate::vstate::vm::KvmVm;
use crate::{BootDevice, Disk, VmConfig, VmHandle, VmmError};

/// Unclaimed ports are logged once per block of 16.
const PIO_REGION_SHIFT: u32 = 4;
/// Unclaimed MMIO is logged once per 4 KiB page.
const MMIO_REGION_SHIFT: u32 = 12;

/// Why [`Vm::run`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest entered ACPI S5 (PM1a_CNT SLP_EN with SLP_TYP 0).
    PoweredOff,
    /// The guest asked for a reset (i8042 0xFE, port 0x92 bit 0, 0xCF9, or a jump to the
    /// reset vector). Calling `run` again reboots from the disk.
    Reset,
    /// [`VmHandle::kill`] was called.
    Killed,
    /// The guest executed `hlt` with interrupts disabled: it can never continue.
    Halted,
}

/// VM-exit counters. Every KVM_RUN return is one exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounters {
    /// Port I/O exits (including BIOS service traps).
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// `hlt` exits.
    pub hlt: u64,
    /// BIOS service calls (a subset of `io`).
    pub bios: u64,
    /// All exits.
    pub total: u64,
}

/// A kiln VM: one real-mode vCPU, guest RAM, the built-in BIOS and legacy devices.
pub struct Vm {
    // Field order is drop order: vCPU and VM fds go before the memory they map.
    vcpu: Vcpu,
    _kvm: KvmVm,
    pio: Bus,
    mmio: Bus,
    firmware: Firmware,
    shared: Arc<Shared>,
    config: VmConfig,
    needs_reboot: bool,
    /// The devices whose state a snapshot holds (COM1 is the firmware's `com1`).
    pm: Arc<Mutex<AcpiPm>>,
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    mem: GuestMem,
}

fn locked<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The name a state file records for `boot`.
fn boot_name(boot: BootDevice) -> &'static str {
    match boot {
        BootDevice::HardDisk => "hard-disk",
        BootDevice::Floppy => "floppy",
        BootDevice::Cdrom => "cdrom",
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("firmware", &self.firmware)
            .field("pio", &self.pio)
            .finish()
    }
}

fn dev<D: BusDevice + 'static>(d: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

impl Vm {
    /// Creates the VM: guest memory, KVM VM and vCPU, devices, firmware, ACPI tables, and
    /// loads the boot code from `disk` (checking the 0x55AA signature, or El Torito).
    ///
    /// `console_out` receives COM1 output, debug-port (0xE9) output and, with
    /// [`crate::VideoOutput::Console`], int 10h text.
    pub fn new(
        config: VmConfig,
        disk: Box<dyn Disk>,
        console_out: Box<dyn std::io::Write + Send>,
    ) -> Result<Vm, VmmError> {
        register_kick_handler()?;
        let mem = create_guest_memory(config.ram_mib)?;
        let ram_bytes = u64::from(config.ram_mib) << 20;
        let kvm = KvmVm::new(&mem)?;
        let vcpu = Vcpu::new(&kvm)?;
        let shared = Arc::new(Shared::default());
        let console = ConsoleOut::new(console_out);

        let mut pio = Bus::new("pio", PIO_REGION_SHIFT);
        let pm = Arc::new(Mutex::new(AcpiPm::new(shared.clone())));
        let mut add = |base: u16, len: u16, d: Arc<Mutex<dyn BusDevice>>| {
            pio.insert(u64::from(base), u64::from(len), d)
                .map_err(VmmError::Config)
        };
        // int 14h sends and receives through the same UART the guest's port I/O reaches.
        let com1 = Arc::new(Mutex::new(SerialDevice::new(
            Box::new(console.clone()),
            shared.clone(),
        )));
        add(COM1_BASE, 8, com1.clone())?;
        add(PM_BASE, PM_LEN, pm.clone())?;
        add(SMI_CMD_PORT, 1, dev(SmiCmd(pm.clone())))?;
        let i8042 = Arc::new(Mutex::new(I8042::default()));
        add(0x60, 5, i8042.clone())?;
        let cmos = Arc::new(Mutex::new(Cmos::new(
            ram_bytes,
            config.boot == BootDevice::Floppy,
        )));
        add(0x70, 2, cmos.clone())?;
        add(0x80, 1, dev(Quiet))?;
        add(0xed, 1, dev(Quiet))?;
        add(0x92, 1, dev(Port92))?;
        add(0xcf9, 1, dev(ResetControl))?;
        add(0xe9, 1, dev(DebugCon(console.clone())))?;

        let mut firmware = Firmware::new(
            config.boot,
            disk,
            ram_bytes,
            console,
            config.video,
            shared.clone(),
            com1,
        );
        let mut vm = Vm {
            vcpu,
            _kvm: kvm,
            pio,
            mmio: Bus::new("mmio", MMIO_REGION_SHIFT),
            firmware: {
                firmware.install(&mem)?;
                firmware
            },
            shared,
            config,
            needs_reboot: false,
            pm,
            cmos,
            i8042,
            mem,
        };
        vm.boot()?;
        Ok(vm)
    }

    /// Creates the VM as [`Vm::new`] does, then puts it in the state saved in `path` (see
    /// [`crate::persist`]): it continues where that machine was paused instead of booting.
    /// The disk must hold what it held then.
    pub fn restore(
        config: VmConfig,
        disk: Box<dyn Disk>,
        console_out: Box<dyn std::io::Write + Send>,
        path: &std::path::Path,
    ) -> Result<Vm, VmmError> {
        let h = crate::persist::load_header(path, config.ram_mib, boot_name(config.boot))?;
        let mut vm = Vm::new(config, disk, console_out)?;
        crate::persist::load_memory(path, &h, &vm.mem)?;
        let bad = |what: &str, e: kvm_ioctls::Error| {
            crate::persist::bad(path, format!("KVM refused its {what}: {e}"))
        };
        vm.vcpu
            .fd
            .set_sregs(&h.sregs)
            .map_err(|e| bad("segment registers", e))?;
        vm.vcpu
            .fd
            .set_regs(&h.regs)
            .map_err(|e| bad("registers", e))?;
        vm.vcpu
            .fd
            .set_vcpu_events(&h.events)
            .map_err(|e| bad("pending events", e))?;
        locked(&vm.firmware.com1)
            .restore(&h.uart)
            .map_err(|e| crate::persist::bad(path, e))?;
        locked(&vm.pm).restore(h.pm);
        locked(&vm.cmos).restore(h.cmos_index, &h.cmos);
        locked(&vm.i8042).set_port61(h.port61);
        vm.firmware.disk_status = h.disk_status;
        if !h.emulation {
            vm.firmware.emulation = None;
        }
        vm.firmware.mirror.set_position(h.mirror);
        {
            let mut inner = vm.shared.lock();
            inner.input = h.input.iter().copied().collect();
            inner.power_button = h.power_button;
        }
        Ok(vm)
    }

    /// Writes the machine to the new file `path`; called on the vCPU thread while parked.
    fn save_state(&mut self, path: &std::path::Path) -> Result<(), VmmError> {
        let regs = self
            .vcpu
            .fd
            .get_regs()
            .map_err(VmmError::kvm("KVM_GET_REGS"))?;
        let sregs = self
            .vcpu
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        let events = self
            .vcpu
            .fd
            .get_vcpu_events()
            .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?;
        let (cmos_index, cmos) = locked(&self.cmos).state();
        let (input, power_button) = {
            let inner = self.shared.lock();
            (inner.input.iter().copied().collect(), inner.power_button)
        };
        let mut h = crate::persist::Header {
            ram_mib: self.config.ram_mib,
            boot: boot_name(self.config.boot).into(),
            memory_offset: 0,
            regs,
            sregs,
            events,
            uart: locked(&self.firmware.com1).state(),
            pm: locked(&self.pm).state(),
            cmos_index,
            cmos,
            port61: locked(&self.i8042).port61(),
            disk_status: self.firmware.disk_status,
            emulation: self.firmware.emulation.is_some(),
            mirror: self.firmware.mirror.position(),
            input,
            power_button,
        };
        crate::persist::save(path, &mut h, &self.mem)
    }

    /// Parks the vCPU thread while a pause is asked for, saving the machine when asked.
    /// Returns `Killed` if the VM is killed meanwhile.
    fn park(&mut self) -> Option<ExitReason> {
        self.firmware.console.idle();
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        inner.parked = true;
        shared.notify();
        loop {
            if shared.killed.load(Ordering::SeqCst) {
                inner.parked = false;
                shared.notify();
                return Some(ExitReason::Killed);
            }
            if let Some(path) = inner.save.take() {
                drop(inner);
                let result = self.save_state(&path).map_err(|e| e.to_string());
                inner = shared.lock();
                inner.saved = Some(result);
                shared.notify();
                continue;
            }
            if !shared.paused() {
                inner.parked = false;
                shared.notify();
                return None;
            }
            inner = shared.wait(inner, Duration::from_secs(1));
        }
    }

    fn boot(&mut self) -> Result<(), VmmError> {
        let (cs, ip) = self.firmware.load_boot(&self.mem)?;
        self.vcpu.set_boot_state(cs, ip, self.firmware.boot_drive())
    }

    /// A handle to press the power button, send input or kill the VM from other threads.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
            mem: self.mem.clone(),
        }
    }

    /// Exit counters so far.
    pub fn counters(&self) -> ExitCounters {
        self.shared.counters.snapshot()
    }

    /// The VGA text screen as text: one line per row (25 rows of 80 or 40 columns, as the
    /// current mode has them), code page 437 shown as Unicode, trailing blanks trimmed;
    /// empty while a graphics mode (13h) is set.
    pub fn screen_text(&self) -> String {
        crate::firmware::screen_text(&self.mem)
    }

    /// Runs the guest on the calling thread until it powers off, resets, halts for good,
    /// is killed, or fails. Never busy-waits: a guest blocked in int 16h or in `hlt`
    /// sleeps until input, a power-button press or a kill.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        if self.needs_reboot {
            self.firmware.install(&self.mem)?;
            self.boot()?;
            self.needs_reboot = false;
        }
        let _run_guard = self.vcpu.run_guard();
        // SAFETY: pthread_self has no preconditions.
        self.shared.lock().vcpu_thread = Some(unsafe { libc::pthread_self() });
        let result = self.run_loop();
        self.firmware.console.idle();
        self.shared.lock().vcpu_thread = None;
        self.vcpu.clear_immediate_exit();
        if let Ok(ExitReason::Reset) = result {
            self.needs_reboot = true;
        }
        result
    }

    fn run_loop(&mut self) -> Result<ExitReason, VmmError> {
        let shared = self.shared.clone();
        let counters = &shared.counters;
        loop {
            if self.shared.killed.load(Ordering::SeqCst) {
                return Ok(ExitReason::Killed);
            }
            if self.shared.paused() {
                if let Some(end) = self.park() {
                    return Ok(end);
                }
            }
            let mut trap = false;
            let mut halted = false;
            let mut action = DeviceAction::None;
            match self.vcpu.fd.run() {
                Ok(exit) => {
                    Counters::bump(&counters.total);
                    match exit {
                        VcpuExit::IoIn(port, data) => {
                            Counters::bump(&counters.io);
                            self.pio.read(u64::from(port), data);
                        }
                        VcpuExit::IoOut(port, data) => {
                            Counters::bump(&counters.io);
                            if port == SERVICE_PORT && data.len() == 1 {
                                trap = true;
                            } else {
                                action = self.pio.write(u64::from(port), data);
                            }
                        }
                        VcpuExit::MmioRead(addr, data) => {
                            Counters::bump(&counters.mmio);
                            self.mmio.read(addr, data);
                        }
                        VcpuExit::MmioWrite(addr, data) => {
                            Counters::bump(&counters.mmio);
                            action = self.mmio.write(addr, data);
                        }
                        VcpuExit::Hlt => {
                            Counters::bump(&counters.hlt);
                            halted = true;
                        }
                        VcpuExit::Intr => {}
                        VcpuExit::Shutdown => {
                            let (cs, ip) = self.vcpu.cs_ip();
                            return Err(VmmError::TripleFault { cs, ip });
                        }
                        VcpuExit::InternalError => {
                            let suberror = self.vcpu.internal_suberror();
                            let (cs, ip) = self.vcpu.cs_ip();
                            return Err(VmmError::InternalError { suberror, cs, ip });
                        }
                        VcpuExit::FailEntry(reason, _) => {
                            return Err(VmmError::FailEntry { reason });
                        }
                        VcpuExit::SystemEvent(kind, _) => {
                            return match kind {
                                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                                    Ok(ExitReason::PoweredOff)
                                }
                                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(ExitReason::Reset),
                                k => Err(VmmError::UnsupportedExit(format!("system event {k}"))),
                            };
                        }
                        other => {
                            return Err(VmmError::UnsupportedExit(format!("{other:?}")));
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked out of KVM_RUN; the loop head checks why.
                    self.vcpu.clear_immediate_exit();
                    continue;
                }
                Err(e) => {
                    return Err(VmmError::Kvm {
                        op: "KVM_RUN",
                        source: e,
                    })
                }
            }
            match action {
                DeviceAction::None => {}
                DeviceAction::PowerOff => return Ok(ExitReason::PoweredOff),
                DeviceAction::Reset => return Ok(ExitReason::Reset),
            }
            if trap {
                match self.firmware.handle_trap(&mut self.vcpu, &self.mem)? {
                    Some(ServiceOutcome::Resume | ServiceOutcome::Retry) => {
                        Counters::bump(&counters.bios)
                    }
                    Some(ServiceOutcome::Exit(reason)) => return Ok(reason),
                    None => {
                        // Not from a BIOS stub: an ordinary write to an unknown port.
                        let _ = self.pio.write(u64::from(SERVICE_PORT), &[0]);
                    }
                }
            }
            if halted {
                let regs = self
                    .vcpu
                    .fd
                    .get_regs()
                    .map_err(VmmError::kvm("KVM_GET_REGS"))?;
                if regs.rflags & 0x200 == 0 {
                    return Ok(ExitReason::Halted);
                }
                // The guest waits: show what the console merge holds.
                self.firmware.console.idle();
                // No interrupt sources exist; sleep until something may have changed
                // (input, power button, kill) or a timer-tick's worth of time passes. Input
                // or a press the guest has not seen yet is what would have raised an
                // interrupt: then `hlt` returns at once.
                let seen = {
                    let inner = self.shared.lock();
                    (inner.input.is_empty() && !inner.power_button).then_some(inner.events)
                };
                let fifo = locked(&self.firmware.com1).has_input();
                if let (Some(seen), false) = (seen, fifo) {
                    self.shared
                        .wait_new_event_since(seen, Duration::from_millis(55));
                }
            }
        }
    }
}
