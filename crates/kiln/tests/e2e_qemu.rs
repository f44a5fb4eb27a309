//! Every image `kiln build` writes boots on real QEMU (TCG, or KVM with hardware virtualization),
//! on both pc and q35, and on kiln's builtin VMM (KVM): the original program's dialogue on
//! serial (banner, prompt, echo, the reversed line, the prompt again), and a clean ACPI
//! power-off through `kiln stop` or SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::{built, kiln, line80, require_tool, Session};

/// TCG boots are slow when both cores are busy; these bounds are for hangs, not speed.
const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(20);

/// How a test asks the VM to stop; both are `kiln stop`.
#[derive(Clone, Copy)]
enum Stop {
    /// `kiln stop NAME` through the control socket.
    Command,
    /// SIGTERM to `kiln run`.
    Signal,
}

/// Boots `file` on `engine` ("qemu-pc", "qemu-q35" or "builtin") and runs the whole dialogue.
fn boot_and_power_off(engine: &str, file: &str, stop: Stop) {
    let engine_args: &[&str] = match engine {
        "qemu-pc" => &["--engine", "qemu", "--machine", "pc"],
        "qemu-q35" => &["--engine", "qemu", "--machine", "q35"],
        "builtin" => &["--engine", "builtin"],
        other => panic!("unknown engine {other}"),
    };
    if engine == "builtin" {
        if !common::kvm_or_skip(&format!("{engine}/{file}")) {
            return;
        }
    } else {
        require_tool("qemu-system-x86_64");
    }
    let machine = engine;
    // Each VM gets its own copy: QEMU locks a writable image against a second user.
    let tmp = tempfile::tempdir().unwrap();
    for f in [file, "boot-flat.vmdk"] {
        std::fs::copy(built().join(f), tmp.path().join(f)).unwrap();
    }
    let image = tmp.path().join(file);
    let name = format!("{machine}-{}", file.replace('.', "-"));
    let mut args = vec!["run", "--serial-only", "--name", &name];
    args.extend_from_slice(engine_args);
    args.push(image.to_str().unwrap());
    let mut s = Session::start(&args);
    // The original program's dialogue: banner and prompt; typed characters (50 ms apart)
    // echoed; the reply and the prompt again.
    s.expect("ClientAPI\r\n$ ", BOOT);
    for c in "hello\r".chars() {
        s.send(&c.to_string());
        std::thread::sleep(Duration::from_millis(50));
    }
    s.expect("hello\r\nolleh\r\n$ ", REPLY);
    let (line, rev) = line80();
    s.send(&format!("{line}\n"));
    s.expect(&format!("{line}\r\n{rev}\r\n$ "), REPLY);

    // kiln presses the ACPI power button and the guest powers off.
    let pressed = Instant::now();
    match stop {
        Stop::Signal => s.signal(libc::SIGTERM),
        Stop::Command => {
            let ps = kiln(&["ps", "--json"]);
            let listed: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
            assert!(
                listed
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["meta"]["name"] == name.as_str()),
                "kiln ps does not list {name}: {listed}"
            );
            let out = kiln(&["stop", &name, "--timeout", "10"]);
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "kiln stop {name}: {said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(said.trim(), format!("{name}: guest powered off"));
        }
    }
    let status = s.wait(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "{machine}/{file}: VM still running 10 s after the power button\nstderr: {}",
            s.stderr()
        )
    });
    let stderr = s.stderr();
    assert!(
        status.success(),
        "{machine}/{file}: kiln run failed ({status})\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("guest powered off"),
        "{machine}/{file}: expected a guest-initiated power-off, got: {stderr}"
    );
    eprintln!(
        "{machine}/{file}: powered off {:?} after the button",
        pressed.elapsed()
    );
}

macro_rules! boot_tests {
    ($($name:ident: $machine:expr, $file:expr, $stop:expr;)*) => {$(
        #[test]
        fn $name() {
            boot_and_power_off($machine, $file, $stop);
        }
    )*};
}

