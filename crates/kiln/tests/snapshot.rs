//! Snapshots of a real Debian microVM on QEMU: the proof of issue 13. A VM writes a file and
//! runs a counter; a snapshot is taken; the VM writes on, and stops. Resumed from the
//! snapshot, it has the file as it was at the snapshot, the counter goes on from where it was,
//! the console answers at once and the clock is corrected. A clone of the snapshot runs beside
//! its origin, each with its own disks, name and host key. Broken, foreign and mismatched
//! snapshots are refused with one line, and nothing resumes from them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::debian::{self, Shell};
use common::kiln_in_ok as kiln_ok;
use kiln_host::{Host, VmState};

/// The one-line error of a kiln command that must fail.
fn kiln_err(home: &Path, args: &[&str]) -> String {
    let out = common::kiln_in(home, args);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "kiln {args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "kiln {args:?}: not one line: {err}");
    err
}

fn shell(host: &Host, name: &str) -> Shell {
    Shell::connect(
        host.get(name)
            .unwrap()
            .meta
            .console_socket
            .as_deref()
            .unwrap(),
    )
}

/// The counter's value (the loop truncates the file before it writes: an empty read is read
/// again).
fn counter(sh: &mut Shell) -> u64 {
    let mut v = String::new();
    for _ in 0..20 {
        v = sh.run("cat /root/counter");
        if let Ok(n) = v.trim().parse() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("counter: {v:?}")
}

/// The guest's clock minus the host's, in seconds.
fn clock_skew(sh: &mut Shell) -> i64 {
    let guest: i64 = sh.run("date +%s").trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    guest - host
}

fn sha(path: &Path) -> String {
    debian::sha256(path)
}

#[test]
fn debian_snapshot_resume_clone_and_bad_snapshots() {
    let Some(image) = debian::debian_image() else {
        return;
    };
    let base = kiln_rootfs::ImageManifest::load(&image).unwrap().rootfs;
    let base_before = sha(&base);
    let home_dir = tempfile::tempdir().unwrap();
    let home = home_dir.path();
    let _cleanup = common::KillOnDrop(home.to_path_buf());
    let host = Host::new(home.to_path_buf()).with_supervisor(common::KILN);
    let img = image.to_str().unwrap();

    kiln_ok(
        home,
        &[
            "vm", "run", "--name", "origin", "--image", img, "--vcpu", "1", "--ram", "1024",
            "--net", "user",
        ],
    );
    let log = host.vm_dir("origin").join("serial.log");
    debian::wait_for_log(&log, "login:", Duration::from_secs(300)).unwrap();
    let mut sh = shell(&host, "origin");
    sh.run("echo before > /root/f; sync");
    sh.run(
        "(i=0; while :; do i=$((i+1)); echo $i > /root/counter; sleep 1; done) >/dev/null 2>&1 &",
    );
    common::wait_for("the counter", Duration::from_secs(30), || {
        counter(&mut sh) >= 2
    });
    let at_snapshot = counter(&mut sh);

    // The snapshot: the VM runs on.
    let t0 = Instant::now();
    let said = kiln_ok(home, &["vm", "snapshot", "origin", "--tag", "t1"]);
    eprintln!("snapshot in {:?}: {said}", t0.elapsed());
    assert!(said.starts_with("origin:t1 "), "{said}");
    assert!(host.get("origin").unwrap().is_alive());
    let list: serde_json::Value =
        serde_json::from_str(&kiln_ok(home, &["vm", "snapshots", "origin", "--json"])).unwrap();
    let m = &list[0];
    assert_eq!(m["tag"], "t1");
    assert_eq!(m["machine_format"], "qemu-migration+mapped-ram");
    assert_eq!(m["config"]["ram_mib"], 1024);
    let stored = m["stored_bytes"].as_u64().unwrap();
    assert!(
        stored < 700 << 20,
        "{stored} bytes stored: more than the memory a booted Debian touches"
    );
    let disks: Vec<&str> = m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(
        disks,
        ["/dev/vda", "/dev/vdb", "/dev/vdc"],
        "writable disks"
    );
    // A tag in use is refused.
    let e = kiln_err(home, &["vm", "snapshot", "origin", "--tag", "t1"]);
    assert!(e.contains("exists already"), "{e}");

    // After the snapshot: writes the snapshot must not see.
    sh.run("echo after > /root/f; echo after > /home/h; sync");
    let after = counter(&mut sh);
    drop(sh);
    kiln_ok(home, &["vm", "stop", "origin", "--timeout", "60"]);

    // Resume: the state of the snapshot, at once.
    let t0 = Instant::now();
    let said = kiln_ok(home, &["vm", "resume", "origin", "--tag", "t1"]);
    let mut sh = shell(&host, "origin");
    assert_eq!(sh.run("cat /root/f"), "before");
    eprintln!("resume to a console answer in {:?} ({said})", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "resume took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        sh.run("test -e /home/h && echo present || echo absent"),
        "absent"
    );
    let c = counter(&mut sh);
    assert!(
        c >= at_snapshot && c <= at_snapshot + 3,
        "counter {c}: it was {at_snapshot} at the snapshot and {after} after it"
    );
    common::wait_for("the counter to go on", Duration::from_secs(30), || {
        counter(&mut sh) > c
    });
    // The guest's clock was where the snapshot left it; kiln's resume watcher sets it.
    common::wait_for("the guest's clock", Duration::from_secs(20), || {
        clock_skew(&mut sh).abs() <= 2
    });
    let rec = host.get("origin").unwrap();
    assert_eq!(rec.meta.resumed_from.as_deref(), Some("t1"));
    // The network came back with it: SSH answers, with the host key kiln pinned.
    let said = kiln_ok(home, &["vm", "ssh", "origin", "--", "cat", "/root/f"]);
    assert_eq!(said.trim(), "before");

    // A clone of the snapshot beside its origin.
    kiln_ok(
        home,
        &["vm", "run", "--from", "origin:t1", "--name", "twin"],
    );
    let mut twin = shell(&host, "twin");
    assert_eq!(twin.run("cat /root/f"), "before");
    common::wait_for("the clone's own name", Duration::from_secs(20), || {
        twin.run("hostname") == "twin"
    });
    sh.run("echo origin > /root/only-origin; echo origin > /home/only-origin; sync");
    twin.run("echo twin > /root/only-twin; echo twin > /var/only-twin; sync");
    for (s, other) in [(&mut sh, "twin"), (&mut twin, "origin")] {
        for dir in ["/root", "/home", "/var"] {
            assert_eq!(
                s.run(&format!(
                    "test -e {dir}/only-{other} && echo seen || echo unseen"
                )),
                "unseen",
                "{dir}/only-{other}"
            );
        }
    }
    let twin_rec = host.get("twin").unwrap();
    assert_eq!(twin_rec.meta.resumed_from.as_deref(), Some("origin:t1"));
    // The twin's root disk names it, and its guest saw the change (which alone gives a clone
    // made within seconds of its snapshot, when the clocks still agree, its own identity).
    let serial = kiln_rootfs::root_serial(&twin_rec.meta.id);
    assert_ne!(
        serial,
        kiln_rootfs::root_serial(&host.get("origin").unwrap().meta.id)
    );
    assert_eq!(twin.run("cat /sys/block/vda/serial"), serial);
    assert_eq!(
        twin.run("dmesg | grep -o 'kiln: resumed as [a-z0-9-]*' | tail -1"),
        format!("kiln: resumed as {serial}")
    );
    // Its own host key, applied in the guest (the seed's), pinned by kiln.
    let pinned = std::fs::read_to_string(host.vm_dir("twin").join("known_hosts")).unwrap();
    common::wait_for("the clone's own host key", Duration::from_secs(20), || {
        pinned.contains(&twin.run("cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub"))
    });
    // Its own network: SSH reaches the clone, not its origin, at its own published port.
    let said = kiln_ok(home, &["vm", "ssh", "twin", "--", "hostname"]);
    assert_eq!(said.trim(), "twin");
    assert_ne!(
        twin_rec.meta.net.ssh,
        host.get("origin").unwrap().meta.net.ssh
    );
    // The clone's disks are overlays and copies of deltas, not copies of whole disks.
    for d in &twin_rec.config.disks {
        if !d.read_only {
            let used = std::fs::metadata(&d.path).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert!(used.blocks() * 512 < 64 << 20, "{}", d.path.display());
        }
    }
    // Its origin's snapshot backs its disks: it stays while the clone lives.
    let e = kiln_err(home, &["vm", "rm-snapshot", "origin", "t1"]);
    assert!(e.contains("twin"), "{e}");
    drop(twin);
    kiln_ok(home, &["vm", "kill", "twin"]);
    kiln_ok(home, &["vm", "rm", "twin"]);

    // A snapshot that stops the VM.
    kiln_ok(home, &["vm", "snapshot", "origin", "--tag", "t2", "--stop"]);
    drop(sh);
    let rec = host.get("origin").unwrap();
    assert_eq!(rec.effective_state(), VmState::Stopped);
    assert_eq!(
        rec.meta.exit_reason.as_deref(),
        Some("stopped after snapshot 't2'")
    );
    let root = rec.meta.overlay.clone().unwrap();
    let root_before = sha(&root);

    // Broken snapshots, each a copy of t2 with one thing wrong: refused, the VM untouched.
    let store = host.vm_dir("origin").join("snapshots");
    let copy = |tag: &str| {
        let to = store.join(tag);
        let ok = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(store.join("t2"))
            .arg(&to)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let m = to.join("snapshot.json");
        let text = std::fs::read_to_string(&m)
            .unwrap()
            .replace("\"tag\": \"t2\"", &format!("\"tag\": \"{tag}\""));
        std::fs::write(&m, text).unwrap();
        to
    };
    let truncated = copy("truncated");
    let machine = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("machine"))
        .unwrap();
    let len = machine.metadata().unwrap().len();
    machine.set_len(len / 2).unwrap();
    let damaged = copy("damaged");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(damaged.join("vda.qcow2"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], 0).unwrap();
    }
    let edit = |tag: &str, from: &str, to: &str| {
        let dir = copy(tag);
        let m = dir.join("snapshot.json");
        let text = std::fs::read_to_string(&m).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        std::fs::write(&m, text.replacen(from, to, 1)).unwrap();
    };
    edit(
        "foreign",
        &format!("\"vm_id\": \"{}\"", rec.meta.id),
        "\"vm_id\": \"00000000000000000000000000000000\"",
    );
    edit("bigger", "\"ram_mib\": 1024", "\"ram_mib\": 2048");
    for (tag, why) in [
        ("truncated", "truncated"),
        ("damaged", "does not match its checksum"),
        ("foreign", "another VM"),
        ("bigger", "RAM (MiB) 2048, this VM has 1024"),
        ("nope", "no such snapshot"),
    ] {
        let e = kiln_err(home, &["vm", "resume", "origin", "--tag", tag]);
        assert!(e.contains(why), "{tag}: {e}");
        let rec = host.get("origin").unwrap();
        assert!(!rec.is_alive(), "{tag}: resumed");
        assert_eq!(sha(&root), root_before, "{tag}: the root disk changed");
    }
    let e = kiln_err(home, &["vm", "resume", "origin", "--tag", "../t2"]);
    assert!(e.contains("snapshot tag"), "{e}");

    // The good one still resumes, after all that.
    kiln_ok(home, &["vm", "resume", "origin", "--tag", "t2"]);
    let mut sh = shell(&host, "origin");
    assert_eq!(sh.run("cat /root/only-origin"), "origin");
    drop(sh);
    let e = kiln_err(home, &["vm", "resume", "origin", "--tag", "t2"]);
    assert!(e.contains("running") || e.contains("is still"), "{e}");
    kiln_ok(home, &["vm", "kill", "origin"]);
    for tag in ["t1", "truncated"] {
        kiln_ok(home, &["vm", "rm-snapshot", "origin", tag]);
    }
    let tags: Vec<String> = serde_json::from_str::<serde_json::Value>(&kiln_ok(
        home,
        &["vm", "snapshots", "origin", "--json"],
    ))
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .map(|m| m["tag"].as_str().unwrap().to_string())
    .collect();
    assert!(
        !tags.contains(&"t1".to_string()) && tags.contains(&"t2".to_string()),
        "{tags:?}"
    );
    kiln_ok(home, &["vm", "rm", "origin"]);
    assert_eq!(sha(&base), base_before, "the base image changed");
}

