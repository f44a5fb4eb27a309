//! The proof with a real Debian guest on QEMU microvm: two VMs from one image, each with its own
//! copy-on-write root and /home and /var disks, graceful stop through ACPI, vm.json, ls and rm;
//! and, next to them in the same registry, a firmware VM: `kiln ps` and `kiln vm ls` list all
//! three with the same fields, and `kiln stop` powers each kind off through the power button.

mod common;

use std::time::{Duration, Instant};

use common::debian;
use kiln_host::{Boot, End, Host, HostError, RunRequest, VmState};

#[test]
fn two_vms_from_one_image() {
    let Some(image) = debian::debian_image() else {
        return;
    };
    let manifest = kiln_rootfs::ImageManifest::load(&image).unwrap();
    let base_before = debian::sha256(&manifest.rootfs);
    let home = tempfile::tempdir().unwrap();
    // QEMU runs under strace: the proof that it opens the base image read-only by the path
    // kiln gives it, and writes nothing outside the VMs' directories.
    let trace = tempfile::tempdir().unwrap();
    let (qemu, qemu_log) = common::traced_qemu(trace.path());
    // This file has one test, so no other thread reads the environment meanwhile.
    std::env::set_var("KILN_QEMU", &qemu);
    let host = Host::new(home.path().to_path_buf()).with_supervisor(common::KILN);
    // VMs outlive their creator by design: a failing assertion must not leave them running.
    let _cleanup = common::KillOnDrop(home.path().to_path_buf());

    let mut names = Vec::new();
    for name in ["proof-a", "proof-b"] {
        let t0 = Instant::now();
        let rec = host
            .run(&RunRequest {
                name: Some(name.into()),
                vcpu: 1,
                ram_mib: 768,
                image: Some(image.clone()),
                ..RunRequest::default()
            })
            .unwrap();
        eprintln!(
            "{name}: started (pid {:?}) in {:?}",
            rec.meta.pid,
            t0.elapsed()
        );
        assert_eq!(rec.meta.state, VmState::Running);
        assert!(rec.is_alive());
        names.push(name);
    }
    // A second VM with a name in use is refused, leaving the first alone.
    let e = host
        .run(&RunRequest {
            name: Some("proof-a".into()),
            image: Some(image.clone()),
            ..RunRequest::default()
        })
        .unwrap_err();
    assert!(matches!(e, HostError::NameInUse { .. }), "{e}");
    assert!(host.get("proof-a").unwrap().is_alive());

    for name in &names {
        let log = host.vm_dir(name).join("serial.log");
        let t = debian::wait_for_log(&log, "login:", Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{name}: serial login prompt after {t:?} more");
    }

    let mut shells: Vec<_> = names
        .iter()
        .map(|n| {
            debian::Shell::connect(host.get(n).unwrap().meta.console_socket.as_deref().unwrap())
        })
        .collect();
    // Autologin: wait for the root shell.
    for (shell, name) in shells.iter_mut().zip(&names) {
        assert_eq!(shell.run("hostname"), *name, "hostname from kiln.name");
        assert_eq!(shell.run("findmnt -no SOURCE /home"), "/dev/vdb");
        assert_eq!(shell.run("findmnt -no SOURCE /var"), "/dev/vdc");
        assert_eq!(shell.run("findmnt -no FSTYPE /tmp"), "tmpfs");
        assert_eq!(shell.run("findmnt -no FSTYPE /run"), "tmpfs");
        assert_eq!(shell.run("findmnt -no SOURCE /"), "/dev/vda");
        // The /var disk starts with the image's /var: dpkg works.
        assert!(shell
            .run("dpkg -s systemd | grep Status")
            .contains("install ok installed"));
        // resolv.conf comes from kiln.dns= through the kiln hook, not from the base image.
        let Boot::Linux { cmdline, .. } = host.get(name).unwrap().config.boot else {
            panic!("{name} is not a Linux VM");
        };
        let resolv = shell.run("readlink /etc/resolv.conf; cat /etc/resolv.conf");
        assert!(resolv.starts_with("/run/kiln/resolv.conf"), "{resolv}");
        if let Some(dns) = cmdline
            .split_whitespace()
            .find_map(|a| a.strip_prefix("kiln.dns="))
        {
            for ns in dns.split(',') {
                assert!(resolv.contains(&format!("nameserver {ns}")), "{resolv}");
            }
        }
        shell.run(&format!(
            "echo {name} > /home/owner; echo {name} > /var/owner"
        ));
    }
    // A file written to / in one VM is invisible in the other.
    shells[0].run("echo only-a > /root/only-a; sync");
    assert_eq!(shells[0].run("cat /root/only-a"), "only-a");
    assert_eq!(
        shells[1].run("test -e /root/only-a && echo present || echo absent"),
        "absent"
    );
    for (shell, name) in shells.iter_mut().zip(&names) {
        assert_eq!(shell.run("cat /home/owner"), *name, "own /home");
        assert_eq!(shell.run("cat /var/owner"), *name, "own /var");
    }
    drop(shells);

    // vm.json holds the fields the issue lists.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(host.vm_dir("proof-a").join("vm.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "id",
        "name",
        "pid",
        "created_at",
        "net",
        "control_socket",
        "log",
        "rootfs",
        "kernel",
        "initrd",
        "overlay",
        "home_disk",
        "var_disk",
        "state",
        "exit_reason",
    ] {
        assert!(
            json["meta"].get(key).is_some(),
            "meta.{key} missing: {json}"
        );
    }
    for key in [
        "vcpu",
        "ram_mib",
        "disks",
        "kernel",
        "cmdline",
        "engine",
        "accelerator",
    ] {
        assert!(
            json["config"].get(key).is_some(),
            "config.{key} missing: {json}"
        );
    }
    let disks = json["config"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 4, "root, /home, /var and the SSH seed disk");
    assert_eq!(disks[3]["serial"], "kiln-seed");
    assert_eq!(disks[3]["read_only"], true);
    assert_eq!(json["meta"]["state"], "running");

    // One registry: a firmware VM started with `kiln vm run --disk` sits next to the microVMs,
    // and `kiln ps --json` and `kiln vm ls --json` list all of them with the same fields.
    let kiln = |args: &[&str]| {
        std::process::Command::new(common::KILN)
            .env("KILN_HOME", home.path())
            .args(args)
            .output()
            .unwrap()
    };
    let build = home.path().join("build");
    assert!(kiln(&["build", "--out", build.to_str().unwrap()])
        .status
        .success());
    let fw = kiln(&[
        "vm",
        "run",
        "--disk",
        build.join("boot.img").to_str().unwrap(),
        "--name",
        "proof-fw",
    ]);
    assert!(
        fw.status.success(),
        "{}",
        String::from_utf8_lossy(&fw.stderr)
    );
    let ps: serde_json::Value = serde_json::from_slice(&kiln(&["ps", "--json"]).stdout).unwrap();
    let ls: serde_json::Value =
        serde_json::from_slice(&kiln(&["vm", "ls", "--json"]).stdout).unwrap();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["meta"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&ps), ["proof-a", "proof-b", "proof-fw"], "{ps}");
    assert_eq!(names(&ps), names(&ls));
    let keys = |r: &serde_json::Value, part: &str| -> Vec<String> {
        let mut k: Vec<String> = r[part].as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let rows = ps.as_array().unwrap();
    assert_eq!(
        keys(&rows[0], "meta"),
        keys(&rows[2], "meta"),
        "meta fields differ"
    );
    for r in rows {
        assert_eq!(r["meta"]["state"], "running", "{r}");
        for key in [
            "name",
            "vcpu",
            "ram_mib",
            "engine",
            "accelerator",
            "kind",
            "disks",
            "console",
        ] {
            assert!(r["config"].get(key).is_some(), "config.{key} missing: {r}");
        }
    }
    assert_eq!(rows[0]["config"]["engine"], "qemu-microvm");
    assert_eq!(rows[0]["meta"]["kind"], "linux");
    assert_eq!(rows[2]["meta"]["kind"], "firmware");

    // Graceful stop through the ACPI power button, within 60 s, for both kinds: exit 0 is
    // "guest powered off" in the README's table. (The program must be up to see the button:
    // with two Linux guests busy under TCG, SeaBIOS may take seconds.)
    let fw_log = host.get("proof-fw").unwrap().meta.log.unwrap();
    debian::wait_for_log(&fw_log, "ClientAPI", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("proof-fw: {e}"));
    for (name, timeout) in [("proof-fw", "30"), ("proof-a", "60")] {
        let t0 = Instant::now();
        let out = kiln(&["stop", name, "--timeout", timeout]);
        let said = String::from_utf8_lossy(&out.stdout);
        eprintln!("{name}: {said} ({:?})", t0.elapsed());
        assert_eq!(out.status.code(), Some(0), "{name}: {said}");
        assert!(said.contains("guest powered off"), "{name}: {said}");
    }
    assert_eq!(host.get("proof-fw").unwrap().end(), Some(End::PoweredOff));
    host.remove("proof-fw", false).unwrap();
    let a = host.get("proof-a").unwrap();
    assert_eq!(a.effective_state(), VmState::Stopped);
    assert_eq!(a.meta.exit_reason.as_deref(), Some("guest powered off"));

    // ls sees both; rm refuses the running one without --force.
    let listed: Vec<_> = host
        .list()
        .unwrap()
        .into_iter()
        .map(|r| (r.meta.name.clone(), r.effective_state()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("proof-a".to_string(), VmState::Stopped),
            ("proof-b".to_string(), VmState::Running)
        ]
    );
    let e = host.remove("proof-b", false).unwrap_err();
    assert!(matches!(e, HostError::Running(_)), "{e}");
    assert!(host.get("proof-b").unwrap().is_alive());
    host.remove("proof-a", false).unwrap();
    assert!(!host.vm_dir("proof-a").exists());
    host.remove("proof-b", true).unwrap();
    assert!(!host.vm_dir("proof-b").exists());
    assert!(host.list().unwrap().is_empty());

    // The base image was never written.
    assert_eq!(
        base_before,
        debian::sha256(&manifest.rootfs),
        "base rootfs changed"
    );
    assert!(manifest.rootfs.exists() && manifest.kernel.exists());

    // QEMU opened the base by kiln's path, and nothing of the shared image for writing.
    let base = manifest.rootfs.canonicalize().unwrap();
    let opened = common::opens(&qemu_log);
    assert!(
        opened.iter().any(|o| o.path == base),
        "QEMU never opened the base {} ({} opens logged)",
        base.display(),
        opened.len()
    );
    let image_dir = image.canonicalize().unwrap();
    for o in opened.iter().filter(|o| o.path.starts_with(&image_dir)) {
        assert!(
            !o.write,
            "QEMU opened {} (of the shared image) for writing",
            o.path.display()
        );
    }
}
