//! Bad input: each case is a one-line error, and nothing is left under $KILN_HOME/vms.
//! A stand-in engine keeps this test independent of QEMU; storage and validation are real.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use kiln_host::{Ended, Engine, Host, HostError, LaunchSpec, RunRequest, ShutdownWatch, Started};

/// An engine whose "VM" is `sleep 60`: enough to exercise claiming, storage and the supervisor.
struct SleepEngine;

struct Sleeping(Child);

impl Started for Sleeping {
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn wait(mut self: Box<Self>) -> Ended {
        let _ = self.0.wait();
        Ended {
            reason: "exited".into(),
            description: "sleep ended".into(),
            guest_powered_off: false,
        }
    }
}

impl Engine for SleepEngine {
    fn name(&self) -> &'static str {
        "sleep"
    }
    fn accelerator(&self) -> &'static str {
        "none"
    }
    fn command_line(&self, _: &LaunchSpec) -> Vec<String> {
        vec!["sleep".into(), "60".into()]
    }
    fn start(&self, _: &LaunchSpec) -> Result<Box<dyn Started>, HostError> {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        Ok(Box::new(Sleeping(child)))
    }
    fn power_button(&self, p: &Path) -> Result<Box<dyn ShutdownWatch>, HostError> {
        Err(HostError::NotRunning(p.display().to_string()))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    rootfs: PathBuf,
    kernel: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("var/lib/dpkg")).unwrap();
    std::fs::create_dir_all(tree.join("home")).unwrap();
    std::fs::write(tree.join("var/lib/dpkg/status"), "x\n").unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    kiln_host::make_ext4_disk(&rootfs, 64 << 20, Some(&tree), "root").unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    Fixture {
        home: dir.path().join("kiln-home"),
        _dir: dir,
        rootfs,
        kernel,
    }
}

fn good(f: &Fixture) -> RunRequest {
    RunRequest {
        rootfs: Some(f.rootfs.clone()),
        kernel: Some(f.kernel.clone()),
        home_size: 32 << 20,
        var_size: 32 << 20,
        ..RunRequest::default()
    }
}

fn vms_entries(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_requests_fail_cleanly() {
    let f = fixture();
    let host = Host::new(f.home.clone(), Box::new(SleepEngine));
    let cases: Vec<(&str, RunRequest)> = vec![
        (
            "invalid name",
            RunRequest {
                name: Some("Bad_Name".into()),
                ..good(&f)
            },
        ),
        (
            "name too long",
            RunRequest {
                name: Some("a".repeat(65)),
                ..good(&f)
            },
        ),
        (
            "vcpu 0",
            RunRequest {
                vcpu: 0,
                ..good(&f)
            },
        ),
        (
            "vcpu 17",
            RunRequest {
                vcpu: 17,
                ..good(&f)
            },
        ),
        (
            "ram over 32768",
            RunRequest {
                ram_mib: 32769,
                ..good(&f)
            },
        ),
        (
            "missing kernel",
            RunRequest {
                kernel: Some("/nonexistent/vmlinuz".into()),
                ..good(&f)
            },
        ),
        (
            "missing rootfs",
            RunRequest {
                rootfs: Some("/nonexistent/rootfs".into()),
                ..good(&f)
            },
        ),
        (
            "no kernel",
            RunRequest {
                kernel: None,
                ..good(&f)
            },
        ),
        (
            "missing image",
            RunRequest {
                rootfs: None,
                kernel: None,
                image: Some("/nonexistent".into()),
                ..good(&f)
            },
        ),
    ];
    for (what, req) in cases {
        let e = host.run(&req).expect_err(what).to_string();
        assert!(!e.contains('\n') && !e.is_empty(), "{what}: {e}");
        assert!(
            vms_entries(&f.home).is_empty(),
            "{what}: left {:?}",
            vms_entries(&f.home)
        );
    }
    // Sizes are parsed before a request exists.
    for bad in ["3Q", "", "1T", "2.5G"] {
        let e = kiln_host::parse_size(bad).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn one_of_two_racing_runs_wins() {
    let f = fixture();
    let host = Arc::new(Host::new(f.home.clone(), Box::new(SleepEngine)));
    let req = RunRequest {
        name: Some("racer".into()),
        ..good(&f)
    };
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (host, req) = (Arc::clone(&host), req.clone());
            std::thread::spawn(move || host.run(&req))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    let loss = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(matches!(loss, HostError::NameInUse(_)), "{loss}");
    assert_eq!(vms_entries(&f.home), vec!["racer".to_string()]);
    let rec = host.get("racer").unwrap();
    assert!(rec.is_alive());
    // The seed's /var content reached the VM's own /var disk (via debugfs extraction).
    let out = Command::new("debugfs")
        .args(["-R", "cat /lib/dpkg/status"])
        .arg(&rec.meta.var_disk)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n");
    // A running VM is not removed without force; kill then rm leaves nothing.
    assert!(matches!(
        host.remove("racer", false),
        Err(HostError::Running(_))
    ));
    let killed = host.kill("racer").unwrap();
    assert!(!killed.is_alive());
    assert_eq!(killed.effective_state(), kiln_host::VmState::Stopped);
    host.remove("racer", false).unwrap();
    assert!(vms_entries(&f.home).is_empty());
}