boot_tests! {
    pc_img: "qemu-pc", "boot.img", Stop::Command;
    pc_qcow2: "qemu-pc", "boot.qcow2", Stop::Command;
    pc_vmdk: "qemu-pc", "boot.vmdk", Stop::Command;
    pc_vhd: "qemu-pc", "boot.vhd", Stop::Command;
    pc_vdi: "qemu-pc", "boot.vdi", Stop::Command;
    pc_iso: "qemu-pc", "boot.iso", Stop::Command;
    q35_img: "qemu-q35", "boot.img", Stop::Signal;
    q35_qcow2: "qemu-q35", "boot.qcow2", Stop::Signal;
    q35_vmdk: "qemu-q35", "boot.vmdk", Stop::Signal;
    q35_vhd: "qemu-q35", "boot.vhd", Stop::Signal;
    q35_vdi: "qemu-q35", "boot.vdi", Stop::Signal;
    q35_iso: "qemu-q35", "boot.iso", Stop::Signal;
    builtin_img: "builtin", "boot.img", Stop::Command;
    builtin_qcow2: "builtin", "boot.qcow2", Stop::Signal;
    builtin_vmdk: "builtin", "boot.vmdk", Stop::Command;
    builtin_vhd: "builtin", "boot.vhd", Stop::Signal;
    builtin_vdi: "builtin", "boot.vdi", Stop::Command;
    builtin_iso: "builtin", "boot.iso", Stop::Signal;
}

