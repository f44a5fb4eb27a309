//! `kiln vm run` refuses bad input before anything starts: a one-line error naming the input,
//! a non-zero exit, no panic, and nothing left under `$KILN_HOME/vms`.

mod common;

use std::path::Path;
use std::process::Command;

fn vm_run(home: &Path, args: &[&str]) -> (bool, Option<i32>, String) {
    let out = Command::new(common::KILN)
        .env("KILN_HOME", home)
        .args(["vm", "run"])
        .args(args)
        .output()
        .expect("kiln runs");
    (
        out.status.success(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_vm_run_input_is_refused_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let kernel = files.path().join("vmlinuz");
    let rootfs = files.path().join("rootfs.ext4");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let (k, r) = (kernel.to_str().unwrap(), rootfs.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--name", "Bad_Name", "--rootfs", r, "--kernel", k],
            "Bad_Name",
        ),
        (vec!["--name=-lead", "--rootfs", r, "--kernel", k], "-lead"),
        (vec!["--vcpu", "0", "--rootfs", r, "--kernel", k], "0"),
        (vec!["--vcpu", "17", "--rootfs", r, "--kernel", k], "17"),
        (
            vec!["--ram", "32769", "--rootfs", r, "--kernel", k],
            "32769",
        ),
        (
            vec!["--home-size", "3Q", "--rootfs", r, "--kernel", k],
            "3Q",
        ),
        (vec!["--var-size", "3Q", "--rootfs", r, "--kernel", k], "3Q"),
        (
            vec!["--rootfs", r, "--kernel", "/nonexistent/vmlinuz"],
            "/nonexistent/vmlinuz",
        ),
        (
            vec!["--rootfs", "/nonexistent/rootfs.ext4", "--kernel", k],
            "/nonexistent/rootfs.ext4",
        ),
        (vec!["--image", "/nonexistent/image"], "/nonexistent/image"),
    ];
    for (args, names) in cases {
        let (ok, code, err) = vm_run(home.path(), &args);
        assert!(!ok, "{args:?} succeeded");
        assert_ne!(code, Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: expected one line: {err}"
        );
        assert!(
            err.contains(names),
            "{args:?}: error does not name {names}: {err}"
        );
        let vms = home.path().join("vms");
        let left: Vec<_> = std::fs::read_dir(&vms)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{args:?} left {left:?} under {}",
            vms.display()
        );
    }
}
