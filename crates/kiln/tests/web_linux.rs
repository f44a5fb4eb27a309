//! Linux on v86, end to end, on the cached i386 Debian image (`kiln image debian --arch i386`,
//! built once per machine like the amd64 one): `kiln boot` cold to a root prompt, `--save`,
//! a warm resume that answers at once, `--cold`; the prepared site resuming in headless
//! Chromium under a sub-path of a plain static server; `kiln serve` with a DHCP lease right
//! after the restore, a fetch through `/net` and a `-p` forward; and bad input (a truncated
//! state, one from another image, a missing 9p file, an amd64 image). One test: the v86 boots
//! would only slow each other down on two cores.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kiln, Session};

const PROMPT: &str = "root@kiln:~# ";

/// A copy of the image that tests may write into: small files copied, the 9p content files
/// hard-linked (the cache is never modified).
fn image_copy(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.join("fs")).unwrap();
    for f in ["image.json", "fs.json", "vmlinuz", "initrd.img"] {
        std::fs::copy(src.join(f), dest.join(f)).unwrap();
    }
    for e in std::fs::read_dir(src.join("fs")).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), dest.join("fs").join(e.file_name())).unwrap();
    }
}

/// The JSON report `kiln boot --json` prints last on stderr.
fn report(s: &Session) -> serde_json::Value {
    let err = s.stderr();
    let line = err
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report on stderr: {err}"));
    serde_json::from_str(line.trim()).unwrap()
}

