//! kiln's built-in minimal BIOS, generated in Rust at VM start (no SeaBIOS).
//!
//! Every interrupt vector points at a 4-byte stub in the F000 segment:
//!
//! ```text
//! F000:1000 + 4*n:   out 0xEF, al   ; trap to the VMM (AL is not clobbered)
//!                    iret
//!                    nop
//! ```
//!
//! On the port exit the VMM identifies the vector from CS:IP (so any register may carry
//! arguments), performs the service on the vCPU registers and guest memory, puts CF/ZF
//! results into the FLAGS image the `int` pushed, and resumes; the stub `iret`s.

mod bios;
mod disk;
mod drive;
mod eltorito;
mod misc;
mod regs;
mod serial;
pub(crate) mod video;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

pub use bios::{BDA_BASE, EBDA_SEGMENT};
pub use drive::Geometry;
pub use video::cp437;

use crate::devices::serial::SerialDevice;
use crate::devices::ConsoleOut;
use crate::shared::Shared;
use crate::vstate::memory::GuestMem;
use crate::vstate::vcpu::Vcpu;
use crate::{BootDevice, Disk, ExitReason, VideoOutput, VmmError};
use regs::Regs;

/// Port the BIOS stubs trap through.
pub const SERVICE_PORT: u16 = 0xef;
/// Segment of the BIOS.
pub const BIOS_SEGMENT: u16 = 0xf000;
/// Offset of the vector stubs in the BIOS segment.
pub const STUB_BASE: u16 = 0x1000;
/// Bytes per stub.
pub const STUB_SIZE: u16 = 4;
/// Offset of the reset-vector stub (F000:FFF0, linear 0xFFFF0).
pub const RESET_STUB: u16 = 0xfff0;

/// What the VMM does after a BIOS service.
#[derive(Debug, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// Resume the guest.
    Resume,
    /// Run the same call again once the guest resumes: a blocking call (waiting for a key)
    /// gave way to a pause, so that the machine is saved between instructions, not inside
    /// the BIOS.
    Retry,
    /// Stop the run with this reason.
    Exit(ExitReason),
}

/// Register/memory context of one BIOS call.
pub(crate) struct Ctx<'a> {
    pub r: Regs,
    pub s: kvm_sregs,
    pub mem: &'a GuestMem,
    /// FLAGS image pushed by `int`, written back on return.
    pub flags: u16,
    flags_addr: u64,
    /// Set when the service replaced CS:IP itself (int 19h); then FLAGS is not patched.
    pub restarted: bool,
    /// Set when a segment register was changed and must be written back.
    pub sregs_dirty: bool,
}

impl Ctx<'_> {
    pub fn set_cf(&mut self, on: bool) {
        self.set_flag(0x0001, on);
    }
    pub fn set_zf(&mut self, on: bool) {
        self.set_flag(0x0040, on);
    }
    fn set_flag(&mut self, bit: u16, on: bool) {
        if on {
            self.flags |= bit;
        } else {
            self.flags &= !bit;
        }
    }
    /// Linear address of seg:off for a segment register's cached base.
    pub fn lin(base: u64, off: u64) -> u64 {
        base.wrapping_add(off & 0xffff)
    }
    pub fn es_lin(&self, off: u64) -> u64 {
        Self::lin(self.s.es.base, off)
    }
    pub fn ds_lin(&self, off: u64) -> u64 {
        Self::lin(self.s.ds.base, off)
    }
    pub fn read_u8(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0xff)
    }
    pub fn read_u16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0xffff)
    }
    pub fn read_u64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(u64::MAX)
    }
    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> bool {
        self.mem.write_slice(data, GuestAddress(addr)).is_ok()
    }
    pub fn write_u16(&self, addr: u64, v: u16) -> bool {
        self.write_bytes(addr, &v.to_le_bytes())
    }
}

