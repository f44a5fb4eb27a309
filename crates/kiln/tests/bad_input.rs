//! Bad input gets a one-line error naming the input, a non-zero exit, no panic, and nothing
//! half-written.

mod common;

use std::path::Path;

use common::{built, kiln};

/// Asserts a clean failure: non-zero exit (not a panic's 101), one line on stderr that names `name`.
fn assert_clean_error(args: &[&str], name: &str, what: &str) -> String {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what}: kiln {args:?} succeeded");
    assert_ne!(
        out.status.code(),
        Some(101),
        "{what}: kiln panicked: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: expected one line, got: {stderr}"
    );
    assert!(
        stderr.contains(name),
        "{what}: error does not name {name}: {stderr}"
    );
    stderr
}

/// Nothing but `keep` in `dir`: no output, no temporary file.
fn assert_only(dir: &Path, keep: &[&str]) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(keep.contains(&name.as_str()), "left behind: {name}");
    }
}

#[test]
fn program_over_256_bytes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.bin");
    std::fs::write(&big, vec![0x90u8; 300]).unwrap();
    let p = big.to_str().unwrap();
    let err = assert_clean_error(&["check", "--program", p], "big.bin", "check");
    assert!(err.contains("300") && err.contains("256"), "{err}");
    assert_clean_error(&["size", "--program", p], "big.bin", "size");
    let out = tmp.path().join("out");
    assert_clean_error(
        &["build", "--program", p, "--out", out.to_str().unwrap()],
        "big.bin",
        "build",
    );
    assert!(
        !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
        "build left output"
    );
}

#[test]
fn missing_files_are_named() {
    assert_clean_error(
        &["inspect", "/nonexistent/disk.qcow2"],
        "/nonexistent/disk.qcow2",
        "inspect",
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.qcow2");
    assert_clean_error(
        &["convert", "/nonexistent/disk.img", out.to_str().unwrap()],
        "/nonexistent/disk.img",
        "convert",
    );
    assert_only(tmp.path(), &[]);
    assert_clean_error(
        &["check", "--program", "/nonexistent/p.bin"],
        "/nonexistent/p.bin",
        "check",
    );
    assert_clean_error(
        &["run", "--engine", "qemu", "/nonexistent/boot.img"],
        "/nonexistent/boot.img",
        "run",
    );
}

/// Copies a built image into `dir`, lets `damage` change it, and checks inspect and convert refuse it.
fn refuse_damaged(file: &str, what: &str, damage: impl Fn(&mut Vec<u8>)) {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(built().join(file)).unwrap();
    damage(&mut bytes);
    let path = tmp.path().join(file);
    std::fs::write(&path, &bytes).unwrap();
    if file == "boot.vmdk" {
        std::fs::copy(
            built().join("boot-flat.vmdk"),
            tmp.path().join("boot-flat.vmdk"),
        )
        .unwrap();
    }
    let p = path.to_str().unwrap();
    let label = format!("{what} {file}");
    assert_clean_error(&["inspect", p], file, &label);
    let out = tmp.path().join("out.img");
    assert_clean_error(&["convert", p, out.to_str().unwrap()], file, &label);
    assert_only(tmp.path(), &[file, "boot-flat.vmdk"]);
}

fn put_u32_be(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn truncated_images_are_refused() {
    refuse_damaged("boot.qcow2", "truncated", |b| b.truncate(100));
    refuse_damaged("boot.qcow2", "truncated", |b| {
        let l = b.len();
        b.truncate(l / 2)
    });
    refuse_damaged("boot.vdi", "truncated", |b| b.truncate(300));
    refuse_damaged("boot.vdi", "truncated", |b| {
        let l = b.len();
        b.truncate(l - 4096)
    });
    refuse_damaged("boot.iso", "truncated", |b| b.truncate(40 * 1024));
    // A fixed VHD without its footer would be plain raw data, but the name says VHD.
    refuse_damaged("boot.vhd", "truncated", |b| {
        let l = b.len();
        b.truncate(l - 300)
    });
}

#[test]
fn corrupt_images_are_refused() {
    // qcow2: an unknown version, an impossible cluster size, an L1 table far past the end.
    refuse_damaged("boot.qcow2", "corrupt", |b| put_u32_be(b, 4, 99));
    refuse_damaged("boot.qcow2", "corrupt", |b| put_u32_be(b, 20, 40));
    refuse_damaged("boot.qcow2", "corrupt", |b| {
        b[40..48].copy_from_slice(&(1u64 << 50).to_be_bytes())
    });
    // VHD: a footer whose checksum does not match.
    refuse_damaged("boot.vhd", "corrupt", |b| {
        let l = b.len();
        b[l - 512 + 40] ^= 0xFF
    });
    // VDI: a bad signature, and a block map entry pointing far past the end of the file.
    refuse_damaged("boot.vdi", "corrupt", |b| b[0x40] ^= 0xFF);
    refuse_damaged("boot.vdi", "corrupt", |b| {
        let blocks = u32::from_le_bytes(b[0x154..0x158].try_into().unwrap()) as usize;
        b[blocks..blocks + 4].copy_from_slice(&0x7FFF_0000u32.to_le_bytes());
    });
    // VMDK: a descriptor that is not one.
    refuse_damaged("boot.vmdk", "corrupt", |b| {
        *b = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT\n"
            .to_vec()
    });
}

#[test]
fn vmdk_extent_outside_its_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("images");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(tmp.path().join("secret"), vec![0x41u8; 1 << 20]).unwrap();
    let desc = std::fs::read_to_string(built().join("boot.vmdk")).unwrap();
    for target in ["../secret", "/etc/shadow"] {
        let evil = desc.replace("\"boot-flat.vmdk\"", &format!("\"{target}\""));
        assert_ne!(evil, desc, "descriptor names its extent boot-flat.vmdk");
        let path = inner.join("evil.vmdk");
        std::fs::write(&path, evil).unwrap();
        let p = path.to_str().unwrap();
        let err = assert_clean_error(&["inspect", p], "evil.vmdk", target);
        assert!(err.contains("outside"), "{err}");
        let out = inner.join("leak.img");
        assert_clean_error(&["convert", p, out.to_str().unwrap()], "evil.vmdk", target);
        assert!(!out.exists(), "convert wrote {}", out.display());
        assert_clean_error(&["run", "--engine", "qemu", p], "evil.vmdk", target);
    }
}

#[test]
fn unknown_output_extension_asks_for_a_format() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("disk.xyz");
    let err = assert_clean_error(
        &[
            "convert",
            built().join("boot.img").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        "disk.xyz",
        "convert",
    );
    assert!(err.contains("--format"), "{err}");
    assert_only(tmp.path(), &[]);
}

/// A closed stdout (`kiln inspect IMAGE | head -0`) ends kiln quietly: no panic, no message.
#[test]
fn closed_stdout_ends_quietly() {
    let image = common::built().join("boot.qcow2");
    for args in [
        vec!["inspect", image.to_str().unwrap()],
        vec!["ps", "--json"],
        vec!["size"],
    ] {
        let mut child = common::kiln_command()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end before kiln writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && err.is_empty(),
            "{args:?}: {err}"
        );
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked");
    }
}

