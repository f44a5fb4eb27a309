//! 8/16/32-bit views of the vCPU's general registers.

use kvm_bindings::kvm_regs;

macro_rules! reg16 {
    ($get:ident, $set:ident, $get8h:ident, $set8h:ident, $get8l:ident, $set8l:ident, $field:ident) => {
        pub fn $get(&self) -> u16 {
            self.0.$field as u16
        }
        pub fn $set(&mut self, v: u16) {
            self.0.$field = (self.0.$field & !0xffff) | u64::from(v);
        }
        pub fn $get8h(&self) -> u8 {
            (self.0.$field >> 8) as u8
        }
        pub fn $set8h(&mut self, v: u8) {
            self.0.$field = (self.0.$field & !0xff00) | (u64::from(v) << 8);
        }
        pub fn $get8l(&self) -> u8 {
            self.0.$field as u8
        }
        pub fn $set8l(&mut self, v: u8) {
            self.0.$field = (self.0.$field & !0xff) | u64::from(v);
        }
    };
}

/// Wrapper with AX/AH/AL-style accessors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regs(pub kvm_regs);

#[allow(dead_code)]
impl Regs {
    reg16!(ax, set_ax, ah, set_ah, al, set_al, rax);
    reg16!(bx, set_bx, bh, set_bh, bl, set_bl, rbx);
    reg16!(cx, set_cx, ch, set_ch, cl, set_cl, rcx);
    reg16!(dx, set_dx, dh, set_dh, dl, set_dl, rdx);

    pub fn si(&self) -> u16 {
        self.0.rsi as u16
    }
    pub fn di(&self) -> u16 {
        self.0.rdi as u16
    }
    pub fn bp(&self) -> u16 {
        self.0.rbp as u16
    }
    pub fn eax(&self) -> u32 {
        self.0.rax as u32
    }
    pub fn ebx(&self) -> u32 {
        self.0.rbx as u32
    }
    pub fn ecx(&self) -> u32 {
        self.0.rcx as u32
    }
    pub fn edx(&self) -> u32 {
        self.0.rdx as u32
    }
    pub fn set_eax(&mut self, v: u32) {
        self.0.rax = u64::from(v);
    }
    pub fn set_ebx(&mut self, v: u32) {
        self.0.rbx = u64::from(v);
    }
    pub fn set_ecx(&mut self, v: u32) {
        self.0.rcx = u64::from(v);
    }
    pub fn set_edx(&mut self, v: u32) {
        self.0.rdx = u64::from(v);
    }
}
