//! The single vCPU: real-mode setup and the "kick" used to pull it out of KVM_RUN.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::vm::KvmVm;
use crate::VmmError;

/// Offset from SIGRTMIN of the signal used to kick the vCPU thread out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 3;

thread_local! {
    /// kvm_run of the vCPU the current thread is running, for the kick signal handler.
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const thread-local read and a byte store. Setting
    // immediate_exit closes the race where the kick lands just before KVM_RUN.
    let ptr = RUN_PTR.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: RUN_PTR is only non-null while `Vcpu::run_guard` keeps the vCPU (and
        // its kvm_run mapping) alive on this thread.
        unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the (process-wide, no-op apart from immediate_exit) kick signal handler once.
pub(crate) fn register_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // The handler only does async-signal-safe work (see kick_handler).
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            result = Err(VmmError::Config(format!(
                "cannot install the vCPU kick signal handler: {e}"
            )));
        }
    });
    result
}

/// Sends the kick signal to `thread` (which is inside `Vm::run`).
pub(crate) fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: the caller holds the shared lock, so `thread` is still inside `run`.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// The one vCPU of a kiln VM.
#[derive(Debug)]
pub struct Vcpu {
    /// The KVM vCPU fd.
    pub fd: VcpuFd,
}

/// Clears the thread-local kvm_run pointer when `run` ends.
pub(crate) struct RunGuard;

impl Drop for RunGuard {
    fn drop(&mut self) {
        RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }
}

impl Vcpu {
    /// Creates vCPU 0.
    pub fn new(vm: &KvmVm) -> Result<Vcpu, VmmError> {
        let fd = vm
            .fd
            .create_vcpu(0)
            .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { fd })
    }

    /// Publishes this vCPU's kvm_run to the kick handler of the current thread.
    pub(crate) fn run_guard(&mut self) -> RunGuard {
        let ptr: *mut kvm_run = self.fd.get_kvm_run();
        RUN_PTR.with(|p| p.set(ptr));
        RunGuard
    }

    /// Puts the vCPU in real mode at `cs:ip` with registers as a BIOS leaves them for a
    /// boot sector: DL = boot drive, DS = ES = SS = 0, SP = 0x7C00, IF set.
    pub fn set_boot_state(&mut self, cs: u16, ip: u16, drive: u8) -> Result<(), VmmError> {
        let mut sregs: kvm_sregs = self
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        sregs.cs.selector = cs;
        sregs.cs.base = u64::from(cs) << 4;
        for seg in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.selector = 0;
            seg.base = 0;
            seg.limit = 0xffff;
        }
        // Real mode, caches on (CD/NW clear) like a BIOS hands over.
        sregs.cr0 &= !0x6000_0001;
        self.fd
            .set_sregs(&sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: u64::from(ip),
            rdx: u64::from(drive),
            rsp: 0x7c00,
            rflags: 0x202,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))
    }

    /// Clears a pending kick so the next KVM_RUN enters the guest.
    pub(crate) fn clear_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    /// KVM_INTERNAL_ERROR suberror of the last exit.
    pub(crate) fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: only called right after a KVM_EXIT_INTERNAL_ERROR, when `internal` is
        // the active union member.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// CS selector and RIP now (for error reports; zeros if they cannot be read).
    pub(crate) fn cs_ip(&self) -> (u16, u64) {
        match (self.fd.get_sregs(), self.fd.get_regs()) {
            (Ok(s), Ok(r)) => (s.cs.selector, r.rip),
            _ => (0, 0),
        }
    }
}