#[test]
fn image_create_refuses_what_is_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img");
    let out = out.to_str().unwrap();
    assert_clean_error(
        &["image", "create", out, "--from-dir", "/nonexistent/tree"],
        "/nonexistent/tree",
        "image create --from-dir",
    );
    assert_clean_error(
        &[
            "image",
            "create",
            out,
            "--from-oci",
            "/nonexistent/image.tar",
        ],
        "/nonexistent/image.tar",
        "image create --from-oci",
    );
    // A directory without /bin/sh, and a file that is no OCI archive.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = assert_clean_error(
        &[
            "image",
            "create",
            out,
            "--from-dir",
            empty.to_str().unwrap(),
        ],
        "empty",
        "image create of an empty tree",
    );
    assert!(e.contains("has no /bin/sh"), "{e}");
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert_clean_error(
        &["image", "create", out, "--from-oci", junk.to_str().unwrap()],
        "junk.tar",
        "image create of junk",
    );
    assert_clean_error(
        &["image", "create", out, "--from-dir", "/", "--arch", "arm64"],
        "arm64",
        "image create --arch arm64",
    );
    assert_only(tmp.path(), &["empty", "junk.tar"]);
}

#[test]
fn snapshot_commands_name_what_is_wrong() {
    for (args, name, what) in [
        (
            &["vm", "snapshot", "nope"][..],
            "nope",
            "no such VM to snapshot",
        ),
        (
            &["vm", "snapshot", "nope", "--tag", "../x"],
            "../x",
            "a tag that is a path",
        ),
        (&["vm", "resume", "nope"], "nope", "no such VM to resume"),
        (&["vm", "snapshots", "nope"], "nope", "no such VM to list"),
        (&["vm", "rm-snapshot", "nope", "t"], "nope", "no such VM"),
        (
            &["vm", "run", "--from", "nocolon"],
            "nocolon",
            "--from without a tag",
        ),
        (
            &["vm", "run", "--from", "nope:t"],
            "nope",
            "--from a VM that does not exist",
        ),
    ] {
        assert_clean_error(args, name, what);
    }
    // A clone's machine is the snapshot's: no --ram, --vcpu or image with --from.
    let out = kiln(&["vm", "run", "--from", "a:t", "--ram", "512"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the combination");
}
