//! Errors of the VMM.

/// Everything that can go wrong creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The errno from the kernel.
        source: kvm_ioctls::Error,
    },
    /// The configuration is not usable.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The boot disk could not be read.
    #[error("boot disk: {what}: {source}")]
    Disk {
        /// What was being read.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The boot disk holds nothing bootable.
    #[error("boot disk is not bootable: {0}")]
    NotBootable(String),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (shutdown) at {cs:04x}:{ip:04x}")]
    TripleFault {
        /// CS selector at the exit.
        cs: u16,
        /// RIP at the exit.
        ip: u64,
    },
    /// KVM could not continue running the guest (KVM_EXIT_INTERNAL_ERROR), e.g. an
    /// instruction the emulator does not handle or, on kvm_pvm, a triple fault.
    #[error("KVM internal error (suberror {suberror}) at {cs:04x}:{ip:04x}: guest crashed or ran an unsupported instruction")]
    InternalError {
        /// KVM_INTERNAL_ERROR_* code.
        suberror: u32,
        /// CS selector at the exit.
        cs: u16,
        /// RIP at the exit.
        ip: u64,
    },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    #[error("VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// hardware_entry_failure_reason.
        reason: u64,
    },
    /// The guest raised a CPU exception that went to the default BIOS vector.
    #[error("guest CPU exception {vector:#04x} at {cs:04x}:{ip:04x}")]
    GuestException {
        /// Interrupt vector (0 = divide error, 6 = invalid opcode, 0x0D = GP, ...).
        vector: u8,
        /// CS of the faulting instruction.
        cs: u16,
        /// IP of the faulting instruction.
        ip: u16,
    },
    /// The guest called int 18h (boot failure / no bootable device).
    #[error("guest called int 18h: boot failed")]
    BootFailed,
    /// A machine state that cannot be saved or restored, or a pause that did not happen.
    #[error("{0}")]
    State(String),
    /// A VM exit this VMM does not handle.
    #[error("unsupported VM exit: {0}")]
    UnsupportedExit(String),
}

impl VmmError {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { op, source }
    }
}
