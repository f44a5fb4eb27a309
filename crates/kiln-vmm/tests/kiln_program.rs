//! Boots the real kiln boot program (crates/kiln-boot) from a raw disk and an El Torito
//! CD, talks to its serial REPL and powers it off with the ACPI power button.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, BannerProbe};
use kiln_vmm::{BootDevice, Disk, ExitReason, FileDisk, MemDisk, VideoOutput, Vm, VmConfig};

fn kiln_sector() -> [u8; 512] {
    let p = kiln_boot::program().expect("assemble kiln program");
    kiln_boot::boot_sector(&p).expect("boot sector")
}

/// kiln's program on a 1 MiB raw disk, with serial-only output.
fn kiln_raw_disk() -> (VmConfig, Box<dyn Disk>) {
    let mut disk = vec![0u8; 1 << 20];
    disk[..512].copy_from_slice(&kiln_sector());
    let config = VmConfig {
        video: VideoOutput::VgaOnly,
        ..VmConfig::default()
    };
    (config, Box::new(MemDisk::new(disk)))
}

/// Boots `disk`, checks banner, echo and power-off; returns (Vm::new -> banner, exits).
fn repl_session(config: VmConfig, disk: Box<dyn Disk>) -> (Duration, kiln_vmm::ExitCounters) {
    let probe = BannerProbe::new("ClientAPI\r\n");
    let t0 = Instant::now();
    let mut vm = Vm::new(config, disk, Box::new(probe.clone())).expect("create VM");
    let created = t0.elapsed();
    let handle = vm.handle();
    let _ = probe.handle.set(handle.clone());
    let runner = std::thread::spawn(move || vm.run());
    let out = &probe.capture;
    out.wait_for("ClientAPI\r\n", Duration::from_secs(10));
    let (banner_at, at_banner) = *probe.hit.get().expect("banner probe fired");
    handle.send_input(b"hello\r");
    out.wait_for("olleh\r\n", Duration::from_secs(10));
    handle.send_input(b"kiln\n");
    out.wait_for("nlik\r\n", Duration::from_secs(10));
    handle.press_power_button();
    let watchdog = handle.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        watchdog.kill();
    });
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::PoweredOff);
    let text = out.text();
    assert!(text.starts_with("ClientAPI\r\n"), "{text:?}");
    eprintln!(
        "MEASURE: Vm::new {created:?}; Vm::new -> banner {:?}; exits to banner {at_banner:?}; total {:?}",
        banner_at - t0,
        handle.counters()
    );
    (banner_at - t0, at_banner)
}

#[test]
fn kiln_program_raw_disk() {
    if !kvm_or_skip("kiln_program_raw_disk") {
        return;
    }
    let (config, disk) = kiln_raw_disk();
    let (_, exits) = repl_session(config, disk);
    assert!(
        exits.total < 2000,
        "too many exits before the banner: {exits:?}"
    );
}

#[test]
fn kiln_program_el_torito_cd() {
    if !kvm_or_skip("kiln_program_el_torito_cd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("boot.bin"), kiln_sector()).unwrap();
    let iso = dir.path().join("kiln.iso");
    let status = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-b",
            "boot.bin",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-o",
        ])
        .arg(&iso)
        .arg(&root)
        .status()
        .expect("xorriso must be installed to build the test ISO");
    assert!(status.success(), "xorriso failed");
    let config = VmConfig {
        boot: BootDevice::Cdrom,
        video: VideoOutput::VgaOnly,
        ..VmConfig::default()
    };
    repl_session(config, Box::new(FileDisk::open(&iso, true).unwrap()));
}

/// A guest polling COM1 for a key costs few exits while idle, and still answers at once.
#[test]
fn idle_polling_guest_sleeps_but_answers_at_once() {
    if !kvm_or_skip("idle_polling_guest_sleeps_but_answers_at_once") {
        return;
    }
    let (config, disk) = kiln_raw_disk();
    let out = common::Capture::default();
    let mut vm = Vm::new(config, disk, Box::new(out.clone())).expect("create VM");
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    out.wait_for("ClientAPI\r\n", Duration::from_secs(10));
    let before = handle.counters().total;
    std::thread::sleep(Duration::from_millis(500));
    let idle = handle.counters().total - before;
    // Unthrottled, the program's two-port loop makes ~100k exits in 500 ms here; throttled,
    // about two per millisecond.
    assert!(idle < 5_000, "{idle} exits in 500 ms of idling");
    let asked = Instant::now();
    handle.send_input(b"hello\r");
    out.wait_for("olleh\r\n", Duration::from_secs(10));
    assert!(
        asked.elapsed() < Duration::from_millis(100),
        "answered after {:?}",
        asked.elapsed()
    );
    let pressed = Instant::now();
    handle.press_power_button();
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::PoweredOff);
    assert!(
        pressed.elapsed() < Duration::from_millis(100),
        "powered off after {:?}",
        pressed.elapsed()
    );
    eprintln!("MEASURE: {idle} exits in 500 ms idle");
}

/// With the BIOS screen mirrored onto the console (the default), kiln's program writes every
/// character to int 10h and COM1, and the console shows it once.
#[test]
fn kiln_program_console_shows_its_output_once() {
    if !kvm_or_skip("kiln_program_console_shows_its_output_once") {
        return;
    }
    let (_, disk) = kiln_raw_disk();
    let config = VmConfig {
        video: VideoOutput::Console,
        ..VmConfig::default()
    };
    let out = common::Capture::default();
    let mut vm = Vm::new(config, disk, Box::new(out.clone())).expect("create VM");
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    out.wait_for("$ ", Duration::from_secs(10));
    handle.send_input(b"hello\r");
    out.wait_for("olleh\r\n$ ", Duration::from_secs(10));
    // Give a duplicate every chance to show up.
    std::thread::sleep(Duration::from_millis(200));
    handle.kill();
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::Killed);
    assert_eq!(out.text(), "ClientAPI\r\n$ hello\r\nolleh\r\n$ ");
}
