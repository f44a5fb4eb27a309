//! `kiln_rootfs::oci::unpack` on OCI layouts, OCI archives and docker save tarballs made here
//! byte by byte: layers in order, whiteouts, opaque directories, owners, modes, links, device
//! nodes; and hostile images (escapes, missing blobs, wrong digests), each refused with nothing
//! left behind. Where umoci is installed, its unpack of the same layout is the reference.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One tar entry of a layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32, u64),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Fifo(&'a str),
    Char(&'a str, u32, u32),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data, m, owner) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(data.len() as u64);
                if p.contains("..") {
                    // The tar crate will not write such a name: put it in the header as is.
                    let name = &mut h.as_old_mut().name;
                    name.fill(0);
                    name[..p.len()].copy_from_slice(p.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                } else {
                    b.append_data(&mut h, p, *data).unwrap();
                }
            }
            E::Link(p, to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, to).unwrap();
            }
            E::Hard(p, to) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, to).unwrap();
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::Char(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(bytes).unwrap();
    g.finish().unwrap()
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// An OCI layout with `layers` (already compressed or not) in `dir`.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let h = sha(bytes);
        fs::write(blobs.join(&h), bytes).unwrap();
        (format!("sha256:{h}"), bytes.len())
    };
    // diff_ids: the digests of the uncompressed layers (umoci checks them).
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| {
            let mut plain = Vec::new();
            if l.starts_with(&[0x1f, 0x8b]) {
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&l[..]), &mut plain)
                    .unwrap();
            } else {
                plain = l.clone();
            }
            format!("\"sha256:{}\"", sha(&plain))
        })
        .collect();
    let config = format!(
        r#"{{"architecture":"386","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let (cd, cs) = put(config.as_bytes());
    let layer_descs: Vec<String> = layers
        .iter()
        .map(|l| {
            let (d, s) = put(l);
            let t = if l.starts_with(&[0x1f, 0x8b]) { "tar+gzip" } else { "tar" };
            format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.{t}","digest":"{d}","size":{s}}}"#)
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{}]}}"#,
        layer_descs.join(",")
    );
    let (md, ms) = put(manifest.as_bytes());
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"test"}}}}]}}"#
        ),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The two layers of the test image: a base, then changes with whiteouts.
fn test_layers(root: bool) -> Vec<Vec<u8>> {
    let mut base = vec![
        E::Dir("bin/", 0o755),
        E::File("bin/sh", b"#!shell\n", 0o755, 0),
        E::Dir("etc/", 0o755),
        E::File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, 0),
        E::File("etc/gone", b"removed by the upper layer\n", 0o644, 0),
        E::Dir("home/", 0o755),
        E::Dir("home/user/", 0o700),
        E::File("home/user/notes", b"mine\n", 0o600, 1000),
        E::Dir("opq/", 0o755),
        E::File("opq/lower", b"hidden by the opaque whiteout\n", 0o644, 0),
        E::Link("usr/bin/sh", "/bin/sh"),
        E::Hard("bin/sh-hard", "bin/sh"),
        E::Fifo("run-fifo"),
    ];
    if root {
        base.push(E::Char("dev-null", 1, 3));
    }
    let upper = vec![
        E::File("etc/.wh.gone", b"", 0o644, 0),
        E::File("opq/.wh..wh..opq", b"", 0o644, 0),
        E::File("opq/upper", b"kept\n", 0o644, 0),
        E::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
            0,
        ),
    ];
    vec![gzip(&layer(&base)), layer(&upper)]
}

/// Every path under `root` with its type, mode, owner and content or target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let t = m.file_type();
            let what = if t.is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if t.is_dir() {
                walk(root, &p, out);
                format!(
                    "dir {:o} {}:{}",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid()
                )
            } else if t.is_fifo() {
                format!("fifo {:o}", m.permissions().mode() & 0o7777)
            } else if t.is_char_device() {
                format!("char {:x}", m.rdev())
            } else {
                format!(
                    "file {:o} {}:{} {:?} links={}",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    String::from_utf8_lossy(&fs::read(&p).unwrap()),
                    m.nlink()
                )
            };
            out.insert(rel, what);
        }
    }
    walk(root, root, &mut out);
    out
}

fn root() -> bool {
    kiln_sys::process::is_root()
}