/// Firmware state: the boot disk, video cursor, and services' bookkeeping.
pub struct Firmware {
    pub(crate) boot: BootDevice,
    pub(crate) disk: Box<dyn Disk>,
    pub(crate) geometry: Geometry,
    pub(crate) ram_bytes: u64,
    pub(crate) console: ConsoleOut,
    pub(crate) video: VideoOutput,
    pub(crate) shared: Arc<Shared>,
    /// Last int 13h status (AH).
    pub(crate) disk_status: u8,
    /// El Torito boot entry, for int 13h AH=4Bh.
    pub(crate) cd_boot: Option<eltorito::CdBoot>,
    /// El Torito floppy/hard-disk emulation in effect (until int 13h AX=4B00h ends it).
    pub(crate) emulation: Option<eltorito::Emulation>,
    /// COM1, shared with the port bus, for int 14h.
    pub(crate) com1: Arc<Mutex<SerialDevice>>,
    /// Where int 10h text has left the console's terminal cursor.
    pub(crate) mirror: video::Mirror,
    logged: HashSet<u32>,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware")
            .field("boot", &self.boot)
            .field("geometry", &self.geometry)
            .field("ram_bytes", &self.ram_bytes)
            .finish()
    }
}

impl Firmware {
    pub(crate) fn new(
        boot: BootDevice,
        disk: Box<dyn Disk>,
        ram_bytes: u64,
        console: ConsoleOut,
        video: VideoOutput,
        shared: Arc<Shared>,
        com1: Arc<Mutex<SerialDevice>>,
    ) -> Firmware {
        let geometry = Geometry::for_disk(boot, disk.size());
        Firmware {
            boot,
            disk,
            geometry,
            ram_bytes,
            console,
            video,
            shared,
            disk_status: 0,
            cd_boot: None,
            emulation: None,
            com1,
            mirror: video::Mirror::default(),
            logged: HashSet::new(),
        }
    }

    /// Writes IVT, BDA, EBDA, stubs, VGA text buffer and ACPI tables into guest memory.
    pub fn install(&mut self, mem: &GuestMem) -> Result<(), VmmError> {
        bios::install(mem, self.boot)?;
        // A (re)boot starts a fresh, blank BIOS screen.
        self.mirror.new_origin();
        self.flush_mirror();
        crate::acpi::install(mem)?;
        Ok(())
    }

    /// Loads the boot code from the disk and returns where to start it (CS, IP).
    pub fn load_boot(&mut self, mem: &GuestMem) -> Result<(u16, u16), VmmError> {
        disk::load_boot(self, mem)
    }

    /// BIOS drive number handed to the boot code in DL: the emulated drive when booting
    /// an El Torito floppy/hard-disk emulation image, else the boot device's.
    pub fn boot_drive(&self) -> u8 {
        self.emulation.map_or(self.boot.drive_number(), |e| e.drive)
    }

    /// Logs an unsupported BIOS function once.
    pub(crate) fn unsupported(&mut self, vector: u8, ax: u16) {
        self.warn_once(
            (u32::from(vector) << 8) | u32::from(ax >> 8),
            format_args!(
                "unsupported BIOS call int {vector:02x}h AH={:02x}h (AX={ax:04x}); returning CF=1",
                ax >> 8
            ),
        );
    }

    /// Logs `msg` the first time `key` is seen (keys: `vector << 8 | AH` for unsupported
    /// calls, `0x0100_0000 | mode` for video modes; bounded, so the set stays small).
    pub(crate) fn warn_once(&mut self, key: u32, msg: std::fmt::Arguments<'_>) {
        if self.logged.insert(key) {
            tracing::warn!("{msg}");
        }
    }

