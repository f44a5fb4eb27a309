//! An image directory made by `kiln image create --from-oci` boots as a QEMU microVM: one image
//! format serves v86 (i386, see web_linux.rs) and microVMs (amd64). The OCI image is made by
//! umoci from kiln's amd64 Debian image's own tree (read back out of its rootfs.ext4 with
//! debugfs), so its kernel and initrd come from the tree's /boot and the guest has kiln's hook:
//! the VM gets its name, and SSH works.

mod common;

use std::path::Path;
use std::time::Duration;

use common::debian;
use common::kiln_in_ok as kiln_ok;

#[test]
fn an_oci_image_boots_as_a_microvm() {
    let Some(image) = debian::debian_image() else {
        return;
    };
    let base = kiln_rootfs::ImageManifest::load(&image).unwrap();
    let tmp = tempfile::tempdir_in(image.parent().unwrap()).unwrap();
    let tree = kiln_rootfs::extract_dir(&base.rootfs, "/", &tmp.path().join("x")).unwrap();
    assert!(tree.join("boot").is_dir(), "no /boot in {}", tree.display());
    common::require_tool("umoci");
    let layout = tmp.path().join("oci");
    let layout_s = layout.to_str().unwrap();
    let tagged = format!("{layout_s}:debian");
    for args in [
        vec!["init", "--layout", layout_s],
        vec!["new", "--image", &tagged],
        vec!["insert", "--image", &tagged, tree.to_str().unwrap(), "/"],
    ] {
        let (ok, said) = common::tool("umoci", &args);
        assert!(ok, "umoci {args:?}: {said}");
    }
    std::fs::remove_dir_all(&tree).unwrap();

    let out = tmp.path().join("made");
    let home_dir = tempfile::tempdir().unwrap();
    let home = home_dir.path();
    let _cleanup = common::KillOnDrop(home.to_path_buf());
    kiln_ok(
        home,
        &[
            "image",
            "create",
            out.to_str().unwrap(),
            "--from-oci",
            layout_s,
            "--arch",
            "amd64",
        ],
    );
    let made = kiln_rootfs::ImageManifest::load(&out).unwrap();
    assert_eq!(made.arch, Some(kiln_rootfs::tree::Arch::Amd64));
    assert!(made.fs9p.is_none(), "an amd64 image has no 9p filesystem");
    assert_eq!(
        debian::sha256(&made.kernel),
        debian::sha256(&base.kernel),
        "the kernel is the tree's /boot/vmlinuz-*"
    );
    assert!(made.initrd.as_deref().is_some_and(Path::is_file));
    let rootfs_before = kiln_sys::sparse::digest(&made.rootfs, None).unwrap();

    kiln_ok(
        home,
        &[
            "vm",
            "run",
            "--name",
            "made",
            "--image",
            out.to_str().unwrap(),
            "--vcpu",
            "1",
            "--ram",
            "512",
            "--net",
            "user",
        ],
    );
    let host = kiln_host::Host::new(home.to_path_buf()).with_supervisor(common::KILN);
    let log = host.vm_dir("made").join("serial.log");
    debian::wait_for_log(&log, "login:", Duration::from_secs(300)).unwrap();
    let said = kiln_ok(
        home,
        &[
            "vm",
            "ssh",
            "made",
            "--timeout",
            "120",
            "--",
            "uname -m; hostname; findmnt -n -o SOURCE /var",
        ],
    );
    let lines: Vec<&str> = said.lines().map(str::trim).collect();
    assert_eq!(lines, ["x86_64", "made", "/dev/vdc"], "{said}");
    // /var came from the created image's tree (extracted from its rootfs.ext4).
    let dpkg = kiln_ok(
        home,
        &[
            "vm",
            "ssh",
            "made",
            "--",
            "test -s /var/lib/dpkg/status && echo dpkg-ok",
        ],
    );
    assert_eq!(dpkg.trim(), "dpkg-ok");
    let stopped = common::kiln_in(home, &["stop", "made", "--timeout", "120"]);
    assert!(
        stopped.status.success(),
        "stop: {}{}",
        String::from_utf8_lossy(&stopped.stdout),
        String::from_utf8_lossy(&stopped.stderr)
    );
    // The VM wrote its own overlay, never the created image.
    assert_eq!(
        kiln_sys::sparse::digest(&made.rootfs, None).unwrap(),
        rootfs_before
    );
}