#[test]
fn layers_whiteouts_and_opaque_directories() {
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("layout");
    oci_layout(&layout, &test_layers(root()));
    let out = d.path().join("tree");
    let img = kiln_rootfs::oci::unpack(&layout, &out).unwrap();
    assert_eq!(img.architecture.as_deref(), Some("386"));
    assert_eq!(img.layers, 2);
    let t = tree(&out);
    assert!(!t.contains_key("etc/gone"), "whiteout: {t:#?}");
    assert!(
        !t.contains_key("opq/lower") && t.contains_key("opq/upper"),
        "opaque: {t:#?}"
    );
    assert!(!t.keys().any(|k| k.contains(".wh.")), "{t:#?}");
    assert_eq!(t["usr/bin/sh"], "link -> /bin/sh");
    assert!(
        t["etc/passwd"].contains("user:x:1000"),
        "the upper layer wins"
    );
    assert!(
        t["bin/sh"].starts_with("file 755 0:0") && t["bin/sh"].ends_with("links=2"),
        "{}",
        t["bin/sh"]
    );
    assert_eq!(t["run-fifo"], "fifo 600");
    if root() {
        assert_eq!(
            t["home/user/notes"],
            "file 600 1000:1000 \"mine\\n\" links=1"
        );
        assert_eq!(t["home/user"], "dir 700 0:0");
        assert_eq!(t["dev-null"], "char 103");
    }
    // The same image as an OCI archive and as a docker save tarball gives the same tree.
    let archive = d.path().join("image.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    let from_archive = d.path().join("from-archive");
    kiln_rootfs::oci::unpack(&archive, &from_archive).unwrap();
    assert_eq!(tree(&from_archive), t);

    let docker = d.path().join("docker.tar");
    let layers = test_layers(root());
    let mut b = tar::Builder::new(fs::File::create(&docker).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes).unwrap();
    };
    add("config.json", br#"{"architecture":"386"}"#);
    add("aaa/layer.tar", &layers[0]);
    add("bbb/layer.tar", &layers[1]);
    add("manifest.json", br#"[{"Config":"config.json","RepoTags":["t:1"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]"#);
    b.finish().unwrap();
    drop(b);
    let from_docker = d.path().join("from-docker");
    kiln_rootfs::oci::unpack(&docker, &from_docker).unwrap();
    assert_eq!(tree(&from_docker), t);
}

#[test]
fn umoci_agrees() {
    let Ok(out) = std::process::Command::new("umoci")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIP: umoci is not installed (apt-get install umoci)");
        return;
    };
    assert!(out.status.success());
    if !root() {
        eprintln!("SKIP: umoci unpack keeps owners only as root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("layout");
    oci_layout(&layout, &test_layers(true));
    let bundle = d.path().join("bundle");
    let st = std::process::Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:test", layout.display())])
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(st.success());
    let ours = d.path().join("ours");
    kiln_rootfs::oci::unpack(&layout, &ours).unwrap();
    assert_eq!(tree(&ours), tree(&bundle.join("rootfs")));
}

fn unpack_err(layout: &Path, d: &Path) -> String {
    let out = d.join(format!("out-{}", rand_suffix()));
    let e = kiln_rootfs::oci::unpack(layout, &out)
        .unwrap_err()
        .to_string();
    assert!(!out.exists(), "{e}: left {}", out.display());
    let stray: Vec<PathBuf> = fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("kiln-tmp"))
        .collect();
    assert!(stray.is_empty(), "{e}: temporaries left: {stray:?}");
    e
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

#[test]
fn hostile_images_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let make = |name: &str, layers: &[Vec<u8>]| {
        let p = d.path().join(name);
        oci_layout(&p, layers);
        p
    };
    let escape = make(
        "escape",
        &[layer(&[E::File("../../outside", b"x", 0o644, 0)])],
    );
    let e = unpack_err(&escape, d.path());
    assert!(e.contains("entry '../../outside' leaves the root"), "{e}");

    // A symlink to a host path, then a file through it: written inside the root.
    let host_dir = d.path().join("host-dir");
    fs::create_dir(&host_dir).unwrap();
    let via_link = make(
        "via-link",
        &[layer(&[
            E::Link("etc", host_dir.to_str().unwrap()),
            E::File("etc/evil", b"x", 0o644, 0),
            E::Link("up", "../../../.."),
            E::File("up/evil2", b"y", 0o644, 0),
        ])],
    );
    let out = d.path().join("via-link-out");
    kiln_rootfs::oci::unpack(&via_link, &out).unwrap();
    assert!(
        fs::read_dir(&host_dir).unwrap().next().is_none(),
        "wrote through a symlink onto the host"
    );
    assert!(out
        .join(host_dir.strip_prefix("/").unwrap())
        .join("evil")
        .is_file());
    assert!(out.join("evil2").is_file(), "'..' stops at the root");

    let missing = make("missing", &[layer(&[E::Dir("bin/", 0o755)])]);
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(missing.join("index.json")).unwrap()).unwrap();
    let mdigest = manifest["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(missing.join("blobs/sha256").join(&mdigest)).unwrap())
            .unwrap();
    let layer_hex = m["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let layer_path = missing.join("blobs/sha256").join(&layer_hex);
    let bytes = fs::read(&layer_path).unwrap();
    fs::remove_file(&layer_path).unwrap();
    let e = unpack_err(&missing, d.path());
    assert_eq!(
        e,
        format!("{}: blob sha256:{layer_hex} is missing", missing.display())
    );
    let mut tampered = bytes.clone();
    tampered[600] ^= 1;
    fs::write(&layer_path, &tampered).unwrap();
    let e = unpack_err(&missing, d.path());
    assert!(
        e.starts_with(&format!(
            "{}: blob sha256:{layer_hex} has digest sha256:",
            missing.display()
        )),
        "{e}"
    );

    let hard = make("hard", &[layer(&[E::Hard("stolen", "/etc/shadow")])]);
    let e = unpack_err(&hard, d.path());
    assert!(
        e.contains("hard link 'stolen' to '/etc/shadow', which is no file of the image"),
        "{e}"
    );

    let not_image = d.path().join("not-an-image");
    fs::create_dir(&not_image).unwrap();
    let e = unpack_err(&not_image, d.path());
    assert!(e.contains("no index.json or manifest.json"), "{e}");
}
