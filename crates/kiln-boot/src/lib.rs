//! kiln-boot: the kiln boot program.
//!
//! A real-mode x86 program of at most [`MAX_PROGRAM_SIZE`] bytes (currently
//! exactly 256), assembled at runtime from a commented listing (`src/asm.rs`,
//! iced-x86 `code_asm`, no external assembler). It runs from a boot sector at
//! 0x7C00 ([`boot_sector`]) or an El Torito no-emulation CD (loaded at
//! 07C0:0000: the code does not depend on CS), with interrupts off.
//!
//! Behaviour (the interface of the well-known 256-byte program it replaces):
//! - COM1 is set to 9600 8N1 through the BIOS (int 14h AH=00h).
//! - Everything the program prints goes to BIOS video (int 10h AH=0Eh teletype) and to
//!   COM1 (int 14h AH=01h), character by character.
//! - [`BANNER`] + CR LF, then the prompt `$ `.
//! - Serial REPL: each character typed is echoed as it arrives; a line ends at CR or LF;
//!   the first 80 characters are kept, further ones dropped (and not echoed). The reply
//!   is CR LF, the kept characters reversed, CR LF and the prompt again: typing `hello`
//!   and Enter shows `hello\r\nolleh\r\n$ `. Empty lines print nothing, so
//!   `hello\r\n`, `hello\r` and `hello\n` all get one reply. The reversal uses the
//!   stack (characters are pushed, then popped while writing).
//! - Idle: after the ACPI discovery interrupts are on, and whenever COM1 has nothing to
//!   read the program halts (`hlt`) until the next interrupt: the BIOS timer wakes it at
//!   18.2 Hz at the latest. An idle guest costs well under 1 % of a host core on QEMU TCG.
//!   COM1 holds what arrives meanwhile (QEMU and kiln's VMM hold input back until the
//!   guest has read the previous character, so nothing is lost).
//! - ACPI power button: the ports come from the FADT (RSDP in E0000-FFFFF →
//!   RSDT → first entry `FACP` → PM1a_EVT_BLK / PM1a_CNT_BLK, DSDT `_S5_` →
//!   SLP_TYPa; tables above 1 MiB are read in unreal mode). Without usable
//!   tables it falls back to QEMU/SeaBIOS's 0x600 / 0x604 with SLP_TYP 0.
//!   PWRBTN_EN is set, PWRBTN_STS is polled while waiting for input; on a
//!   press the status is cleared and SLP_TYP|SLP_EN is written to PM1a_CNT
//!   (QEMU exits with a `SHUTDOWN` event, `guest: true`). If that does not
//!   power off, the REPL carries on. A status of 0xFFFF (no device decodes
//!   the port, as on v86 without ACPI) is never taken for a press.
//!
//! Byte budget (254 of 256 bytes):
//!
//! | part | bytes |
//! |---|---:|
//! | entry: `cli`, DS = 0 | 4 |
//! | COM1 9600 8N1 (int 14h AH=00h) | 6 |
//! | banner + first prompt loop | 13 |
//! | ACPI: default ports | 6 |
//! | ACPI: unreal mode | 19 |
//! | ACPI: RSDP scan, fallback | 22 |
//! | ACPI: RSDT → FADT ports, DSDT | 33 |
//! | ACPI: `_S5_` scan, SLP_TYP | 33 |
//! | PWRBTN_EN, `sti` | 8 |
//! | REPL: a new line (prompt + CR LF on the stack) | 11 |
//! | REPL: idle (`hlt`) | 1 |
//! | REPL: power button | 17 |
//! | REPL: read, echo, end of line, 80-character limit | 31 |
//! | REPL: the reply (CR LF, reversed line, CR LF, prompt) | 19 |
//! | `putc`: BIOS video + COM1 | 10 |
//! | data: `ClientAPI\r\n$ ` + the GDT (overlapping it) | 21 |
//! | free | 2 |
//!
//! Not in the budget: Backspace (erase the last character on screen and in the buffer)
//! needs about 32 bytes (two comparisons, the empty-line guard, the pop, and `\b \b`
//! through `putc`); the original program does not have it either.
//!
//! Measured: QEMU 10 pc and q35 (disk and CD): FADT found, PM1a 0x600/0x604,
//! S5=0; v86 with ACPI: 0xB000/0xB004; v86 without ACPI and QEMU isapc: fallback,
//! REPL unaffected.
//!
//! Needs a PC BIOS (int 10h) and reads ACPI tables through the BIOS area, so
//! a VMM without firmware must provide int 10h and should return all-ones for
//! I/O ports it does not emulate.

mod asm;

use thiserror::Error;

/// Largest program (code + data) accepted.
pub const MAX_PROGRAM_SIZE: usize = 256;
/// Banner printed at boot, followed by CR LF.
pub const BANNER: &str = "ClientAPI";
/// Size of a boot sector.
pub const SECTOR_SIZE: usize = 512;
/// Offset of the 0x55 0xAA boot signature in the boot sector.
pub const SIGNATURE_OFFSET: usize = 510;
/// Address the BIOS loads the boot sector to (the program's origin).
pub const LOAD_ADDRESS: u16 = asm::ORIGIN;

