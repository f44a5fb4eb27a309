//! Guest physical memory layout and allocation.
//!
//! ```text
//! 0x00000 - 0x9FFFF  RAM (IVT, BDA, boot sector, EBDA at 0x9FC00)
//! 0xA0000 - 0xB7FFF  hole: VGA graphics window, MMIO (unhandled, reads all-ones)
//! 0xB8000 - 0xBFFFF  RAM: VGA text buffer (guest writes cost no exit)
//! 0xC0000 - end      RAM (0xE0000 ACPI tables, 0xF0000 BIOS, 0x100000 high memory)
//! ```

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::VmmError;

/// Guest memory type used throughout the VMM.
pub type GuestMem = GuestMemoryMmap<()>;

/// Start of the VGA graphics hole.
pub const VGA_HOLE_START: u64 = 0xA_0000;
/// Start of the VGA text buffer (RAM).
pub const VGA_TEXT_START: u64 = 0xB_8000;
/// Size of the VGA text buffer region.
pub const VGA_TEXT_SIZE: u64 = 0x8000;
/// Start of RAM above the VGA area.
pub const UPPER_START: u64 = 0xC_0000;
/// Start of memory above 1 MiB.
pub const HIGH_START: u64 = 0x10_0000;
/// Largest supported RAM so everything stays below the 32-bit PCI/APIC hole.
pub const MAX_RAM_MIB: u32 = 3584;

/// Allocates guest RAM of `ram_mib` MiB with the layout above.
pub fn create_guest_memory(ram_mib: u32) -> Result<GuestMem, VmmError> {
    if !(2..=MAX_RAM_MIB).contains(&ram_mib) {
        return Err(VmmError::Config(format!(
            "ram_mib = {ram_mib}: must be between 2 and {MAX_RAM_MIB}"
        )));
    }
    let size = u64::from(ram_mib) << 20;
    let ranges = [
        (GuestAddress(0), VGA_HOLE_START as usize),
        (GuestAddress(VGA_TEXT_START), VGA_TEXT_SIZE as usize),
        (GuestAddress(UPPER_START), (size - UPPER_START) as usize),
    ];
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::Memory(e.to_string()))
}