fn boot(image: &Path, args: &[&str]) -> Session {
    let mut all = vec!["boot", image.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    Session::start(&all)
}

fn finish(mut s: Session) -> serde_json::Value {
    let status = s.wait(Duration::from_secs(120)).expect("kiln boot ended");
    assert!(status.success(), "kiln boot failed: {}", s.stderr());
    report(&s)
}

/// `kiln boot IMAGE --cold` starts from the kernel and reaches the serial autologin.
fn boots_cold_to_the_login(image: &Path) {
    let s = boot(
        image,
        &["--cold", "--exit-on", "login: root (automatic login)"],
    );
    let r = finish(s);
    assert_eq!(r["mode"], "cold", "{r}");
}

/// `kiln boot ARGS` must fail at once with one line naming `needle`.
fn refused(image: &Path, needle: &str) {
    let out = kiln(&["boot", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kiln boot of {} succeeded",
        image.display()
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn linux_on_v86_boot_save_resume_browser_serve_and_bad_input() {
    let Some(cached) = common::debian::debian_i386_image() else {
        return;
    };
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let tmp = tempfile::tempdir_in(cached.parent().unwrap()).unwrap();
    let img = tmp.path().join("img");
    image_copy(&cached, &img);

    // Cold: the root prompt on serial, i686, then save and end.
    let t0 = Instant::now();
    let mut s = boot(&img, &["--cold", "--save", "--exit-on", "SAVE-NOW"]);
    s.expect(PROMPT, Duration::from_secs(240));
    let cold = t0.elapsed();
    s.send("uname -m\n");
    s.expect("i686", Duration::from_secs(30));
    s.expect(PROMPT, Duration::from_secs(30));
    s.send("echo SAVE''-NOW\n");
    let r = finish(s);
    assert_eq!(r["mode"], "cold", "{r}");
    assert_eq!(r["end"], "exit-on", "{r}");
    assert!(r["saved_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{r}");
    assert!(img.join("initial.state.zst").is_file());
    eprintln!(
        "cold boot to the prompt: {cold:?}; state {} bytes",
        r["saved_bytes"]
    );

    // Warm: resumes from the state within 3 s and answers a command.
    let t0 = Instant::now();
    let mut s = boot(&img, &["--exit-on", "ANSWER-42"]);
    s.send("echo ANSWER-$((40+2))\n");
    s.expect("ANSWER-42", Duration::from_secs(30));
    let answered = t0.elapsed();
    let r = finish(s);
    assert_eq!(r["mode"], "warm", "{r}");
    let loaded = r["loaded_ms"].as_u64().unwrap();
    assert!(loaded < 3000, "the restore took {loaded} ms");
    eprintln!("warm: restored in {loaded} ms, answered after {answered:?}");

    // Root has an empty password, which PAM takes on the serial console only; Ctrl-A X quits.
    let mut s = boot(&img, &[]);
    s.send("passwd -S root | cut -d' ' -f2; grep -c nullok /etc/pam.d/common-auth; grep -c 'tty in ttyS0' /etc/pam.d/login; echo PAM-''CHECKED\n");
    let out = s.settle_until(
        "PAM-CHECKED",
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    // Each line as the terminal shows it: what follows its last carriage return.
    let lines: Vec<&str> = out
        .lines()
        .map(|l| {
            l.trim_end_matches('\r')
                .rsplit('\r')
                .next()
                .unwrap_or("")
                .trim()
        })
        .filter(|l| !l.is_empty())
        .collect();
    let at = lines.iter().position(|l| *l == "PAM-CHECKED").unwrap();
    assert_eq!(&lines[at - 3..at], ["NP", "0", "1"], "{out:?}");
    s.send("\x01x");
    let r = finish(s);
    assert_eq!(r["end"], "quit", "{r}");

    // --net: a DHCP lease from passt right after the restore; -p reaches a guest listener.
    let fwd = free_port();
    let spec = format!("{fwd}:7777");
    // -n: env86's spelling of --net.
    let mut s = boot(&img, &["-n", "-p", &spec, "--exit-on", "NET-DONE"]);
    s.send("for i in $(seq 60); do ip -4 addr show eth0 | grep -q 'inet ' && break; sleep 0.5; done; ip -4 -br addr show eth0\n");
    s.expect("10.0.2.15/24", Duration::from_secs(60));
    s.send("echo from-guest | busybox nc -l -p 7777; echo NET-''DONE\n");
    std::thread::sleep(Duration::from_secs(3));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", fwd)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // bookworm's passt completes the guest's handshake once the client sends.
    std::io::Write::write_all(&mut c, b"hi\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("from-guest") {
        match std::io::Read::read(&mut c, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("from-guest"), "-p {spec} answered {got:?}");
    drop(c);
    let r = finish(s);
    assert_eq!(r["end"], "exit-on", "{r}");

    // --cold ignores the state and boots from the kernel.
    boots_cold_to_the_login(&img);
    assert!(
        img.join("initial.state.zst").is_file(),
        "--cold without --save keeps the state"
    );

    // The Go toolchain's (env86) image directory: v86 options in image.json, the kernel and
    // initrd found in the 9p filesystem, an uncompressed initial.state.
    let env86 = tmp.path().join("env86");
    std::fs::create_dir_all(env86.join("fs")).unwrap();
    std::fs::copy(img.join("fs.json"), env86.join("fs.json")).unwrap();
    for e in std::fs::read_dir(img.join("fs")).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), env86.join("fs").join(e.file_name())).unwrap();
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap();
    let v86_opts = serde_json::json!({
        "cmdline": manifest["cmdline"],
        "bzimage_initrd_from_filesystem": true,
        "memory_size": 256 << 20,
    });
    std::fs::write(env86.join("image.json"), v86_opts.to_string()).unwrap();
    let raw = zstd_or_plain(&img.join("initial.state.zst"));
    std::fs::write(env86.join("initial.state"), raw).unwrap();
    // With env86's --ttyS0 (kiln boot's console is always serial).
    let mut s = boot(&env86, &["--ttyS0", "--exit-on", "ENV-86"]);
    s.send("echo ENV-$((80+6))\n");
    s.expect("ENV-86", Duration::from_secs(30));
    let r = finish(s);
    assert_eq!(r["mode"], "warm", "{r}");
    boots_cold_to_the_login(&env86);

    // The prepared site resumes in Chromium under a sub-path; kiln serve gives it a network.
    // The site ships a state made by `--warm` (booted cold under Node until the prompt);
    // kiln serve below serves the image's own saved state.
    let fresh = tmp.path().join("fresh");
    image_copy(&img, &fresh);
    let site = tmp.path().join("site");
    let out = kiln(&[
        "prepare",
        fresh.to_str().unwrap(),
        site.to_str().unwrap(),
        "--warm",
        PROMPT,
        "--warm-timeout",
        "300",
    ]);
    assert!(
        out.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.join("state/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["marker"], PROMPT);
    for part in manifest["parts"].as_array().unwrap() {
        assert!(part["size"].as_u64().unwrap() <= 10 << 20, "{part}");
    }
    let port = free_port();
    let fwd = free_port();
    let mut serve = common::kiln_command()
        .args([
            "serve",
            img.to_str().unwrap(),
            "--addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-p", &format!("{fwd}:7777")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains(&format!("http://127.0.0.1:{port}/")),
        "kiln serve said {line:?}"
    );
    let browser = Command::new("node")
        .arg(web.join("test/linux.mjs"))
        .args(["--site".as_ref(), site.as_os_str()])
        .args(["--serve", &format!("http://127.0.0.1:{port}/")])
        .args(["--forward", &format!("{fwd}:7777")])
        .output()
        .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    let stdout = String::from_utf8_lossy(&browser.stdout);
    assert!(
        browser.status.success(),
        "browser test failed: {}{stdout}",
        String::from_utf8_lossy(&browser.stderr)
    );
    eprintln!("browser: {stdout}");

    // A guest that powers off ends the session; with --save its state goes (the next boot
    // is cold: there is no machine to resume).
    let off = tmp.path().join("off");
    image_copy(&img, &off);
    std::fs::copy(img.join("initial.state.zst"), off.join("initial.state.zst")).unwrap();
    let mut s = boot(&off, &["--save"]);
    // -f: the kernel powers off at once (busybox init's shutdown sequence is the guest's own
    // business; once, after a restore, it did not start within 60 s).
    s.send("poweroff -f\n");
    // v86 has no ACPI here: the kernel halts the machine instead of powering it off.
    s.expect("reboot: System halted", Duration::from_secs(60));
    let r = finish(s);
    assert_eq!(r["end"], "powered-off", "{r}");
    assert_eq!(r["state_removed"], true, "{r}");
    assert!(!off.join("initial.state.zst").exists());

    // Bad input: each a one-line error naming the file; nothing boots.
    let state = std::fs::read(img.join("initial.state.zst")).unwrap();
    let trunc = tmp.path().join("trunc");
    image_copy(&img, &trunc);
    std::fs::write(trunc.join("initial.state.zst"), &state[..state.len() / 2]).unwrap();
    refused(&trunc, "initial.state.zst: is not a complete zstd stream");

    // Another i386 image (a busybox tree) with this image's state.
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    let bb = cached.join("fs").join(busybox_blob(&cached));
    let bytes = zstd_or_plain(&bb);
    std::fs::write(tree.join("bin/busybox"), &bytes).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    let other = tmp.path().join("other");
    create_image(&other, &tree, &img.join("vmlinuz"));
    std::fs::write(other.join("initial.state.zst"), &state).unwrap();
    refused(&other, "was saved from another image");

    // A content file the index names is missing.
    let holed = tmp.path().join("holed");
    image_copy(&img, &holed);
    std::fs::remove_file(holed.join("initial.state.zst")).ok();
    let victim = std::fs::read_dir(holed.join("fs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    std::fs::remove_file(victim.path()).unwrap();
    refused(&holed, "is missing");

    // An amd64 image is refused before anything starts.
    let amd = tmp.path().join("amd64tree");
    std::fs::create_dir_all(amd.join("bin")).unwrap();
    std::fs::copy("/bin/dash", amd.join("bin/sh")).unwrap();
    let amd_img = tmp.path().join("amd64");
    create_image(&amd_img, &amd, &img.join("vmlinuz"));
    std::fs::write(amd_img.join("fs.json"), b"{}").unwrap();
    refused(&amd_img, "is an amd64 image; v86 runs only i386");
}

/// `kiln image create OUT --from-dir TREE --kernel KERNEL`, which must succeed.
fn create_image(out: &Path, tree: &Path, kernel: &Path) {
    let (o, t, k) = (
        out.to_str().unwrap(),
        tree.to_str().unwrap(),
        kernel.to_str().unwrap(),
    );
    let r = kiln(&[
        "image",
        "create",
        o,
        "--from-dir",
        t,
        "--kernel",
        k,
        "--size",
        "256M",
    ]);
    assert!(
        r.status.success(),
        "image create: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// The content file of /usr/bin/busybox in the image's index.
fn busybox_blob(image: &Path) -> String {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("fs.json")).unwrap()).unwrap();
    let mut dir = idx["fsroot"].as_array().unwrap();
    for part in ["usr", "bin"] {
        dir = dir
            .iter()
            .find(|e| e[0] == part)
            .and_then(|e| e[6].as_array())
            .unwrap();
    }
    dir.iter()
        .find(|e| e[0] == "busybox")
        .and_then(|e| e[6].as_str())
        .unwrap()
        .to_string()
}

fn zstd_or_plain(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    if p.to_string_lossy().ends_with(".zst") {
        zstd::stream::decode_all(&b[..]).unwrap()
    } else {
        b
    }
}
