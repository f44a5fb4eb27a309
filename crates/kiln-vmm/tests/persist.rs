//! The builtin VMM's machine state: a paused VM saved and restored into a new VM continues
//! where it was (a half-typed line of the kiln program), and a damaged, truncated or foreign
//! state file is a one-line error, never a VM.

mod common;

use std::time::Duration;

use common::{disk_image, kvm_or_skip, Capture};
use kiln_vmm::{BootDevice, MemDisk, Vm, VmConfig};

fn disk() -> Box<MemDisk> {
    let sector = kiln_boot::boot_sector(&kiln_boot::program().unwrap()).unwrap();
    Box::new(MemDisk::new(disk_image(&sector, 1 << 20)))
}

fn run(mut vm: Vm) -> (kiln_vmm::VmHandle, std::thread::JoinHandle<()>) {
    let h = vm.handle();
    (
        h,
        std::thread::spawn(move || {
            let _ = vm.run();
        }),
    )
}

fn restore_error(config: VmConfig, path: &std::path::Path) -> String {
    let e = Vm::restore(config, disk(), Box::new(Capture::default()), path)
        .expect_err("restored from a bad state")
        .to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    e
}

#[test]
fn a_saved_machine_continues_and_bad_states_are_refused() {
    if !kvm_or_skip("a_saved_machine_continues_and_bad_states_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("machine");
    let out = Capture::default();
    let (vm, t) = run(Vm::new(VmConfig::default(), disk(), Box::new(out.clone())).unwrap());
    out.wait_for("$ ", Duration::from_secs(10));
    vm.send_input(b"hel");
    out.wait_for("$ hel", Duration::from_secs(10));
    assert!(vm.save(&state).is_err(), "saved while running");
    vm.pause(Duration::from_secs(5)).unwrap();
    vm.save(&state).unwrap();
    assert!(
        vm.save(&state).is_err(),
        "a state file is never overwritten"
    );
    // Paused, it answers nothing; resumed, it goes on.
    vm.send_input(b"p\r");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!out.text().contains("pleh"), "{}", out.text());
    vm.resume();
    out.wait_for("pleh\r\n$ ", Duration::from_secs(10));
    vm.kill();
    t.join().unwrap();

    // A new VM from the state: the half line is still there.
    let out = Capture::default();
    let restored = Vm::restore(VmConfig::default(), disk(), Box::new(out.clone()), &state).unwrap();
    let (vm, t) = run(restored);
    vm.send_input(b"lo\r");
    out.wait_for("olleh\r\n$ ", Duration::from_secs(10));
    assert!(
        !out.text().contains("ClientAPI"),
        "it booted: {}",
        out.text()
    );
    vm.kill();
    t.join().unwrap();

    // Another machine.
    let e = restore_error(
        VmConfig {
            ram_mib: 32,
            ..VmConfig::default()
        },
        &state,
    );
    assert!(e.contains("16 MiB of RAM, this VM has 32"), "{e}");
    let e = restore_error(
        VmConfig {
            boot: BootDevice::Floppy,
            ..VmConfig::default()
        },
        &state,
    );
    assert!(e.contains("booting a hard-disk"), "{e}");
    // Damaged files.
    let bytes = std::fs::read(&state).unwrap();
    let bad = dir.path().join("bad");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (bytes[..bytes.len() - 4096].to_vec(), "truncated or damaged"),
        (bytes[..10].to_vec(), "too short"),
        (
            [b"QFI\xfb".as_slice(), &bytes[4..]].concat(),
            "not a kiln-vmm",
        ),
        (
            [&bytes[..8], &2u32.to_le_bytes(), &bytes[12..]].concat(),
            "version 2",
        ),
        (
            [&bytes[..12], &u32::MAX.to_le_bytes(), &bytes[16..]].concat(),
            "header",
        ),
        (
            {
                let mut b = bytes.clone();
                b[16] = b'[';
                b
            },
            "unreadable machine state header",
        ),
        (Vec::new(), "too short"),
    ];
    for (content, why) in cases {
        let _ = std::fs::remove_file(&bad);
        std::fs::write(&bad, content).unwrap();
        let e = restore_error(VmConfig::default(), &bad);
        assert!(e.contains(why), "{why}: {e}");
    }
    // A header whose fields are out of range.
    let n = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[16..16 + n].to_vec()).unwrap();
    let cmos_at = header.find("\"cmos\":[").unwrap() + "\"cmos\":[".len();
    let short = format!("{}{}", &header[..cmos_at], &header[cmos_at + 2..]);
    let mut b = bytes[..12].to_vec();
    b.extend_from_slice(&(short.len() as u32).to_le_bytes());
    b.extend_from_slice(short.as_bytes());
    b.extend_from_slice(&bytes[16 + short.len()..]);
    let _ = std::fs::remove_file(&bad);
    std::fs::write(&bad, b).unwrap();
    let e = restore_error(VmConfig::default(), &bad);
    assert!(e.contains("device state out of range"), "{e}");
}
