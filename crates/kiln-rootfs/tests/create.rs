//! `kiln_rootfs::create::create_image` from directories: the tree in rootfs.ext4 is the source
//! (read back with debugfs), an i386 tree also becomes v86's 9p filesystem (fs.json + fs/,
//! content addressed, zstd where it pays), and bad sources are refused with nothing left.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_rootfs::create::{create_image, CreateOptions, Source};
use kiln_rootfs::tree::Arch;
use sha2::{Digest, Sha256};

/// An ELF header claiming `machine` (3 i386, 62 amd64), padded to look like a binary.
fn elf(machine: u16) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = if machine == 3 { 1 } else { 2 };
    b[5] = 1;
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b
}

/// A small root tree: /bin/sh of `machine`, a kernel and initrd in /boot, owners, a symlink, a
/// hard link, a FIFO and a compressible file.
fn source_tree(dir: &Path, machine: u16) -> PathBuf {
    let root = dir.join("src");
    for d in ["bin", "boot", "etc", "home/user", "usr/bin"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("bin/sh"), elf(machine)).unwrap();
    fs::set_permissions(root.join("bin/sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("boot/vmlinuz-6.1.0-test"), b"a kernel").unwrap();
    fs::write(root.join("boot/initrd.img-6.1.0-test"), b"an initrd").unwrap();
    fs::write(root.join("etc/hostname"), b"kiln\n").unwrap();
    fs::write(root.join("etc/big"), "kiln ".repeat(4000)).unwrap();
    fs::write(root.join("etc/empty"), b"").unwrap();
    fs::write(root.join("home/user/notes"), b"mine\n").unwrap();
    fs::set_permissions(
        root.join("home/user/notes"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    if kiln_sys::process::is_root() {
        std::os::unix::fs::lchown(root.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::lchown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    }
    symlink("/bin/sh", root.join("usr/bin/sh")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname-link")).unwrap();
    kiln_sys::fs::mknod(&root.join("etc/fifo"), kiln_sys::fs::Node::Fifo, 0o600).unwrap();
    root
}

/// path → (type, mode, uid:gid, content) of a tree, links not followed.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            let v = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                todo.push(p.clone());
                format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
            } else if m.is_file() {
                format!(
                    "file {:o} {}:{} {:x}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    Sha256::digest(fs::read(&p).unwrap())
                )
            } else {
                format!("special {:o}", m.mode() & 0o7777)
            };
            out.insert(rel, v);
        }
    }
    out
}

fn opts(src: &Path, arch: Option<Arch>) -> CreateOptions {
    CreateOptions {
        source: Source::Dir(src.to_path_buf()),
        arch,
        kernel: None,
        initrd: None,
        size: None,
    }
}

#[test]
fn a_directory_becomes_an_ext4_image() {
    if !kiln_sys::process::is_root() {
        eprintln!("SKIP: reading rootfs.ext4 back keeps owners only as root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = source_tree(d.path(), 62);
    let out = d.path().join("image");
    let c = create_image(&opts(&src, Some(Arch::Amd64)), &out, &mut |_| {}).unwrap();
    assert_eq!(c.arch, Arch::Amd64);
    let m = kiln_rootfs::ImageManifest::load(&out).unwrap();
    assert_eq!(m.arch, Some(Arch::Amd64));
    assert!(
        m.fs9p.is_none(),
        "no 9p filesystem for an amd64 image (v86 is 32-bit)"
    );
    assert_eq!(fs::read(&m.kernel).unwrap(), b"a kernel");
    assert_eq!(fs::read(m.initrd.as_ref().unwrap()).unwrap(), b"an initrd");
    for top in ["bin", "boot", "etc", "home", "usr"] {
        let back = kiln_rootfs::extract_dir(&m.rootfs, &format!("/{top}"), &d.path().join("back"))
            .unwrap();
        let (want, got) = (listing(&src.join(top)), listing(&back));
        assert!(!want.is_empty());
        for (path, v) in &want {
            if v.starts_with("special") {
                continue; // debugfs rdump does not recreate FIFOs; the ext4 image has them
            }
            assert_eq!(got.get(path), Some(v), "{top}/{path}");
        }
    }
}

#[test]
fn an_i386_tree_is_also_a_9p_filesystem() {
    let d = tempfile::tempdir().unwrap();
    let src = source_tree(d.path(), 3);
    let out = d.path().join("image");
    let c = create_image(&opts(&src, None), &out, &mut |_| {}).unwrap();
    assert_eq!(c.arch, Arch::I386);
    let m = kiln_rootfs::ImageManifest::load(&out).unwrap();
    let fs9p = m.fs9p.expect("an i386 image has a 9p filesystem");
    let index: serde_json::Value = serde_json::from_slice(&fs::read(&fs9p.index).unwrap()).unwrap();
    assert_eq!(index["version"], 3);
    let find = |path: &str| -> serde_json::Value {
        let mut entries = index["fsroot"].clone();
        let mut found = serde_json::Value::Null;
        for part in path.split('/') {
            found = entries
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e[0] == part)
                .unwrap_or_else(|| panic!("{path}: no {part}"))
                .clone();
            entries = found[6].clone();
        }
        found
    };
    let blob = |path: &str| -> Vec<u8> {
        let e = find(path);
        let name = e[6].as_str().unwrap();
        let bytes = fs::read(fs9p.files.join(name)).unwrap();
        let data = if name.ends_with(".zst") {
            zstd::bulk::decompress(&bytes, e[1].as_u64().unwrap() as usize).unwrap()
        } else {
            bytes
        };
        assert_eq!(
            data.len() as u64,
            e[1].as_u64().unwrap(),
            "{path}: the size v86 reads"
        );
        assert!(
            name.starts_with(&format!("{:x}", Sha256::digest(&data))),
            "{path}: named by content"
        );
        data
    };
    assert_eq!(blob("bin/sh"), elf(3));
    assert_eq!(find("bin/sh")[3].as_u64().unwrap(), 0o100755);
    assert_eq!(blob("etc/big"), "kiln ".repeat(4000).as_bytes());
    assert!(
        find("etc/big")[6].as_str().unwrap().ends_with(".bin.zst"),
        "compressible content is compressed"
    );
    assert!(
        find("etc/empty")[6].as_str().unwrap().ends_with(".bin"),
        "empty files are plain"
    );
    assert_eq!(
        find("etc/hostname")[6],
        find("etc/hostname-link")[6],
        "a hard link shares its content"
    );
    assert_eq!(find("usr/bin/sh")[6], "/bin/sh");
    assert_eq!(find("usr/bin/sh")[3].as_u64().unwrap() & 0o170000, 0o120000);
    assert!(find("home/user")[6].is_array());
    if kiln_sys::process::is_root() {
        assert_eq!(
            (
                find("home/user/notes")[4].as_u64(),
                find("home/user/notes")[5].as_u64()
            ),
            (Some(1000), Some(1000))
        );
    }
    let etc = find("etc");
    assert!(
        !etc[6].as_array().unwrap().iter().any(|e| e[0] == "fifo"),
        "v86 has no FIFOs"
    );
}

fn refused(src: &Path, arch: Option<Arch>, d: &Path) -> String {
    let out = d.join("refused");
    let e = create_image(&opts(src, arch), &out, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(!out.exists(), "{e}");
    let stray: Vec<_> = fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("kiln-tmp"))
        .collect();
    assert!(stray.is_empty(), "{e}: temporaries left");
    e
}

#[test]
fn bad_sources_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = source_tree(d.path(), 62);
    let e = refused(&src, Some(Arch::I386), d.path());
    assert_eq!(
        e,
        format!(
            "{}: its binaries are amd64 (/bin/sh), not i386",
            src.display()
        )
    );
    fs::remove_file(src.join("bin/sh")).unwrap();
    let e = refused(&src, None, d.path());
    assert_eq!(
        e,
        format!("{}: has no /bin/sh: not a root filesystem", src.display())
    );
    fs::write(src.join("bin/sh"), b"#!/bin/true\n").unwrap();
    let e = refused(&src, None, d.path());
    assert_eq!(
        e,
        format!("{}: /bin/sh (/bin/sh) is not an ELF binary", src.display())
    );
    // A /bin/sh that is a symlink leaving the root is resolved inside it.
    fs::remove_file(src.join("bin/sh")).unwrap();
    symlink("../../../../../bin/dash", src.join("bin/sh")).unwrap();
    let e = refused(&src, None, d.path());
    assert_eq!(
        e,
        format!("{}: has no /bin/sh: not a root filesystem", src.display())
    );
    let e = refused(&d.path().join("nowhere"), None, d.path());
    assert!(e.contains("nowhere: cannot read"), "{e}");
}