/// Reads `stream` until `needle` has arrived (after what `seen` holds), at most `timeout`.
fn read_until(stream: &mut std::os::unix::net::UnixStream, seen: &mut String, needle: &str) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
        match stream.read(&mut buf) {
            Ok(0) => panic!("console closed; got {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
}

/// The 256-byte program's REPL keeps a half-typed line across a snapshot: typed before, the
/// VM stopped and resumed by another process, finished after, the whole line comes back
/// reversed.
fn half_typed_line(engine: &str) {
    use std::io::Write;
    let home_dir = tempfile::tempdir().unwrap();
    let home = home_dir.path();
    let _cleanup = common::KillOnDrop(home.to_path_buf());
    let rec = common::start_disk_vm(home, "fw", engine);
    let socket = rec.meta.console_socket.clone().unwrap();
    let mut console = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut seen = String::new();
    read_until(&mut console, &mut seen, "$ ");
    console.write_all(b"hel").unwrap();
    read_until(&mut console, &mut seen, "$ hel");
    drop(console);
    let said = kiln_ok(home, &["vm", "snapshot", "fw", "--tag", "half", "--stop"]);
    assert!(said.contains("VM stopped"), "{said}");
    let t0 = Instant::now();
    kiln_ok(home, &["vm", "resume", "fw"]);
    let mut console = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    console.write_all(b"lo\r").unwrap();
    let mut seen = String::new();
    read_until(&mut console, &mut seen, "olleh\r\n$ ");
    eprintln!(
        "{engine}: resume to the REPL's answer in {:?}",
        t0.elapsed()
    );
    assert!(!seen.contains("ClientAPI"), "it booted again: {seen:?}");
    let list: serde_json::Value =
        serde_json::from_str(&kiln_ok(home, &["vm", "snapshots", "fw", "--json"])).unwrap();
    eprintln!("{engine}: {}", list[0]["machine_format"]);
    kiln_ok(home, &["vm", "kill", "fw"]);
    // A truncated machine state is refused, and the VM stays stopped.
    let machine = home.join("vms/fw/snapshots/half/machine");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&machine)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
    let e = kiln_err(home, &["vm", "resume", "fw"]);
    assert!(e.contains("truncated"), "{e}");
    assert!(!Host::new(home.to_path_buf()).get("fw").unwrap().is_alive());
}

#[test]
fn a_half_typed_line_survives_a_snapshot_on_qemu() {
    common::require_tool("qemu-system-x86_64");
    half_typed_line("qemu");
}

#[test]
fn a_half_typed_line_survives_a_snapshot_on_the_builtin_vmm() {
    if !common::kvm_or_skip("a_half_typed_line_survives_a_snapshot_on_the_builtin_vmm") {
        return;
    }
    half_typed_line("builtin");
}
