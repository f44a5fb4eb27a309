//! Accelerator choice: KVM only where it is real hardware virtualization.
//!
//! `/dev/kvm` opening is not enough: paravirtual KVM implementations (kvm_pvm) emulate every guest
//! instruction and cannot run stock guests, so the CPU flags decide.

use std::fs;

/// The QEMU accelerator a VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM where [`kvm_usable`], otherwise TCG.
    pub fn detect() -> Accel {
        if kvm_usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// True when the CPU advertises VT-x (`vmx`) or AMD-V (`svm`) in /proc/cpuinfo.
pub fn host_has_hw_virt() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|info| cpu_flags_have_hw_virt(&info))
        .unwrap_or(false)
}

fn cpu_flags_have_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// True when `/dev/kvm` opens read-write *and* the CPU has hardware virtualization.
pub fn kvm_usable() -> bool {
    host_has_hw_virt()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_decide() {
        assert!(cpu_flags_have_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_flags_have_hw_virt("flags\t\t: fpu svm\n"));
        assert!(!cpu_flags_have_hw_virt("flags\t\t: fpu vme hypervisor\n"));
        // "vmx" only counts as a whole flag, and only on the flags line.
        assert!(!cpu_flags_have_hw_virt(
            "model name: vmxfoo\nflags : fpu vmxx\n"
        ));
    }
}