/// Without --serial-only the BIOS screen is mirrored onto the terminal (SeaBIOS's serial console,
/// on COM2 of its own), merged with COM1: SeaBIOS's messages show, and kiln's program, which
/// writes every character to both the screen and COM1, shows each character once. Keys reach
/// the program's COM1 (SeaBIOS's console does not take them).
#[test]
fn bios_screen_is_multiplexed_by_default() {
    require_tool("qemu-system-x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let mut s = Session::start(&["run", "--engine", "qemu", image.to_str().unwrap()]);
    s.expect("SeaBIOS", BOOT);
    s.expect("Booting from Hard Disk...", BOOT);
    let quiet = Duration::from_millis(500);
    assert_eq!(
        s.settle_until("$ ", BOOT, quiet),
        "\r\nClientAPI\r\n$ ",
        "stderr: {}",
        s.stderr()
    );
    s.send("hello\r");
    assert_eq!(
        s.settle_until("olleh\r\n$ ", REPLY, quiet),
        "hello\r\nolleh\r\n$ "
    );
    // Ctrl-A X quits, as in QEMU.
    s.send("\x01x");
    let status = s
        .wait(Duration::from_secs(10))
        .expect("Ctrl-A X ends the VM");
    assert!(status.success(), "stderr: {}", s.stderr());
    assert!(
        s.stderr().contains("quit from the console"),
        "stderr: {}",
        s.stderr()
    );
    assert!(
        !s.stderr().contains("sercon-port"),
        "QEMU's warning about the fw_cfg name is expected and not shown: {}",
        s.stderr()
    );
}

/// A guest that ignores the button is killed after --stop-timeout and reported as killed.
fn ignored_power_button_is_killed(engine: &str) {
    // A boot sector that prints a mark and spins with interrupts off, ignoring ACPI.
    let dir = tempfile::tempdir().unwrap();
    let mut prog = vec![0xBA, 0xF8, 0x03, 0xB0, b'!', 0xEE, 0xFA, 0xEB, 0xFE];
    prog.resize(16, 0x90);
    common::build_program(dir.path(), "spin", &prog);
    let name = format!("deaf-{engine}");
    let mut s = Session::start(&[
        "run",
        "--serial-only",
        "--engine",
        engine,
        "--name",
        &name,
        dir.path().join("boot.img").to_str().unwrap(),
    ]);
    s.expect("!", BOOT);
    let asked = Instant::now();
    let out = kiln(&["stop", &name, "--timeout", "1"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "kiln stop reports a kill with exit 2: {said}"
    );
    assert!(
        said.contains("did not power off within 1 s") && said.contains("killed"),
        "{said}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "took {:?}",
        asked.elapsed()
    );
    let status = s
        .wait(Duration::from_secs(10))
        .expect("kiln run ends with the kill");
    assert!(!status.success(), "a killed VM is not a success");
    assert!(s.stderr().contains("killed"), "stderr: {}", s.stderr());
}

#[test]
fn ignored_power_button_is_killed_on_qemu() {
    require_tool("qemu-system-x86_64");
    ignored_power_button_is_killed("qemu");
}

#[test]
fn ignored_power_button_is_killed_on_builtin() {
    if common::kvm_or_skip("ignored_power_button_is_killed_on_builtin") {
        ignored_power_button_is_killed("builtin");
    }
}

/// Two VMs cannot share a name; a bad name is refused before anything starts.
#[test]
fn names_are_unique_and_valid() {
    require_tool("qemu-system-x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let mut first = Session::start(&[
        "run",
        "--serial-only",
        "--name",
        "twin",
        image.to_str().unwrap(),
    ]);
    first.expect("ClientAPI", BOOT);
    let second = kiln(&[
        "run",
        "--serial-only",
        "--name",
        "twin",
        built().join("boot.img").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("already running"),
        "{err}"
    );
    let bad = kiln(&["run", "--name", "Bad_Name", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("Bad_Name"), "{err}");
    let out = kiln(&["stop", "twin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    first.wait(Duration::from_secs(10)).expect("stopped");
    let gone = kiln(&["stop", "twin"]);
    assert!(
        !gone.status.success()
            && String::from_utf8_lossy(&gone.stderr).contains("no running VM named 'twin'")
    );
}

/// QEMU does not outlive a `kiln run` that is killed outright.
#[test]
fn qemu_dies_with_a_killed_kiln() {
    require_tool("qemu-system-x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let mut s = Session::start(&[
        "run",
        "--engine",
        "qemu",
        "--serial-only",
        "--name",
        "killed-run",
        image.to_str().unwrap(),
    ]);
    s.expect("ClientAPI", BOOT);
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", s.pid(), s.pid())).unwrap();
    let qemu: i32 = children
        .split_whitespace()
        .next()
        .expect("QEMU is kiln's child")
        .parse()
        .unwrap();
    s.signal(libc::SIGKILL);
    s.wait(Duration::from_secs(5)).expect("kiln killed");
    let deadline = Instant::now() + Duration::from_secs(5);
    // SAFETY: signal 0 only asks whether the process exists.
    while unsafe { libc::kill(qemu, 0) } == 0 {
        let zombie = std::fs::read_to_string(format!("/proc/{qemu}/stat"))
            .map(|st| st.contains(") Z "))
            .unwrap_or(true);
        if zombie {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU {qemu} still runs after kiln was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its registry entry is stranded only until the next command looks: `kiln ps` removes it.
    let dir = common::kiln_home().join("vms/killed-run");
    assert!(dir.exists(), "no registry entry for the killed run");
    let ps = kiln(&["ps", "--json"]);
    assert!(ps.status.success());
    assert!(!dir.exists(), "kiln ps left the killed run's directory");
}

/// `--console-socket`: the serial console on a Unix socket, on both engines.
fn console_on_a_socket(engine: &str) {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("boot.img");
    std::fs::copy(built().join("boot.img"), &image).unwrap();
    let sock = tmp.path().join("console.sock");
    let name = format!("sock-{engine}");
    let mut s = Session::start(&[
        "run",
        "--engine",
        engine,
        "--name",
        &name,
        "--serial-only",
        "--console-socket",
        sock.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + BOOT;
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{}: {e}\nstderr: {}", sock.display(), s.stderr()),
        }
    };
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // QEMU's socket has no backlog: the banner may have gone by, so the REPL proves the link.
    let mut seen = Vec::new();
    let deadline = Instant::now() + REPLY;
    while !String::from_utf8_lossy(&seen).contains("olleh\r\n") {
        assert!(
            Instant::now() < deadline,
            "no answer on {}: {:?}",
            sock.display(),
            String::from_utf8_lossy(&seen)
        );
        conn.write_all(b"hello\r").unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = conn.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    if engine == "builtin" {
        // The builtin engine replays recent output to a new client: the banner is there.
        assert!(
            String::from_utf8_lossy(&seen).contains("ClientAPI"),
            "{:?}",
            String::from_utf8_lossy(&seen)
        );
    }
    assert!(
        s.serial().is_empty(),
        "console output leaked to stdout: {:?}",
        s.serial()
    );
    let out = kiln(&["stop", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    s.wait(Duration::from_secs(10)).expect("stopped");
}

#[test]
fn console_on_a_socket_qemu() {
    require_tool("qemu-system-x86_64");
    console_on_a_socket("qemu");
}

#[test]
fn console_on_a_socket_builtin() {
    if common::kvm_or_skip("console_on_a_socket_builtin") {
        console_on_a_socket("builtin");
    }
}
