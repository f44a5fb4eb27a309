//! The one VM model: a firmware VM in the background through the same registry, console and
//! supervisor as every other VM; a killed supervisor takes its engine with it; VMs start from
//! many threads of one process.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{built, kiln, kiln_in, require_tool, start_disk_vm, wait_for, KillOnDrop, KILN};
use kiln_host::{DiskRequest, End, EngineKind, Host, HostError, VmState};

fn firmware_vm_in_background(engine: &str) {
    let home = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(home.path().to_path_buf());
    let name = format!("fw-{engine}");
    let rec = start_disk_vm(home.path(), &name, engine);
    assert_eq!(rec.meta.state, VmState::Running);
    assert!(rec.is_alive());
    // The console replays what the guest printed before it was attached, then relays.
    let mut console = std::process::Command::new(KILN)
        .env("KILN_HOME", home.path())
        .args(["vm", "console", &name, "--linger", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = console.stdin.take().unwrap();
        thread::sleep(Duration::from_millis(300));
        stdin.write_all(b"hello\r").unwrap();
    }
    let out = console.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains("ClientAPI"), "no banner: {seen:?}");
    assert!(seen.contains("olleh"), "no reversed line: {seen:?}");
    // `kiln ps` and `kiln vm ls` are one list.
    let ps = kiln_in(home.path(), &["ps", "--json"]);
    let ls = kiln_in(home.path(), &["vm", "ls", "--json"]);
    assert_eq!(ps.stdout, ls.stdout);
    let listed: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(listed[0]["meta"]["name"], name.as_str());
    assert_eq!(listed[0]["meta"]["kind"], "firmware");
    assert_eq!(listed[0]["meta"]["state"], "running");
    // `kiln stop` presses the power button: the guest powers off, exit 0.
    let out = kiln_in(home.path(), &["stop", &name]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("guest powered off"), "{said}");
    let rec = Host::new(home.path().to_path_buf()).get(&name).unwrap();
    assert_eq!(rec.effective_state(), VmState::Stopped);
    assert_eq!(rec.end(), Some(End::PoweredOff));
    let log = std::fs::read_to_string(rec.meta.log.unwrap()).unwrap();
    assert!(
        log.contains("ClientAPI") && log.contains("olleh"),
        "{log:?}"
    );
    // Its sockets are gone; `kiln vm rm` removes it.
    assert!(!rec.meta.control_socket.exists());
    let out = kiln_in(home.path(), &["rm", &name]);
    assert!(out.status.success());
    assert!(!home.path().join("vms").join(&name).exists());
}

#[test]
fn firmware_vm_in_background_on_qemu() {
    require_tool("qemu-system-x86_64");
    firmware_vm_in_background("qemu");
}

#[test]
fn firmware_vm_in_background_on_builtin() {
    if common::kvm_or_skip("firmware_vm_in_background_on_builtin") {
        firmware_vm_in_background("builtin");
    }
}

fn supervisor_killed(engine: &str) {
    let home = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(home.path().to_path_buf());
    let name = format!("orphan-{engine}");
    let rec = start_disk_vm(home.path(), &name, engine);
    let supervisor = rec.meta.supervisor_pid.expect("supervisor pid");
    let engine_pid = rec.meta.pid.expect("engine pid");
    assert!(kiln_sys::process::alive(supervisor, None));
    assert!(kiln_sys::process::signal(supervisor, libc::SIGKILL));
    wait_for(
        "the engine to die with its supervisor",
        Duration::from_secs(5),
        || !kiln_sys::process::alive(engine_pid, rec.meta.pid_start),
    );
    // The registry says stopped, and why: as soon as the last of the killed process's threads
    // has let go of its lock (its main thread can be a zombie a moment before).
    let ps = || -> serde_json::Value {
        serde_json::from_slice(&kiln_in(home.path(), &["ps", "--json"]).stdout).unwrap()
    };
    wait_for(
        "the registry to say stopped",
        Duration::from_secs(5),
        || ps()[0]["meta"]["state"] == "stopped",
    );
    let listed = ps();
    assert_eq!(listed[0]["meta"]["end"]["kind"], "crashed", "{listed}");
    let why = listed[0]["meta"]["exit_reason"].as_str().unwrap();
    assert!(why.contains("supervisor"), "{why}");
    // The name is not blocked: rm works, and the name can be used again.
    assert!(kiln_in(home.path(), &["rm", &name]).status.success());
    let again = start_disk_vm(home.path(), &name, engine);
    assert!(again.is_alive());
    assert_eq!(
        kiln_in(home.path(), &["kill", &name]).status.code(),
        Some(0)
    );
}

