//! The browser proof: sites from `prepare` (cold and --warm) served from a sub-path by a plain
//! static server, and `serve` with /ctl and /net, all driven in real headless Chromium by
//! web/test/browser.mjs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_web::{prepare, serve, PrepareOptions, ServeOptions, ServeSource};

#[test]
fn browser_boot_repl_save_restore_warm_serve_ctl_net() {
    let web = common::web_dir();
    assert!(
        web.join("node_modules/playwright-core").is_dir() && web.join("node_modules/v86").is_dir(),
        "{}/node_modules is missing: run `npm ci` in web/ (scripts/setup does it)",
        web.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let img = common::boot_img(tmp.path());

    let site = tmp.path().join("site");
    let r = prepare(&img, &site, &PrepareOptions::default()).expect("prepare");
    assert_eq!(r.disk, Some(kiln_web::DiskKind::Hda));
    let warm = tmp.path().join("warm");
    let opts = PrepareOptions {
        warm: Some("ClientAPI".into()),
        ..Default::default()
    };
    let r = prepare(&img, &warm, &opts).expect("prepare --warm");
    assert!(r.warm_state_bytes.unwrap_or(0) > 0);

    // kiln serve of the image itself, in this process.
    let (tx, rx) = mpsc::channel();
    let img2 = img.clone();
    std::thread::spawn(move || {
        let opts = ServeOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        let r = serve(ServeSource::Image(img2), opts, |s| {
            let _ = tx.send(Ok(s.clone()));
        });
        if let Err(e) = r {
            let _ = tx.send(Err(e.to_string()));
        }
    });
    let serving = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve did not start")
        .expect("serve");
    let save_path = tmp.path().join("boot.state.zst");

    let mut child = Command::new("node")
        .arg("--experimental-websocket")
        .arg(web.join("test/browser.mjs"))
        .args(["--site".as_ref(), site.as_os_str()])
        .args(["--warm-site".as_ref(), warm.as_os_str()])
        .args(["--serve", &serving.url])
        .args(["--console", &serving.console_url])
        .args(["--save-path".as_ref(), save_path.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node (install nodejs)");
    let out = child.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let (ltx, lrx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            let _ = ltx.send(line);
        }
    });
    let mut lines = Vec::new();
    let status = loop {
        while let Ok(l) = lrx.try_recv() {
            lines.push(l);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "browser test did not finish in 240 s; output so far:\n{}",
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(100));
    while let Ok(l) = lrx.try_recv() {
        lines.push(l);
    }
    assert!(
        status.success(),
        "browser test failed ({status}):\n{}",
        lines.join("\n")
    );
    assert!(
        save_path.is_file(),
        "/ctl save wrote nothing at {}",
        save_path.display()
    );
}
