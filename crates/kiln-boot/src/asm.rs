//! The kiln boot program as a commented assembler listing (iced-x86 `code_asm`).
//!
//! Real mode, 16-bit, loaded at 0000:7C00 (or 07C0:0000 when booted from an
//! El Torito no-emulation CD: only relative jumps/calls are used and data is
//! addressed through DS=0, so CS does not matter).
//!
//! Flow:
//! 1. COM1 = 9600 8N1 through the BIOS (int 14h AH=00h).
//! 2. Banner `ClientAPI\r\n$ ` through `putc`: every character of the program's
//!    output goes to BIOS video (int 10h teletype) and COM1 (int 14h AH=01h).
//! 3. ACPI discovery in "unreal" mode (DS with a 4 GiB limit), interrupts off:
//!    RSDP in E0000-FFFFF → RSDT → first entry must be `FACP` → PM1a_EVT_BLK,
//!    PM1a_CNT_BLK, DSDT → `_S5_` package → SLP_TYPa. Anything missing keeps
//!    the QEMU/SeaBIOS defaults (0x600 / 0x604 / S5=0). Nothing after this
//!    reads memory through DS, so BIOS calls may reload it.
//! 4. PWRBTN_EN is set in PM1a_EN, and interrupts are enabled: from here on the
//!    program idles in `hlt` whenever COM1 has nothing to read, and wakes on the
//!    next interrupt (the BIOS timer at 18.2 Hz at the latest). A status word of
//!    all ones is a floating bus (no PM hardware, e.g. v86 without ACPI) and is
//!    never taken for a press.
//! 5. Serial REPL: each character is echoed as it arrives; a line ends at CR or
//!    LF; up to 80 characters are kept (the rest are dropped, not echoed); the
//!    reply is CR LF, the kept characters reversed, CR LF and the prompt `$ `.
//!    Empty lines (e.g. the LF of a CR LF pair) print nothing.
//!
//! The line is reversed through the stack: the prompt and its CR LF are pushed
//! first, then each kept character, then (at the end of the line) a CR LF; one
//! pop loop writes it all back, last pushed first.
//!
//! Registers in the REPL: BP = PM1a_STS port, SI = PM1a_CNT port, BL = SLP_EN |
//! SLP_TYP (the high byte of the PM1a_CNT word; BH stays 0, the video page),
//! CX = words on the stack for the current line.

use iced_x86::code_asm::*;

/// Address the BIOS loads the boot sector to.
pub const ORIGIN: u16 = 0x7C00;

// COM1 (8250/16550 UART): read by polling its registers, set up and written
// through the BIOS (int 14h).
const COM1: u16 = 0x3F8;
const COM1_DATA: u8 = 0xF8; // low byte of COM1 + 0: RBR
const COM1_LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
/// int 14h AH=00h, AL = 111 (9600 baud) 00 (no parity) 0 (1 stop bit) 11 (8 bits).
const INT14_INIT_9600_8N1: u16 = 0x00E3;

// ACPI fixed hardware (QEMU pc/q35 + SeaBIOS defaults, used when no FADT is found).
const DEFAULT_PM1A_EVT: u16 = 0x600; // PM1a_STS; PM1a_EN is at +2
const DEFAULT_PM1A_CNT: u16 = 0x604;
const PWRBTN_BIT_HI: u8 = 0x01; // bit 8 (PWRBTN_STS / PWRBTN_EN) seen in the high byte
const PWRBTN_EN: u16 = 0x0100;
const SLP_EN_HI: u8 = 0x20; // bit 13 seen in the high byte; SLP_TYP is bits 10-12

// ACPI table layout.
const SIG_RSDP: u32 = u32::from_le_bytes(*b"RSD ");
const SIG_FACP: u32 = u32::from_le_bytes(*b"FACP");
const SIG_S5: u32 = u32::from_le_bytes(*b"_S5_");
const RSDP_RSDT_ADDRESS: i32 = 16;
const SDT_HEADER_LEN: i32 = 36; // RSDT entries start after the header
const FADT_DSDT: i32 = 40;
const FADT_PM1A_EVT_BLK: i32 = 56;
const FADT_PM1A_CNT_BLK: i32 = 64;
const AML_BYTE_PREFIX: u8 = 0x0A;
/// `_S5_` NameSeg, PackageOp, PkgLength, NumElements, then SLP_TYPa.
const S5_FIRST_ELEMENT: i32 = 7;
const SCAN_FIRST_SEGMENT: u16 = 0xE000;

const MAX_LINE: u8 = 80;

/// Addresses the code refers to as data; found by a first assembly pass.
#[derive(Clone, Copy, Default)]
pub(crate) struct Symbols {
    /// Address of the banner string (the GDT pointer overlaps its tail).
    pub banner: u16,
}

