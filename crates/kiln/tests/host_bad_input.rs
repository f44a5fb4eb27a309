//! Bad input to the library (`kiln_host::Host::run`): each case is a one-line error naming
//! the request field, and nothing is left under $KILN_HOME/vms.

use std::path::{Path, PathBuf};

use kiln_host::{Host, RunRequest};

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
    kiln_rootfs::make_ext4_disk(&rootfs, 64 << 20, Some(&tree), "root").unwrap();
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
    let host = Host::new(f.home.clone());
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
        let e = kiln_rootfs::parse_size(bad).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }
}
