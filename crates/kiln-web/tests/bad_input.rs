//! Bad input: clear one-line errors, no panic, and no partial site left behind.

mod common;

use std::path::Path;

use kiln_web::{prepare, serve, PrepareOptions, ServeOptions, ServeSource, WebError};

fn one_line(e: &WebError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "error is not one line: {s}");
    s
}

/// Nothing but the parent's original entries: no site, no temporary directory.
fn assert_nothing_left(parent: &Path, before: usize) {
    let n = std::fs::read_dir(parent).unwrap().count();
    assert_eq!(n, before, "prepare left files in {}", parent.display());
}

#[test]
fn nonexistent_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("site");
    let e = prepare(
        &tmp.path().join("missing.img"),
        &out,
        &PrepareOptions::default(),
    )
    .unwrap_err();
    let s = one_line(&e);
    assert!(
        s.contains("missing.img") && s.contains("No such file"),
        "{s}"
    );
    assert!(!out.exists());
}

#[test]
fn non_bootable_images() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = tmp.path().join("zero.img");
    std::fs::write(&zero, vec![0u8; 1 << 20]).unwrap();
    let tiny = tmp.path().join("tiny.img");
    std::fs::write(&tiny, b"hi").unwrap();
    let before = std::fs::read_dir(tmp.path()).unwrap().count();
    for (img, want) in [(&zero, "0x55AA"), (&tiny, "smaller than one")] {
        let e = prepare(img, &tmp.path().join("site"), &PrepareOptions::default()).unwrap_err();
        let s = one_line(&e);
        assert!(s.contains("not bootable") && s.contains(want), "{s}");
        assert_nothing_left(tmp.path(), before);
    }
    let e = prepare(
        tmp.path(),
        &tmp.path().join("site"),
        &PrepareOptions::default(),
    )
    .unwrap_err();
    assert!(one_line(&e).contains("directory"), "{e}");
}

#[test]
fn unwritable_or_occupied_out() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    // A regular file in the way (root ignores permission bits, so use structure instead).
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let before = std::fs::read_dir(tmp.path()).unwrap().count();
    let e = prepare(&img, &file.join("site"), &PrepareOptions::default()).unwrap_err();
    let s = one_line(&e);
    assert!(s.contains("file"), "{s}");
    let e = prepare(&img, &file, &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WebError::OutNotEmpty { .. }), "{e}");
    // A directory with someone else's files is not overwritten.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), b"mine").unwrap();
    let e = prepare(&img, &other, &PrepareOptions::default()).unwrap_err();
    assert!(one_line(&e).contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read(other.join("keep.txt")).unwrap(), b"mine");
    // /proc does not take new directories.
    let e = prepare(
        &img,
        Path::new("/proc/kiln-site"),
        &PrepareOptions::default(),
    )
    .unwrap_err();
    assert!(one_line(&e).contains("/proc"), "{e}");
    assert_nothing_left(tmp.path(), before + 1);
}

#[test]
fn warm_marker_that_never_appears() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    if !common::web_dir().join("node_modules/v86").is_dir() {
        panic!("web/node_modules is missing: run `npm ci` in web/ (scripts/setup does it)");
    }
    let out = tmp.path().join("site");
    let opts = PrepareOptions {
        warm: Some("never printed".into()),
        warm_timeout: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    let e = prepare(&img, &out, &opts).unwrap_err();
    let s = one_line(&e);
    assert!(
        s.contains("never printed") && s.contains("ClientAPI"),
        "{s}"
    );
    assert!(!out.exists());
}

#[test]
fn missing_asset_is_named_with_its_install_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    let mut assets = kiln_web::Assets::locate();
    assets.seabios_dir = tmp.path().join("no-seabios");
    let opts = PrepareOptions {
        assets: Some(assets.clone()),
        ..Default::default()
    };
    let out = tmp.path().join("site");
    let s = one_line(&prepare(&img, &out, &opts).unwrap_err());
    assert!(
        s.contains("bios.bin") && s.contains("apt-get install seabios"),
        "{s}"
    );
    assert!(!out.exists());
    assets.seabios_dir = "/usr/share/seabios".into();
    assets.web_dir = tmp.path().join("no-web");
    let opts = PrepareOptions {
        assets: Some(assets),
        ..Default::default()
    };
    let s = one_line(&prepare(&img, &out, &opts).unwrap_err());
    assert!(s.contains("libv86.js") && s.contains("npm ci"), "{s}");
}

#[test]
fn serve_port_in_use_and_public_address() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = ServeOptions {
        addr: taken.local_addr().unwrap(),
        ..Default::default()
    };
    let e = serve(ServeSource::Image(img.clone()), opts, |_| {
        panic!("must not start")
    })
    .unwrap_err();
    let s = one_line(&e);
    assert!(
        s.contains("already in use") && s.contains(&taken.local_addr().unwrap().to_string()),
        "{s}"
    );
    let opts = ServeOptions {
        addr: "0.0.0.0:0".parse().unwrap(),
        ..Default::default()
    };
    let e = serve(ServeSource::Image(img), opts, |_| panic!("must not start")).unwrap_err();
    assert!(one_line(&e).contains("`public`"), "{e}");
    let e = ServeSource::from_path(tmp.path()).unwrap_err();
    assert!(one_line(&e).contains("not a kiln site"), "{e}");
}