/// Assemble the program. `sym` holds data addresses from a previous pass
/// (zeros on the first pass: the encoding size does not depend on them).
pub(crate) fn assemble(sym: Symbols) -> Result<(Vec<u8>, u64), IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let mut banner = a.create_label();
    let mut putc = a.create_label();
    let mut banner_loop = a.create_label();
    let mut scan = a.create_label();
    let mut rsdp_found = a.create_label();
    let mut s5_scan = a.create_label();
    let mut raw_int = a.create_label();
    let mut discovered = a.create_label();
    let mut fallback = a.create_label();
    let mut line = a.create_label();
    let mut idle = a.create_label();
    let mut read = a.create_label();
    let mut serial_poll = a.create_label();
    let mut end_of_line = a.create_label();
    let mut write_back = a.create_label();

    // The GDT pointer starts at banner+11: its 16-bit limit is the prompt "$ "
    // (0x2024, plenty), its base is banner+5, so descriptor 1 (base+8) starts at
    // banner+13, i.e. on the base dword itself: limit[0:15] = banner+5 (0x7Cxx),
    // base[0:15] = 0, then the 4 bytes emitted after it.
    let gdtr = sym.banner.wrapping_add(11);
    let gdt_base = u32::from(sym.banner.wrapping_add(5));

    // ---- entry -----------------------------------------------------------
    a.cli()?;
    a.push(0)?;
    a.pop(ds)?; // DS=0: data is addressed as 0x7Cxx whatever CS is

    // ---- COM1: 9600 baud, 8N1, through the BIOS ----------------------------
    a.mov(ax, INT14_INIT_9600_8N1 as u32)?;
    a.cwd()?; // DX = 0: COM1
    a.int(0x14)?;

    // ---- banner and the first prompt ---------------------------------------
    a.mov(si, sym.banner as u32)?;
    a.xor(bx, bx)?; // BH = display page 0 for int 10h; BX = 0 as the scan offset
    a.set_label(&mut banner_loop)?;
    a.lodsb()?;
    a.call(putc)?;
    a.cmp(al, b' ' as u32)?; // the banner ends with the prompt's space
    a.jne(banner_loop)?;

    // ---- ACPI discovery ----------------------------------------------------
    // Defaults: bp = PM1a_STS port, si = PM1a_CNT port, bl = SLP_EN|SLP_TYP.
    a.mov(bp, DEFAULT_PM1A_EVT as u32)?;
    a.mov(si, DEFAULT_PM1A_CNT as u32)?;

    // Unreal mode: load DS in protected mode with a flat 4 GiB descriptor and
    // come back; DS keeps base 0 and the big limit. Interrupts are off (the BIOS
    // calls above return with the flags they were called with) and no BIOS call
    // comes before the scan is over, so nothing reloads DS meanwhile.
    a.lgdt(ptr(gdtr as u32))?;
    a.mov(eax, cr0)?;
    a.inc(ax)?; // PE on
    a.mov(cr0, eax)?;
    a.push(8)?;
    a.pop(ds)?; // selector 8: flat data
    a.dec(ax)?; // PE off
    a.mov(cr0, eax)?;

    // RSDP: "RSD PTR " on a 16-byte boundary in E0000-FFFFF (ES steps by 1 paragraph).
    a.mov(ax, SCAN_FIRST_SEGMENT as u32)?;
    a.set_label(&mut scan)?;
    a.mov(es, ax)?;
    a.cmp(dword_ptr(bx).es(), SIG_RSDP)?;
    a.je(rsdp_found)?;
    a.inc(ax)?;
    a.jnz(scan)?; // ends after FFFF:0
                  // Nothing (usable) found: keep the default ports, S5 with SLP_TYP 0.
    a.set_label(&mut fallback)?;
    a.mov(bl, SLP_EN_HI as u32)?; // bx = 0x0020
    a.jmp(discovered)?;

    a.set_label(&mut rsdp_found)?;
    a.mov(eax, dword_ptr(bx + RSDP_RSDT_ADDRESS).es())?; // RSDT (32-bit physical)
    a.mov(eax, dword_ptr(eax + SDT_HEADER_LEN))?; // its first entry: the FADT everywhere we know
    a.cmp(dword_ptr(eax), SIG_FACP)?;
    a.jne(fallback)?;
    a.mov(bp, word_ptr(eax + FADT_PM1A_EVT_BLK))?;
    a.mov(si, word_ptr(eax + FADT_PM1A_CNT_BLK))?;
    a.mov(edi, dword_ptr(eax + FADT_DSDT))?;

    // DSDT: find the "_S5_" name (at most 64 KiB), then its package.
    a.xor(cx, cx)?;
    a.set_label(&mut s5_scan)?;
    a.inc(edi)?;
    a.cmp(dword_ptr(edi), SIG_S5)?;
    a.loopne(s5_scan)?;
    a.jne(fallback)?;
    // SLP_TYPa is ZeroOp/OneOp (the value itself) or BytePrefix 0x0A + byte.
    a.mov(ax, word_ptr(edi + S5_FIRST_ELEMENT))?;
    a.cmp(al, AML_BYTE_PREFIX as u32)?;
    a.jne(raw_int)?;
    a.mov(al, ah)?;
    a.set_label(&mut raw_int)?;
    a.or(al, 0x08)?; // SLP_EN (bit 13) once shifted into place
    a.shl(al, 2)?; // SLP_TYP to bits 10-12 of the word
    a.mov(bl, al)?; // bh is still 0: the high byte of the PM1a_CNT word

    // ---- enable the power button event, and interrupts ----------------------
    a.set_label(&mut discovered)?;
    a.lea(dx, word_ptr(bp + 2))?; // PM1a_EN
    a.mov(ax, PWRBTN_EN as u32)?;
    a.out(dx, ax)?;
    a.sti()?; // from here on the program idles in hlt

    // ---- REPL --------------------------------------------------------------
    a.set_label(&mut line)?;
    a.push(b' ' as i32)?; // popped last: the reply ends with CR LF and the prompt
    a.push(b'$' as i32)?;
    a.push(10)?;
    a.push(13)?;
    a.mov(cx, 4u32)?; // words on the stack for this line

    // Nothing to read: sleep until the next interrupt (a new line also naps
    // once here; COM1 holds what arrives meanwhile).
    a.set_label(&mut idle)?;
    a.hlt()?;

    a.set_label(&mut read)?;
    // Power button?
    a.mov(dx, bp)?;
    a.in_(ax, dx)?; // PM1a_STS
    a.test(ah, PWRBTN_BIT_HI as u32)?;
    a.jz(serial_poll)?;
    a.inc(ax)?;
    a.jz(serial_poll)?; // 0xFFFF: nothing decodes this port
                        // Write back status+1: bit 8 is still set (bits 1-3 are reserved zeros, so
                        // the +1 never carries that far, nor sets bit 2 below) and writing 1s only
                        // clears status bits.
    a.out(dx, ax)?; // clears PWRBTN_STS
    a.mov(dx, si)?;
    a.mov(ah, bl)?;
    a.out(dx, ax)?; // PM1a_CNT = SLP_TYP(S5) | SLP_EN: power off
                    // (if that did not power off, carry on serving the REPL)

    a.set_label(&mut serial_poll)?;
    a.mov(dx, COM1_LSR as u32)?;
    a.in_(al, dx)?;
    a.test(al, LSR_DATA_READY as u32)?;
    a.jz(idle)?;
    a.mov(dl, COM1_DATA as u32)?;
    a.in_(al, dx)?;
    a.cmp(al, 13)?;
    a.je(end_of_line)?;
    a.cmp(al, 10)?;
    a.je(end_of_line)?;
    a.cmp(cl, (MAX_LINE + 4) as u32)?;
    a.jae(read)?; // line full: drop the character
    a.push(ax)?;
    a.inc(cx)?;
    a.call(putc)?; // echo
    a.jmp(read)?;

    a.set_label(&mut end_of_line)?;
    a.cmp(cl, 4)?;
    a.je(read)?; // empty line: print nothing, keep the prompt for the next one
    a.push(10)?; // the echo ends with CR LF
    a.push(13)?;
    a.inc(cx)?;
    a.inc(cx)?;
    a.set_label(&mut write_back)?;
    a.pop(ax)?;
    a.call(putc)?;
    a.loop_(write_back)?;
    a.jmp(line)?;

    // ---- putc: AL -> BIOS video and COM1; keeps AL, BX, CX, SI, BP --------
    a.set_label(&mut putc)?;
    a.mov(ah, 0x0Eu32)?;
    a.int(0x10)?; // teletype (BH = page 0; BL is a colour in graphics modes only)
    a.mov(ah, 0x01u32)?;
    a.cwd()?; // DX = 0: COM1 (AX is positive)
    a.int(0x14)?; // send AL; AH = line status
    a.ret()?;

    // ---- data ----------------------------------------------------------------
    a.set_label(&mut banner)?;
    a.db(b"ClientAPI\r\n$ ")?; // the prompt doubles as the GDT limit
    a.dd(&[gdt_base])?; // GDT base; also descriptor 1 limit[0:15] + base[0:15]
                        // Descriptor 1 rest: base[16:23]=0, access 0x93 (data RW, accessed),
                        // flags 0xC (4 KiB granularity, 32-bit) | limit[16:19]=0xF, base[24:31]=0.
    a.db(&[0x00, 0x93, 0xCF, 0x00])?;

    let result = a.assemble_options(
        u64::from(ORIGIN),
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let banner_ip = result.label_ip(&banner)?;
    Ok((result.inner.code_buffer, banner_ip))
}
