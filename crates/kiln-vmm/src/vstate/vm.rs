//! The KVM VM: creation and memory slots.
//!
//! No in-kernel irqchip or PIT is created on purpose: without one KVM exits to us on
//! `hlt` (so a halted guest ends the run instead of sleeping in the kernel forever),
//! and the polling firmware guests we boot need no interrupts.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMem;
use crate::VmmError;

/// Address KVM may use for the real-mode TSS on VMX hosts (3 pages below 4 GiB).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM with guest memory registered.
#[derive(Debug)]
pub struct KvmVm {
    /// Kept so the VM fd's parent stays open.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: VmFd,
}

impl KvmVm {
    /// Opens /dev/kvm, creates a VM and maps every region of `mem` into it.
    pub fn new(mem: &GuestMem) -> Result<KvmVm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::kvm("open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region stays mapped for the lifetime of the VM: `Vm` owns both
            // the memory and this fd and drops the fd first.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(KvmVm { kvm, fd })
    }
}
