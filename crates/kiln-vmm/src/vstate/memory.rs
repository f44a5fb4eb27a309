//! Guest physical memory layout and allocation.
//!
//! ```text
//! 0x00000 - 0x9FFFF  RAM (IVT, BDA, boot sector, EBDA at 0x9FC00)
//! 0xA0000 - 0xBFFFF  RAM: the VGA window (mode 13h pixels at 0xA0000, mode 07h text at
//!                    0xB0000, colour text at 0xB8000); guest writes cost no exit
//! 0xC0000 - end      RAM (0xE0000 ACPI tables, 0xF0000 BIOS, 0x100000 high memory)
//! ```
//!
//! All of it is one contiguous memory slot; MMIO exits only happen above the end of RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::VmmError;

/// Guest memory type used throughout the VMM.
pub type GuestMem = GuestMemoryMmap<()>;

/// Start of the VGA window (RAM): mode 13h's 320x200 pixels.
pub const VGA_GRAPHICS_START: u64 = 0xA_0000;
/// Start of the monochrome (mode 07h) text buffer.
pub const VGA_MONO_TEXT_START: u64 = 0xB_0000;
/// Start of the colour text buffer.
pub const VGA_TEXT_START: u64 = 0xB_8000;
/// Size of the colour text buffer region.
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
    let ranges = [(GuestAddress(0), size as usize)];
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::Memory(e.to_string()))
}
