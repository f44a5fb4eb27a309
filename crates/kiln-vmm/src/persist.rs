//! The builtin VMM's machine state in a file of kiln's own ([`FORMAT`]): the vCPU (registers,
//! segment and control registers, pending events), the devices (COM1's 16550, the PM1 block,
//! CMOS, the i8042's port 61h), the firmware's own bookkeeping (int 13h status, whether an El
//! Torito emulation is still in effect, where the console's cursor is), the console input not
//! yet read, and guest RAM.
//!
//! ```text
//! 0        "KILNVMM\0"
//! 8        version (u32 LE) = 1
//! 12       header length N (u32 LE), at most 1 MiB
//! 16       header: N bytes of JSON (see `Header`)
//! ...      zeros up to `memory_offset` (a multiple of 4 KiB)
//! memory_offset   guest RAM, `ram_mib` MiB; pages of zeros are holes
//! ```
//!
//! A state file is hostile input like any other: its length must be exactly the header's
//! `memory_offset` plus the VM's RAM, its header is bounded and checked field by field against
//! the VM it is loaded into (RAM, boot device), and what cannot be trusted is not read from
//! it at all: the disk geometry and the El Torito entry are derived again from the disk.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMem;
use crate::VmmError;

/// The name of this format, as kiln records it beside the file.
pub const FORMAT: &str = "kiln-vmm/1";
const MAGIC: &[u8; 8] = b"KILNVMM\0";
const VERSION: u32 = 1;
const HEADER_MAX: usize = 1 << 20;
const PAGE: usize = 4096;

/// COM1's registers and receive FIFO: vm-superio's `SerialState`, which has no serde, field
/// by field. (rust-vmm's vm-superio-ser 0.4.1 has the same type, but it pins vm-superio to
/// =0.8.1, below the 0.8.2 kiln uses, and brings versionize along.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UartState {
    pub dll: u8,
    pub dlm: u8,
    pub ier: u8,
    pub iir: u8,
    pub lcr: u8,
    pub lsr: u8,
    pub mcr: u8,
    pub msr: u8,
    pub scr: u8,
    pub rx: Vec<u8>,
}

/// Everything but RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    pub ram_mib: u32,
    /// `hard-disk`, `floppy` or `cdrom`.
    pub boot: String,
    pub memory_offset: u64,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub events: kvm_vcpu_events,
    pub uart: UartState,
    /// PM1a status, enable and control.
    pub pm: [u16; 3],
    pub cmos_index: u8,
    pub cmos: Vec<u8>,
    pub port61: u8,
    pub disk_status: u8,
    /// An El Torito floppy or hard-disk emulation is still in effect.
    pub emulation: bool,
    /// The console cursor as the BIOS screen mirror tracks it (row, column).
    pub mirror: (i64, u64),
    /// Console input queued but not yet read by the guest.
    pub input: Vec<u8>,
    pub power_button: bool,
}

/// The error about the state file `path`.
pub(crate) fn bad(path: &Path, why: impl std::fmt::Display) -> VmmError {
    VmmError::State(format!("machine state {}: {why}", path.display()))
}

/// Writes `header` and the RAM in `mem` to the new file `path`.
pub(crate) fn save(path: &Path, header: &mut Header, mem: &GuestMem) -> Result<(), VmmError> {
    let ram = u64::from(header.ram_mib) << 20;
    // The offset depends on the header's length, which depends on the offset: two rounds.
    header.memory_offset = 0;
    let mut json = serde_json::to_vec(header).map_err(|e| bad(path, e))?;
    header.memory_offset = (16 + json.len() + 32).div_ceil(PAGE) as u64 * PAGE as u64;
    json = serde_json::to_vec(header).map_err(|e| bad(path, e))?;
    if json.len() > HEADER_MAX || 16 + json.len() as u64 > header.memory_offset {
        return Err(bad(path, "the machine state header is too large"));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| bad(path, format!("cannot create: {e}")))?;
    let io = |e: std::io::Error| bad(path, format!("cannot write: {e}"));
    f.write_all(MAGIC).map_err(io)?;
    f.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    f.write_all(&(json.len() as u32).to_le_bytes())
        .map_err(io)?;
    f.write_all(&json).map_err(io)?;
    let mut page = vec![0u8; 1 << 20];
    let mut addr = 0u64;
    while addr < ram {
        let n = page.len().min((ram - addr) as usize);
        mem.read_slice(&mut page[..n], GuestAddress(addr))
            .map_err(|e| bad(path, format!("reading guest memory at {addr:#x}: {e}")))?;
        for (i, p) in page[..n].chunks(PAGE).enumerate() {
            if !kiln_sys::sparse::is_zero(p) {
                f.write_all_at(p, header.memory_offset + addr + (i * PAGE) as u64)
                    .map_err(io)?;
            }
        }
        addr += n as u64;
    }
    f.set_len(header.memory_offset + ram).map_err(io)?;
    Ok(())
}

