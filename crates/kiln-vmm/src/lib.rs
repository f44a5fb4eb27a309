//! kiln-vmm: kiln's builtin VMM on KVM.
//!
//! Boots firmware guests (boot sectors, floppies, El Torito CDs with no-emulation,
//! floppy-emulation or hard-disk-emulation boot images) in
//! milliseconds, without QEMU or SeaBIOS. A tiny BIOS is generated in Rust at VM start:
//! the interrupt vectors point at 4-byte stubs (`out 0xEF, al; iret`) and the VMM performs
//! the BIOS service (int 10h/13h/14h/15h/16h/1Ah/11h/12h/19h) on the vCPU registers while the
//! vCPU is stopped on that port exit.
//!
//! Layout follows Firecracker's split: [`vstate`] (memory, vm, vcpu), [`devices`],
//! [`firmware`], [`acpi`].
//!
//! The host KVM may be `kvm_pvm` (no VT-x/SVM; every guest instruction is emulated and
//! each VM exit costs several microseconds), so the design keeps exits few: no in-kernel
//! irqchip (so `hlt` exits to us and can end the VM), guest RAM covers the whole VGA
//! window (0xA0000-0xBFFFF), and every exit is counted ([`ExitCounters`]).
//!
//! ```no_run
//! use kiln_vmm::{BootDevice, MemDisk, Vm, VmConfig, ExitReason};
//! let image = std::fs::read("boot.img").unwrap();
//! let mut vm = Vm::new(VmConfig::default(), Box::new(MemDisk::new(image)), Box::new(std::io::stdout())).unwrap();
//! let handle = vm.handle();
//! std::thread::spawn(move || { std::thread::sleep(std::time::Duration::from_secs(1)); handle.press_power_button(); });
//! assert_eq!(vm.run().unwrap(), ExitReason::PoweredOff);
//! ```

pub mod acpi;
pub mod console;
pub mod devices;
mod disk;
mod error;
pub mod firmware;
pub mod persist;
mod screen;
mod shared;
mod vmm;
pub mod vstate;

pub use console::{ConsoleMerge, MergeOrder};
pub use disk::{Disk, FileDisk, MemDisk};
pub use error::VmmError;
pub use screen::Screenshot;
pub use shared::VmHandle;
pub use vmm::{ExitCounters, ExitReason, Vm};

/// What kind of drive the boot disk is, as the firmware presents it to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootDevice {
    /// Hard disk, BIOS drive 0x80, 512-byte sectors; boots sector 0 at 0000:7C00.
    #[default]
    HardDisk,
    /// Floppy, BIOS drive 0x00, 512-byte sectors, geometry guessed from the image size.
    Floppy,
    /// CD-ROM, BIOS drive 0xE0, 2048-byte sectors; boots the El Torito initial entry.
    /// A no-emulation image starts with DL = 0xE0; a floppy-emulation (1.2M/1.44M/2.88M)
    /// or hard-disk-emulation image becomes read-only drive 0x00 or 0x80 (DL = that drive)
    /// until the guest ends the emulation with int 13h AX=4B00h.
    Cdrom,
}

impl BootDevice {
    /// BIOS drive number handed to the guest in DL.
    pub fn drive_number(self) -> u8 {
        match self {
            BootDevice::HardDisk => 0x80,
            BootDevice::Floppy => 0x00,
            BootDevice::Cdrom => 0xE0,
        }
    }
}

/// What to do with text the guest prints through int 10h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoOutput {
    /// Mirror int 10h text (teletype, AH=09h/0Ah, AH=13h) to the console sink as a
    /// terminal shows it, as well as the VGA text buffer (useful for boot sectors that
    /// only print through the BIOS): code page 437 as UTF-8, relative cursor moves.
    #[default]
    Console,
    /// Only update the VGA text buffer (console then shows COM1 output only, like
    /// QEMU with `-display none -serial stdio`).
    VgaOnly,
}

/// Configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in MiB (at least 2; at most 3584 so it stays below the 32-bit MMIO hole).
    pub ram_mib: u32,
    /// How the boot disk is presented.
    pub boot: BootDevice,
    /// Where int 10h output goes.
    pub video: VideoOutput,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ram_mib: 16,
            boot: BootDevice::HardDisk,
            video: VideoOutput::Console,
        }
    }
}

/// Checks that `/dev/kvm` can be opened and is usable (API version 12, can create a VM).
///
/// Returns a human-readable reason when it is not.
pub fn kvm_available() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(format!("/dev/kvm has API version {api}, expected 12"));
    }
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm cannot create a VM: {e}"))
}
