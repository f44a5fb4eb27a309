//! QEMU only ever sees bytes kiln's own reader validated: every image `kiln build` writes boots
//! on QEMU under `strace`, which shows QEMU opening nothing of the test's files but the VM's own
//! directory and a raw image or ISO itself (never a VMDK, VHD, VDI or QCOW2: those reach it as
//! a raw copy kiln wrote), and writing only what is writable. Hostile VMDKs that used to make
//! QEMU open a host file, and a QCOW2 with a backing file, are refused before QEMU starts.

mod common;

use std::path::{Path, PathBuf};

use std::process::{Command, Output};
use std::time::Duration;

use common::{built, opens, require_tool, traced_qemu, wait_for, KillOnDrop, KILN};

/// A test's world: images, a registry and a secret outside both, and QEMU behind strace.
struct World {
    // Declared first, so it runs before the directory goes: background VMs outlive a failed
    // assertion by design, so they end with the test.
    _cleanup: KillOnDrop,
    root: tempfile::TempDir,
    qemu: PathBuf,
    log: PathBuf,
}

impl World {
    fn new() -> World {
        require_tool("qemu-system-x86_64");
        require_tool("strace");
        let root = tempfile::tempdir().unwrap();
        for d in ["images", "home", "secret"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
        }
        std::fs::write(root.path().join("secret/shadow"), vec![0x42u8; 1 << 20]).unwrap();
        let (qemu, log) = traced_qemu(root.path());
        World {
            _cleanup: KillOnDrop(root.path().join("home")),
            root,
            qemu,
            log,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    /// `kiln vm run --disk IMAGE` on QEMU pc, named `name`.
    fn run_disk(&self, image: &Path, name: &str) -> Output {
        self.kiln(&[
            "vm",
            "run",
            "--disk",
            image.to_str().unwrap(),
            "--engine",
            "qemu",
            "--machine",
            "pc",
            "--name",
            name,
        ])
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(KILN)
            .env("KILN_HOME", self.path("home"))
            .env("KILN_QEMU", &self.qemu)
            .args(args)
            .output()
            .unwrap()
    }
}

/// Boots `file` (from `kiln build`) in the background on QEMU pc, waits for the banner, stops
/// it, and checks everything QEMU opened.
fn boots_seeing_only_its_own_files(file: &str) {
    let w = World::new();
    for f in [file, "boot-flat.vmdk"] {
        std::fs::copy(built().join(f), w.path("images").join(f)).unwrap();
    }
    let image = w.path("images").join(file);
    let name = file.replace('.', "-");
    let out = w.run_disk(&image, &name);
    assert!(
        out.status.success(),
        "kiln vm run {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vm_dir = w.path("home").join("vms").join(&name);
    wait_for(&format!("{file}'s banner"), Duration::from_secs(60), || {
        std::fs::read_to_string(vm_dir.join("serial.log"))
            .unwrap_or_default()
            .contains("ClientAPI")
    });
    let out = w.kiln(&["stop", &name, "--timeout", "10"]);
    assert!(out.status.success(), "kiln stop {file}");

    let opened = opens(&w.log);
    assert!(!opened.is_empty(), "strace saw no opens at all");
    let raw_like = file.ends_with(".img") || file.ends_with(".iso");
    let mine = |p: &Path| p.starts_with(&vm_dir) || (raw_like && p == image);
    for o in &opened {
        if o.path.starts_with(w.root.path()) {
            assert!(
                mine(&o.path),
                "{file}: QEMU opened {} (only its VM's directory and a raw image are allowed)",
                o.path.display()
            );
        }
        if o.write {
            assert!(
                !o.path.starts_with(w.root.path()) || mine(&o.path) && !file.ends_with(".iso"),
                "{file}: QEMU opened {} for writing",
                o.path.display()
            );
        }
    }
    // What QEMU booted: the image itself, or kiln's raw copy of it.
    let booted = if raw_like {
        image.clone()
    } else {
        vm_dir.join("disk.raw")
    };
    assert!(
        opened.iter().any(|o| o.path == booted),
        "{file}: QEMU never opened {} ({} opens logged)",
        booted.display(),
        opened.len()
    );
    let out = w.kiln(&["rm", &name]);
    assert!(out.status.success(), "kiln rm {file}");
}

#[test]
fn qemu_opens_only_raw_images_and_its_own_directory() {
    for file in [
        "boot.img",
        "boot.iso",
        "boot.qcow2",
        "boot.vmdk",
        "boot.vhd",
        "boot.vdi",
    ] {
        boots_seeing_only_its_own_files(file);
    }
}

#[test]
fn hostile_images_never_reach_qemu() {
    let w = World::new();
    let shadow = w.path("secret/shadow");
    let dir = w.path("images");
    std::fs::write(dir.join("data.raw"), vec![7u8; 1 << 20]).unwrap();
    let header = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n";
    let cases = [
        (
            "junk-tail.vmdk",
            format!(
                "{header}RW 2 FLAT \"{}\" 0 x=y\nRDONLY 2048 FLAT \"data.raw\" 0\n",
                shadow.display()
            ),
        ),
        (
            "parent.vmdk",
            format!(
                "{header}# parentFileNameHint=\"../secret/p.vmdk\"\nRW 2048 FLAT \"data.raw\" 0\n"
            ),
        ),
        (
            "absolute.vmdk",
            format!("{header}RW 2048 FLAT \"{}\" 0\n", shadow.display()),
        ),
        (
            "subdir.vmdk",
            format!("{header}RW 2048 FLAT \"../secret/shadow\" 0\n"),
        ),
    ];
    // A QCOW2 whose backing file is the secret (kiln refuses backing files outright).
    let backed = dir.join("backed.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&shadow)
        .arg(&backed)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img create");
    let mut files: Vec<(&str, Option<String>)> =
        cases.iter().map(|(f, t)| (*f, Some(t.clone()))).collect();
    files.push(("backed.qcow2", None));
    for (file, text) in files {
        let image = dir.join(file);
        if let Some(text) = text {
            std::fs::write(&image, text).unwrap();
        }
        let out = w.run_disk(&image, &file.replace('.', "-"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was booted");
        assert!(err.contains(file), "{file}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{file}: {err}");
    }
    let touched: Vec<_> = opens(&w.log)
        .into_iter()
        .filter(|o| o.path.starts_with(w.path("secret")))
        .collect();
    assert!(touched.is_empty(), "QEMU opened {touched:?}");
}
