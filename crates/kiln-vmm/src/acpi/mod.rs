//! ACPI tables as QEMU presents them to a PIIX4 guest (not hardware-reduced), built
//! with `acpi_tables` and placed in the BIOS area at 0xE0000:
//!
//! ```text
//! 0xE0000 RSDP (revision 0, 20 bytes) -> RSDT
//! 0xE0040 RSDT -> FADT, MADT
//! 0xE0100 FACS (64-byte aligned)
//! 0xE0200 FADT: PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608, SCI 9, SMI_CMD 0xB2
//! 0xE0400 DSDT: Name(_S5_, Package(){0,0,0,0})
//! 0xE0500 MADT: one local APIC, IOAPIC at 0xFEC00000, ISA overrides
//! ```

use acpi_tables::aml::{Name, Package, ZERO};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::acpi_pm::{ACPI_DISABLE, ACPI_ENABLE, PM_BASE, SMI_CMD_PORT};
use crate::vstate::memory::GuestMem;
use crate::VmmError;

/// Base of the ACPI area.
pub const ACPI_BASE: u64 = 0xe_0000;
/// RSDP address.
pub const RSDP_ADDR: u64 = ACPI_BASE;
/// RSDT address.
pub const RSDT_ADDR: u64 = ACPI_BASE + 0x40;
/// FACS address.
pub const FACS_ADDR: u64 = ACPI_BASE + 0x100;
/// FADT address.
pub const FADT_ADDR: u64 = ACPI_BASE + 0x200;
/// DSDT address.
pub const DSDT_ADDR: u64 = ACPI_BASE + 0x400;
/// MADT address.
pub const MADT_ADDR: u64 = ACPI_BASE + 0x500;
/// SCI interrupt.
pub const SCI_IRQ: u16 = 9;

const OEM_ID: [u8; 6] = *b"KILN  ";
const OEM_TABLE: [u8; 8] = *b"KILNVMM ";

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// RSDP revision 0 (ACPI 1.0 form, as QEMU's PC machine), pointing at the RSDT.
pub fn rsdp() -> Vec<u8> {
    let mut r = Vec::with_capacity(20);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(&OEM_ID);
    r.push(0);
    r.extend_from_slice(&(RSDT_ADDR as u32).to_le_bytes());
    r[8] = checksum(&r);
    r
}

/// RSDT listing the FADT and MADT.
pub fn rsdt() -> Vec<u8> {
    let mut t = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    t.append(FADT_ADDR as u32);
    t.append(MADT_ADDR as u32);
    t.as_slice().to_vec()
}

/// FACS.
pub fn facs() -> Vec<u8> {
    bytes_of(&FACS::new())
}

fn io_gas(bits: u8, access: AccessSize, port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// FADT for a PIIX4-like PM block at 0x600.
pub fn fadt() -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"KILNFACP", 1)
        .dsdt_32(DSDT_ADDR as u32)
        .firmware_ctrl_32(FACS_ADDR as u32);
    f.sci_int = SCI_IRQ.into();
    f.smi_cmd = u32::from(SMI_CMD_PORT).into();
    f.acpi_enable = ACPI_ENABLE;
    f.acpi_disable = ACPI_DISABLE;
    f.pm1a_evt_blk = u32::from(PM_BASE).into();
    f.pm1a_cnt_blk = u32::from(PM_BASE + 4).into();
    f.pm_tmr_blk = u32::from(PM_BASE + 8).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    // C2/C3 not supported (QEMU's values).
    f.p_lvl2_lat = 0x0fff.into();
    f.p_lvl3_lat = 0x0fff.into();
    f.century = 0x32;
    // Legacy devices + 8042 present.
    f.iapc_boot_arch = 0x0003.into();
    // WBINVD | PROC_C1 | SLP_BUTTON | RTC_S4; fixed-feature power button (PWR_BUTTON = 0).
    f.flags = (1u32 | 1 << 2 | 1 << 5 | 1 << 7).into();
    f.x_pm1a_evt_blk = io_gas(32, AccessSize::WordAccess, PM_BASE);
    f.x_pm1a_cnt_blk = io_gas(16, AccessSize::WordAccess, PM_BASE + 4);
    f.x_pm_tmr_blk = io_gas(32, AccessSize::DwordAccess, PM_BASE + 8);
    bytes_of(&f.finalize())
}