/// Reads the header of `path` and checks it against a VM of `ram_mib` MiB booting `boot`.
pub(crate) fn load_header(path: &Path, ram_mib: u32, boot: &str) -> Result<Header, VmmError> {
    let mut f = File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let len = f
        .metadata()
        .map_err(|e| bad(path, format!("cannot read: {e}")))?
        .len();
    let mut head = [0u8; 16];
    f.read_exact(&mut head)
        .map_err(|_| bad(path, "too short for a kiln-vmm machine state"))?;
    if &head[..8] != MAGIC {
        return Err(bad(path, "not a kiln-vmm machine state"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(bad(
            path,
            format!("machine state version {version}, kiln reads {VERSION}"),
        ));
    }
    let n = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as usize;
    if n > HEADER_MAX || 16 + n as u64 > len {
        return Err(bad(path, format!("a {n}-byte header in a {len}-byte file")));
    }
    let mut json = vec![0u8; n];
    f.read_exact(&mut json)
        .map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let h: Header = serde_json::from_slice(&json)
        .map_err(|e| bad(path, format!("unreadable machine state header: {e}")))?;
    if h.ram_mib != ram_mib {
        return Err(bad(
            path,
            format!("saved with {} MiB of RAM, this VM has {ram_mib}", h.ram_mib),
        ));
    }
    if h.boot != boot {
        return Err(bad(
            path,
            format!("saved booting a {}, this VM boots a {boot}", h.boot),
        ));
    }
    let ram = u64::from(ram_mib) << 20;
    if h.memory_offset % PAGE as u64 != 0
        || h.memory_offset < 16 + n as u64
        || h.memory_offset.checked_add(ram) != Some(len)
    {
        return Err(bad(
            path,
            format!(
                "{len} bytes, not the header's memory offset {} plus {ram} bytes of RAM: truncated or damaged",
                h.memory_offset
            ),
        ));
    }
    if h.cmos.len() != 128 || h.uart.rx.len() > 64 || h.input.len() > 1 << 20 {
        return Err(bad(path, "device state out of range"));
    }
    if !(-100_000..=100_000).contains(&h.mirror.0) || h.mirror.1 > 1000 {
        return Err(bad(path, "console cursor out of range"));
    }
    Ok(h)
}

/// Reads the RAM of the checked state `path` (see [`load_header`]) into `mem`, only where the
/// file has data; `mem` is a new VM's, zero but for the pages its boot wrote, which are made
/// zero again where the file has none (the only pages it has in memory: untouched RAM is
/// never touched here).
pub(crate) fn load_memory(path: &Path, h: &Header, mem: &GuestMem) -> Result<(), VmmError> {
    let f = File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let ram = u64::from(h.ram_mib) << 20;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| bad(path, format!("guest memory: {e}")))? as usize;
    let written = kiln_sys::sparse::resident_pages(host, ram as usize)
        .map_err(|e| bad(path, format!("guest memory: {e}")))?;
    let extents: Vec<(u64, u64)> = kiln_sys::sparse::data_extents(&f, h.memory_offset + ram)
        .into_iter()
        .filter(|&(_, end)| end > h.memory_offset)
        .map(|(start, end)| {
            (
                start.max(h.memory_offset) - h.memory_offset,
                end - h.memory_offset,
            )
        })
        .collect();
    let page_size = kiln_sys::sparse::page_size() as u64;
    let zero = vec![0u8; page_size as usize];
    for (i, _) in written.iter().enumerate().filter(|(_, &w)| w) {
        let at = i as u64 * page_size;
        let in_data = extents.iter().any(|&(s, e)| s < at + page_size && at < e);
        if !in_data {
            mem.write_slice(&zero, GuestAddress(at))
                .map_err(|e| bad(path, format!("guest memory at {at:#x}: {e}")))?;
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in extents {
        let mut off = start;
        while off < end {
            let n = buf.len().min((end - off) as usize);
            f.read_exact_at(&mut buf[..n], h.memory_offset + off)
                .map_err(|e| bad(path, format!("cannot read: {e}")))?;
            mem.write_slice(&buf[..n], GuestAddress(off))
                .map_err(|e| bad(path, format!("guest memory: {e}")))?;
            off += n as u64;
        }
    }
    Ok(())
}