/// Errors from building or validating a boot program.
#[derive(Debug, Error)]
pub enum BootError {
    /// The program exceeds [`MAX_PROGRAM_SIZE`].
    #[error("program is {size} bytes, over the {max}-byte limit by {}", size.saturating_sub(*max))]
    TooLarge {
        /// Program size in bytes.
        size: usize,
        /// Limit in bytes.
        max: usize,
    },
    /// The program has no bytes.
    #[error("program is empty")]
    Empty,
    /// The assembler rejected the listing (a bug in this crate).
    #[error("cannot assemble the boot program: {0}")]
    Assemble(String),
}

/// Result of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramReport {
    /// Program size in bytes.
    pub size: usize,
    /// Bytes left before [`MAX_PROGRAM_SIZE`].
    pub free: usize,
}

/// The assembled kiln program (deterministic bytes, origin 0x7C00).
pub fn program() -> Result<Vec<u8>, BootError> {
    let err = |e: iced_x86::IcedError| BootError::Assemble(e.to_string());
    // Pass 1 finds where the data lands; pass 2 uses it (same encoding sizes).
    let (first, banner) = asm::assemble(asm::Symbols::default()).map_err(err)?;
    let banner = u16::try_from(banner)
        .map_err(|_| BootError::Assemble(format!("banner address {banner:#x} is not 16-bit")))?;
    let (bytes, again) = asm::assemble(asm::Symbols { banner }).map_err(err)?;
    if bytes.len() != first.len() || again != u64::from(banner) {
        return Err(BootError::Assemble(format!(
            "layout changed between passes ({} -> {} bytes)",
            first.len(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Validate a program: not empty, at most [`MAX_PROGRAM_SIZE`] bytes (so it
/// also fits before the boot signature). Returns its size and free space.
pub fn check(program: &[u8]) -> Result<ProgramReport, BootError> {
    let size = program.len();
    if size == 0 {
        return Err(BootError::Empty);
    }
    if size > MAX_PROGRAM_SIZE {
        return Err(BootError::TooLarge {
            size,
            max: MAX_PROGRAM_SIZE,
        });
    }
    Ok(ProgramReport {
        size,
        free: MAX_PROGRAM_SIZE - size,
    })
}

/// The boot sector: `program`, zero padding to 510 bytes, then 0x55 0xAA.
pub fn boot_sector(program: &[u8]) -> Result<[u8; SECTOR_SIZE], BootError> {
    check(program)?;
    let mut sector = [0u8; SECTOR_SIZE];
    sector[..program.len()].copy_from_slice(program);
    sector[SIGNATURE_OFFSET] = 0x55;
    sector[SIGNATURE_OFFSET + 1] = 0xAA;
    Ok(sector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog() -> Vec<u8> {
        program().expect("the listing assembles")
    }

    #[test]
    fn program_fits_the_limit() {
        let p = prog();
        let report = check(&p).expect("program passes check");
        assert_eq!(report.size, p.len());
        assert_eq!(report.size + report.free, MAX_PROGRAM_SIZE);
        assert!(p.len() <= MAX_PROGRAM_SIZE, "program is {} bytes", p.len());
    }

    #[test]
    fn program_is_deterministic() {
        assert_eq!(prog(), prog());
    }

    #[test]
    fn program_shape() {
        let p = prog();
        assert_eq!(p[0], 0xFA, "starts with cli");
        let banner = format!("{BANNER}\r\n$ ");
        let at = p
            .windows(banner.len())
            .position(|w| w == banner.as_bytes())
            .expect("banner + CR LF + prompt is in the program");
        // The GDT base right after the banner points 5 bytes into it (see asm.rs),
        // which proves pass 2 used the real data address.
        let base = u32::from_le_bytes(p[at + 13..at + 17].try_into().expect("4 bytes"));
        assert_eq!(base, u32::from(LOAD_ADDRESS) + at as u32 + 5);
        // ACPI signatures, int 14h (COM1 set-up and output), the LSR poll, hlt.
        for needle in [
            &b"RSD "[..],
            b"FACP",
            b"_S5_",
            &[0xCD, 0x14],
            &[0xBA, 0xFD, 0x03],
            &[0xF4],
        ] {
            assert!(
                p.windows(needle.len()).any(|w| w == needle),
                "missing {needle:?}"
            );
        }
    }

    #[test]
    fn boot_sector_layout() {
        let p = prog();
        let s = boot_sector(&p).expect("sector");
        assert_eq!(&s[..p.len()], &p[..]);
        assert!(s[p.len()..SIGNATURE_OFFSET].iter().all(|&b| b == 0));
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn boot_sector_accepts_exactly_the_limit() {
        let s = boot_sector(&[0x90; MAX_PROGRAM_SIZE]).expect("256 bytes is allowed");
        assert_eq!(s[MAX_PROGRAM_SIZE - 1], 0x90);
        assert_eq!(s[MAX_PROGRAM_SIZE], 0);
    }

    #[test]
    fn too_large_is_a_clear_one_line_error() {
        let err = check(&[0u8; 300]).unwrap_err();
        assert!(matches!(
            err,
            BootError::TooLarge {
                size: 300,
                max: 256
            }
        ));
        assert_eq!(
            err.to_string(),
            "program is 300 bytes, over the 256-byte limit by 44"
        );
        assert!(boot_sector(&[0u8; 257]).is_err());
    }

    #[test]
    fn empty_is_rejected() {
        assert!(matches!(check(&[]), Err(BootError::Empty)));
        assert!(matches!(boot_sector(&[]), Err(BootError::Empty)));
    }
}