    /// Handles a trap on [`SERVICE_PORT`] if it came from a BIOS stub. Returns `None`
    /// when CS:IP is not one of ours (then the write is an ordinary unknown port write).
    pub(crate) fn handle_trap(
        &mut self,
        vcpu: &mut Vcpu,
        mem: &GuestMem,
    ) -> Result<Option<ServiceOutcome>, VmmError> {
        let regs: kvm_regs = vcpu.fd.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?;
        let sregs = vcpu
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        if sregs.cs.base != u64::from(BIOS_SEGMENT) << 4 {
            return Ok(None);
        }
        // RIP is already past the 2-byte `out`.
        let ip = regs.rip.wrapping_sub(2);
        if ip == u64::from(RESET_STUB) {
            return Ok(Some(ServiceOutcome::Exit(ExitReason::Reset)));
        }
        let stub_off = ip.wrapping_sub(u64::from(STUB_BASE));
        if stub_off >= 256 * u64::from(STUB_SIZE) || stub_off % u64::from(STUB_SIZE) != 0 {
            return Ok(None);
        }
        let vector = (stub_off / u64::from(STUB_SIZE)) as u8;
        let sp = regs.rsp & 0xffff;
        let flags_addr = Ctx::lin(sregs.ss.base, sp + 4);
        let mut ctx = Ctx {
            r: Regs(regs),
            s: sregs,
            mem,
            flags: mem.read_obj(GuestAddress(flags_addr)).unwrap_or(0x0202),
            flags_addr,
            restarted: false,
            sregs_dirty: false,
        };
        let outcome = self.service(vector, &mut ctx, vcpu)?;
        if outcome == ServiceOutcome::Retry {
            // Back onto the stub's `out`: nothing of the call has happened.
            let mut again = regs;
            again.rip = regs.rip.wrapping_sub(2);
            vcpu.fd
                .set_regs(&again)
                .map_err(VmmError::kvm("KVM_SET_REGS"))?;
            return Ok(Some(ServiceOutcome::Resume));
        }
        if ctx.restarted {
            return Ok(Some(outcome));
        }
        if !ctx.write_u16(ctx.flags_addr, ctx.flags) {
            return Err(VmmError::Memory(format!(
                "int {vector:02x}h: guest stack at {:#x} is not in RAM",
                ctx.flags_addr
            )));
        }
        vcpu.fd
            .set_regs(&ctx.r.0)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        if ctx.sregs_dirty {
            vcpu.fd
                .set_sregs(&ctx.s)
                .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        }
        Ok(Some(outcome))
    }

    fn service(
        &mut self,
        vector: u8,
        ctx: &mut Ctx<'_>,
        vcpu: &mut Vcpu,
    ) -> Result<ServiceOutcome, VmmError> {
        match vector {
            0x10 => video::int10(self, ctx),
            0x11 => ctx.r.set_ax(ctx.read_u16(BDA_BASE + 0x10)),
            0x12 => ctx.r.set_ax(ctx.read_u16(BDA_BASE + 0x13)),
            0x13 => disk::int13(self, ctx),
            0x14 => return Ok(serial::int14(self, ctx)),
            0x15 => misc::int15(self, ctx),
            0x16 => return Ok(misc::int16(self, ctx)),
            0x18 => return Err(VmmError::BootFailed),
            0x19 => {
                let (cs, ip) = self.load_boot(mem_of(ctx))?;
                vcpu.set_boot_state(cs, ip, self.boot_drive())?;
                ctx.restarted = true;
            }
            0x1a => misc::int1a(ctx),
            _ => {
                // A CPU exception lands here too; tell it apart from `int n`/`int3`/`into`
                // by the bytes before the return address.
                let ret = Ctx::lin(ctx.s.ss.base, ctx.r.0.rsp & 0xffff);
                let ret_ip = u64::from(ctx.read_u16(ret));
                let ret_cs = ctx.read_u16(ret + 2);
                let code = (u64::from(ret_cs) << 4) + ret_ip;
                let soft = (ctx.read_u8(code.wrapping_sub(2)) == 0xcd
                    && ctx.read_u8(code.wrapping_sub(1)) == vector)
                    || (vector == 3 && ctx.read_u8(code.wrapping_sub(1)) == 0xcc)
                    || (vector == 4 && ctx.read_u8(code.wrapping_sub(1)) == 0xce);
                if !soft && vector < 0x20 {
                    return Err(VmmError::GuestException {
                        vector,
                        cs: ret_cs,
                        ip: ret_ip as u16,
                    });
                }
                self.unsupported(vector, ctx.r.ax());
                ctx.set_cf(true);
            }
        }
        Ok(ServiceOutcome::Resume)
    }
}

fn mem_of<'a>(ctx: &Ctx<'a>) -> &'a GuestMem {
    ctx.mem
}

/// The current text screen as text (see [`crate::Vm::screen_text`]).
pub(crate) fn screen_text(mem: &GuestMem) -> String {
    video::screen_text(mem)
}
