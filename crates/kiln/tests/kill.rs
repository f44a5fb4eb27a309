//! `kill -9` at points throughout `convert`, `build` and `prepare`, then the next command in
//! the same directory: no temporary file survives it, and no output is ever half-written (each
//! is absent, or complete).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{kiln, kiln_command};

/// The temporaries in `dir` (kiln names them `.NAME.kiln-tmp-…`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".kiln-tmp-"))
        .collect()
}

/// Runs `make()` to completion once to learn how long it takes, then five more times, killing
/// it with SIGKILL at 10 %, 30 %, 50 %, 70 % and 90 % of that; after each kill, `next()` (an
/// ordinary command writing into `dir`) must leave no temporary behind and `check()` must find
/// every output absent or complete.
fn kill_throughout(dir: &Path, make: impl Fn() -> Command, next: impl Fn(), check: impl Fn()) {
    let t = Instant::now();
    let out = make().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = t.elapsed();
    check();
    let mut stranded_before_next = 0;
    for tenth in [1u32, 3, 5, 7, 9] {
        let mut child = make().spawn().unwrap();
        std::thread::sleep(full * tenth / 10);
        let _ = child.kill();
        child.wait().unwrap();
        stranded_before_next += temporaries(dir).len();
        check();
        next();
        assert_eq!(
            temporaries(dir),
            Vec::<String>::new(),
            "killed at {tenth}0 % of {full:?}: the next command left them"
        );
    }
    eprintln!("{full:?} per run; {stranded_before_next} temporaries left by kills, all swept");
}

#[test]
fn killed_conversions_strand_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // 96 MiB of data in 1 MiB pieces with gaps: a conversion that takes a moment.
    let f = std::fs::File::create(&src).unwrap();
    let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for i in 0..96u64 {
        f.write_all_at(&piece, i * (2 << 20)).unwrap();
    }
    drop(f);
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    for format in ["qcow2", "vmdk", "vdi"] {
        let out = dir.path().join(format!("out.{format}"));
        let out_s = out.to_str().unwrap().to_string();
        let _ = std::fs::remove_file(&out);
        kill_throughout(
            dir.path(),
            || {
                let _ = std::fs::remove_file(&out);
                let mut c = kiln_command();
                c.args(["convert", src.to_str().unwrap(), &out_s]);
                c
            },
            || {
                let next = dir.path().join("next.qcow2");
                let r = kiln(&["convert", small.to_str().unwrap(), next.to_str().unwrap()]);
                assert!(r.status.success());
            },
            || {
                // The output is absent, or a complete image.
                if out.exists() {
                    let r = kiln(&["inspect", &out_s]);
                    assert!(
                        r.status.success(),
                        "{format}: half-written output: {}",
                        String::from_utf8_lossy(&r.stdout)
                    );
                }
            },
        );
    }
}

#[test]
fn killed_builds_strand_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("build");
    let out_s = out.to_str().unwrap().to_string();
    kill_throughout(
        &out,
        || {
            let mut c = kiln_command();
            c.args(["build", "--out", &out_s]);
            c
        },
        || {
            let r = kiln(&["build", "--out", &out_s]);
            assert!(r.status.success());
        },
        || {
            for e in std::fs::read_dir(&out).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(".kiln-tmp-")
                    || name.ends_with(".bin")
                    || name.ends_with("-flat.vmdk")
                {
                    continue;
                }
                let r = kiln(&["inspect", p.to_str().unwrap()]);
                assert!(r.status.success(), "half-written {name}");
            }
        },
    );
}

#[test]
fn killed_prepares_strand_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("boot.img");
    std::fs::copy(common::built().join("boot.img"), &image).unwrap();
    let site = dir.path().join("site");
    let (image_s, site_s) = (
        image.to_str().unwrap().to_string(),
        site.to_str().unwrap().to_string(),
    );
    kill_throughout(
        dir.path(),
        || {
            let mut c = kiln_command();
            c.args(["prepare", &image_s, &site_s]);
            c
        },
        || {
            let r = kiln(&["prepare", &image_s, &site_s]);
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        },
        || {
            // The site is absent or whole (its page and the disk it boots).
            if site.exists() {
                assert!(site.join("index.html").is_file(), "half-written site");
            }
        },
    );
}

#[test]
fn a_stale_temporary_of_a_live_process_is_kept() {
    // Sweeping must never take the file another running kiln is writing.
    let dir = tempfile::tempdir().unwrap();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let start = kiln_sys::process::start_time(sleeper.id()).unwrap();
    let live = dir
        .path()
        .join(format!(".x.img.kiln-tmp-{}-{start}-0", sleeper.id()));
    std::fs::write(&live, b"busy").unwrap();
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let r = kiln(&[
        "convert",
        small.to_str().unwrap(),
        dir.path().join("o.qcow2").to_str().unwrap(),
    ]);
    assert!(r.status.success());
    assert!(live.exists(), "a live writer's temporary was swept");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let r = kiln(&[
        "convert",
        small.to_str().unwrap(),
        dir.path().join("p.qcow2").to_str().unwrap(),
    ]);
    assert!(r.status.success());
    assert!(!live.exists(), "a dead writer's temporary was kept");
}