#[test]
fn killed_supervisor_leaves_no_qemu() {
    require_tool("qemu-system-x86_64");
    supervisor_killed("qemu");
}

#[test]
fn killed_supervisor_leaves_no_builtin_vm() {
    if common::kvm_or_skip("killed_supervisor_leaves_no_builtin_vm") {
        supervisor_killed("builtin");
    }
}

/// The library starts VMs from several threads of one process (each VM's supervisor is a
/// re-executed kiln, not a fork of this multi-threaded process), and of two racing runs for one
/// name exactly one wins.
#[test]
fn vms_start_from_many_threads() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(home.path().to_path_buf());
    let host = Arc::new(Host::new(home.path().to_path_buf()).with_supervisor(KILN));
    let names = ["t-0", "t-1", "t-2", "racer", "racer"];
    let handles: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let host = Arc::clone(&host);
            // Each VM writes to its disk: each has its own (QEMU locks a disk to one writer).
            let image = home.path().join(format!("disk-{i}.img"));
            std::fs::copy(built().join("boot.img"), &image).unwrap();
            let req = DiskRequest {
                name: Some(name.to_string()),
                image,
                engine: Some(EngineKind::QemuPc),
                ..DiskRequest::default()
            };
            thread::spawn(move || host.run_disk(&req))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (name, r) in names.iter().zip(&results).take(3) {
        assert!(r.is_ok(), "{name}: {:?}", r.as_ref().err());
    }
    let racers = &results[3..];
    assert_eq!(racers.iter().filter(|r| r.is_ok()).count(), 1, "{racers:?}");
    let loss = racers.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(matches!(loss, HostError::NameInUse { .. }), "{loss}");
    let listed: Vec<String> = host
        .list()
        .unwrap()
        .into_iter()
        .filter(|r| r.is_alive())
        .map(|r| r.meta.name)
        .collect();
    if listed != ["racer", "t-0", "t-1", "t-2"] {
        for rec in host.list().unwrap() {
            let log =
                std::fs::read_to_string(rec.config.dir.join("engine.log")).unwrap_or_default();
            eprintln!(
                "{}: {:?} {:?}\n{log}",
                rec.meta.name,
                rec.effective_state(),
                rec.end()
            );
        }
        panic!("not all running: {listed:?}");
    }
    // Stopping from several threads as well: every guest powers off. (A press before the
    // program has set up its power button would be lost, as on a real PC: wait for the banner.)
    for name in &listed {
        let log = host.get(name).unwrap().meta.log.unwrap();
        wait_for("the banner", Duration::from_secs(20), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ClientAPI"))
        });
    }
    let handles: Vec<_> = listed
        .iter()
        .map(|name| {
            let (host, name) = (Arc::clone(&host), name.clone());
            thread::spawn(move || host.stop(&name, Duration::from_secs(10)))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), End::PoweredOff);
    }
    // A running VM is not removed without force; a stopped one is.
    assert!(host.list().unwrap().iter().all(|r| !r.is_alive()));
    for name in &listed {
        host.remove(name, false).unwrap();
    }
    assert!(host.list().unwrap().is_empty());
}

/// `kiln kill` ends a VM at once (exit 0: the kill was done) and `kiln stop` then reports that
/// nothing runs by that name; `rm` refuses a running VM without --force.
#[test]
fn kill_and_rm_any_vm_by_name() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(home.path().to_path_buf());
    start_disk_vm(home.path(), "victim", "qemu");
    let out = kiln_in(home.path(), &["rm", "victim"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = kiln_in(home.path(), &["kill", "victim"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("killed"));
    let out = kiln_in(home.path(), &["stop", "victim"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running VM named 'victim'"));
    let out = kiln_in(home.path(), &["vm", "rm", "victim"]);
    assert!(out.status.success());
    let _ = kiln(&["ps"]);
}