/// DSDT holding only `Name(_S5_, Package(){0, 0, 0, 0})`.
pub fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 1, OEM_ID, *b"KILNDSDT", 1);
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&ZERO, &ZERO, &ZERO, &ZERO]),
    );
    t.append_slice(&bytes_of(&s5));
    t.as_slice().to_vec()
}

/// MADT: CPU 0's local APIC, the IOAPIC, IRQ0->GSI2 and SCI level-triggered overrides.
pub fn madt() -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 1, OEM_ID, OEM_TABLE, 1);
    t.write_u32(36, 0xfee0_0000);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    t.append_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // local APIC, enabled
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&0xfec0_0000u32.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (SCI_IRQ as u8, u32::from(SCI_IRQ), 0x000d),
    ] {
        let mut iso = vec![2, 10, 0, irq];
        iso.extend_from_slice(&gsi.to_le_bytes());
        iso.extend_from_slice(&flags.to_le_bytes());
        t.append_slice(&iso);
    }
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]); // LINT1 is NMI on all CPUs
    t.as_slice().to_vec()
}

/// All tables with their addresses.
pub fn tables() -> Vec<(u64, Vec<u8>)> {
    vec![
        (RSDP_ADDR, rsdp()),
        (RSDT_ADDR, rsdt()),
        (FACS_ADDR, facs()),
        (FADT_ADDR, fadt()),
        (DSDT_ADDR, dsdt()),
        (MADT_ADDR, madt()),
    ]
}

/// Writes the tables into guest memory.
pub fn install(mem: &GuestMem) -> Result<(), VmmError> {
    for (addr, data) in tables() {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(format!("writing ACPI table at {addr:#x}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(d: &[u8]) -> u8 {
        d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(d: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]])
    }

    #[test]
    fn checksums_and_links() {
        let t = tables();
        let mut end = 0;
        for (addr, data) in &t {
            assert!(*addr >= end, "table at {addr:#x} overlaps the previous one");
            end = addr + data.len() as u64;
            if &data[..4] == b"FACS" {
                continue;
            }
            let len = if &data[..8] == b"RSD PTR " {
                20
            } else {
                u32_at(data, 4) as usize
            };
            assert_eq!(len, data.len());
            assert_eq!(
                sum(data),
                0,
                "bad checksum in {:?}",
                String::from_utf8_lossy(&data[..4])
            );
        }
        assert!(end <= 0xf_0000);
        let rsdp = rsdp();
        assert_eq!(u32_at(&rsdp, 16) as u64, RSDT_ADDR);
        let rsdt = rsdt();
        assert_eq!(u32_at(&rsdt, 36) as u64, FADT_ADDR);
        assert_eq!(u32_at(&rsdt, 40) as u64, MADT_ADDR);
        assert_eq!(FACS_ADDR % 64, 0);
    }

    #[test]
    fn fadt_fields() {
        let f = fadt();
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(u32_at(&f, 36) as u64, FACS_ADDR);
        assert_eq!(u32_at(&f, 40) as u64, DSDT_ADDR);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9); // SCI_INT
        assert_eq!(u32_at(&f, 48), 0xb2); // SMI_CMD
        assert_eq!(u32_at(&f, 56), 0x600); // PM1a_EVT_BLK
        assert_eq!(u32_at(&f, 64), 0x604); // PM1a_CNT_BLK
        assert_eq!(u32_at(&f, 76), 0x608); // PM_TMR_BLK
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
        // Not hardware-reduced (flag bit 20).
        assert_eq!(u32_at(&f, 112) & (1 << 20), 0);
    }

    #[test]
    fn dsdt_has_s5() {
        let d = dsdt();
        assert_eq!(
            &d[36..],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0]
        );
    }
}
