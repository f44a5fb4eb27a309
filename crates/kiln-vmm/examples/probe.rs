//! Probes what the host KVM supports: capabilities, irqchip/PIT creation, real mode at
//! 0000:7C00, which exits port I/O, MMIO and `hlt` produce, and what an exit costs.
//! Run: `cargo run -p kiln-vmm --example probe`. With `IRQCHIP=1` it also creates an
//! in-kernel irqchip and PIT; `hlt` then no longer exits and the probe hangs there
//! (which is why the VMM creates no irqchip).
use kvm_bindings::{kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuExit};

fn main() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    println!("api version {}", kvm.get_api_version());
    for (name, cap) in [
        ("Irqchip", Cap::Irqchip),
        ("Pit2", Cap::Pit2),
        ("PitState2", Cap::PitState2),
        ("UserMemory", Cap::UserMemory),
        ("SetTssAddr", Cap::SetTssAddr),
        ("SetIdentityMapAddr", Cap::SetIdentityMapAddr),
        ("ImmediateExit", Cap::ImmediateExit),
        ("Ioeventfd", Cap::Ioeventfd),
        ("Irqfd", Cap::Irqfd),
        ("CoalescedMmio", Cap::CoalescedMmio),
        ("CoalescedPio", Cap::CoalescedPio),
        ("SplitIrqchip", Cap::SplitIrqchip),
        ("ExtCpuid", Cap::ExtCpuid),
        ("Hlt", Cap::Hlt),
        ("SetGuestDebug", Cap::SetGuestDebug),
        ("AdjustClock", Cap::AdjustClock),
        ("TscDeadlineTimer", Cap::TscDeadlineTimer),
        ("XSave", Cap::Xsave),
        ("NrVcpus", Cap::NrVcpus),
        ("MaxVcpus", Cap::MaxVcpus),
        ("NrMemslots", Cap::NrMemslots),
        ("Xcrs", Cap::Xcrs),
        ("IrqRouting", Cap::IrqRouting),
        ("SignalMsi", Cap::SignalMsi),
        ("X86UserSpaceMsr", Cap::X86UserSpaceMsr),
    ] {
        println!("cap {name:20} = {}", kvm.check_extension_int(cap));
    }
    let vm = kvm.create_vm().expect("create vm");
    println!("set_tss_address: {:?}", vm.set_tss_address(0xfffb_d000));
    if std::env::var_os("IRQCHIP").is_some() {
        let irq = vm.create_irq_chip();
        println!("create_irq_chip: {irq:?}");
        let pit = vm.create_pit2(kvm_bindings::kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        });
        println!("create_pit2: {pit:?}");
    }

    let mem_size = 0x10_0000usize;
    // SAFETY: an anonymous private mapping of `mem_size` bytes; nothing else refers to it.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        ) as *mut u8
    };
    // mov al,0x41; out 0x80,al ; mov dx,0x3f8; out dx,al; mov ax,[0x5000] (mmio? no, ram); mov [0xF0000000]? real mode can't;
    // in al,0x60 ; hlt
    let code: &[u8] = &[
        0xB0, 0x41, // mov al,0x41
        0xE6, 0x80, // out 0x80,al
        0xBA, 0xF8, 0x03, // mov dx,0x3f8
        0xEE, // out dx,al
        0xEC, // in al,dx
        0xB8, 0x00, 0xA0, // mov ax,0xA000
        0x8E, 0xD8, // mov ds,ax
        0xA0, 0x00, 0x00, // mov al,[0]  -> unmapped 0xA0000 => MMIO
        0xA2, 0x00, 0x00, // mov [0],al -> MMIO write
        0xF4, // hlt
        0x0F, 0x0B, // ud2 after hlt
    ];
    // SAFETY: `mem` maps `mem_size` bytes and 0x7c00 + code.len() lies inside them.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.add(0x7c00), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 0xA0000,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is the live mapping above, which outlives the VM (the process ends).
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    println!(
        "initial cs sel={:x} base={:x} cr0={:x}",
        sregs.cs.selector, sregs.cs.base, sregs.cr0
    );
    sregs.cs.selector = 0;
    sregs.cs.base = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x7c00;
    regs.rflags = 2;
    regs.rdx = 0x80;
    regs.rsp = 0x7c00;
    vcpu.set_regs(&regs).unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        let r = vcpu.run();
        match r {
            Ok(VcpuExit::IoOut(port, data)) => println!("io out {port:#x} {data:?}"),
            Ok(VcpuExit::IoIn(port, data)) => {
                println!("io in {port:#x} len {}", data.len());
                data.fill(0x5a);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                println!("mmio read {addr:#x} len {}", data.len());
                data.fill(0x33);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => println!("mmio write {addr:#x} {data:?}"),
            Ok(VcpuExit::Hlt) => {
                println!("hlt after {:?}", t0.elapsed());
                break;
            }
            Ok(other) => {
                println!("other exit {other:?}");
                break;
            }
            Err(e) => {
                println!("run error {e}");
                break;
            }
        }
    }
    let regs = vcpu.get_regs().unwrap();
    println!("rip after = {:#x} rax={:#x}", regs.rip, regs.rax);
    // Triple-fault test: load an IDT limit 0 and int3.
    let code2: &[u8] = &[
        0x31, 0xC0, 0x8E, 0xD8, 0x0F, 0x01, 0x1E, 0x00, 0x60, 0xE6, 0x80, 0xCC, 0xF4,
    ]; // lidt [0x6000]; int3; hlt
       // SAFETY: both ranges lie inside the `mem_size` bytes `mem` maps.
    unsafe {
        std::ptr::copy_nonoverlapping(code2.as_ptr(), mem.add(0x7c00), code2.len());
        std::ptr::write_bytes(mem.add(0x6000), 0, 6);
    }
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x7c00;
    vcpu.set_regs(&regs).unwrap();
    for _ in 0..5 {
        match vcpu.run() {
            Ok(e) => {
                println!("tf exit {e:?}");
                let brk = !matches!(e, VcpuExit::IoOut(..) | VcpuExit::IoIn(..));
                println!("  rip={:#x}", vcpu.get_regs().unwrap().rip);
                if brk {
                    break;
                }
            }
            Err(e) => {
                println!("tf err {e}");
                break;
            }
        }
    }
    // Timing: loop 100000 iterations of dec/jnz then out.
    let code3: &[u8] = &[
        0x66, 0xB9, 0xA0, 0x86, 0x01, 0x00, 0x66, 0x49, 0x75, 0xFC, 0xE6, 0x80, 0xF4,
    ]; // mov ecx,100000; dec ecx; jnz; out; hlt
       // SAFETY: the range lies inside the `mem_size` bytes `mem` maps.
    unsafe {
        std::ptr::copy_nonoverlapping(code3.as_ptr(), mem.add(0x7c00), code3.len());
    }
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.selector = 0;
    sregs.cs.base = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x7c00;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    let t0 = std::time::Instant::now();
    let e = vcpu.run();
    println!("loop exit {:?} after {:?}", e.map(|_| ()), t0.elapsed());
    // Cost of exits: 1000 outs.
    let code4: &[u8] = &[0xB9, 0xE8, 0x03, 0xE6, 0x80, 0xE2, 0xFC, 0xF4]; // mov cx,1000; out 0x80,al; loop; hlt
                                                                          // SAFETY: the range lies inside the `mem_size` bytes `mem` maps.
    unsafe {
        std::ptr::copy_nonoverlapping(code4.as_ptr(), mem.add(0x7c00), code4.len());
    }
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x7c00;
    vcpu.set_regs(&regs).unwrap();
    let t0 = std::time::Instant::now();
    let mut n = 0;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(..)) => n += 1,
            other => {
                println!(
                    "{n} io exits, end {:?} in {:?}",
                    other.map(|_| ()),
                    t0.elapsed()
                );
                break;
            }
        }
    }
}
