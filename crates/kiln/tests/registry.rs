//! Nothing is ever stranded in the registry (issue 9): a `kiln vm run` killed while it creates
//! a VM leaves no name behind; a broken `vm.json` is listed as broken and `rm --force` removes
//! it (killing only a supervisor it can prove); a killed supervisor's sockets are cleaned up by
//! the next command.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{built, kiln_in, processes_mentioning, require_tool, start_disk_vm, wait_for};
use common::{KillOnDrop, KILN};

/// `kiln vm ls --json` as JSON values.
fn listed(home: &Path) -> Vec<serde_json::Value> {
    let out = kiln_in(home, &["vm", "ls", "--json"]);
    assert!(
        out.status.success(),
        "ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn entry<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|v| v["meta"]["name"] == name)
}

fn state(list: &[serde_json::Value], name: &str) -> Option<String> {
    entry(list, name).map(|v| v["meta"]["state"].as_str().unwrap_or("?").to_string())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A few random bits without a dependency: the clock's nanoseconds.
fn jitter(below: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % below.max(1)
}

/// `kiln vm run` killed (SIGKILL, SIGINT, SIGTERM) at random points of creating a firmware VM:
/// afterwards nothing is `creating` for long, a VM that did not report its start does not run,
/// whatever is left is removed by plain `kiln vm rm`, no process of it remains, and the name
/// can be used again.
#[test]
fn killed_creator_strands_nothing() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _cleanup = KillOnDrop(home.to_path_buf());
    let disk = home.join("victim.img");
    std::fs::copy(built().join("boot.img"), &disk).unwrap();
    let run = |home: &Path| {
        Command::new(KILN)
            .env("KILN_HOME", home)
            .args(["vm", "run", "--disk", disk.to_str().unwrap()])
            .args(["--engine", "qemu", "--name", "victim"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // How long a whole `kiln vm run` takes here, to spread the kills over it.
    let t0 = Instant::now();
    assert!(run(home).wait().unwrap().success());
    let whole = t0.elapsed().as_millis() as u64;
    assert!(kiln_in(home, &["kill", "victim"]).status.success());
    assert!(kiln_in(home, &["rm", "victim"]).status.success());
    let mut outcomes = Vec::new();
    let rounds = 12u64;
    for round in 0..rounds {
        // Spread over the whole run and a bit beyond (later runs may be slower).
        let span = whole * 3 / 2;
        let delay = round * span / rounds + jitter(span / rounds + 1);
        let sig = [libc::SIGKILL, libc::SIGINT, libc::SIGKILL, libc::SIGTERM][round as usize % 4];
        let child = run(home);
        thread::sleep(Duration::from_millis(delay));
        kiln_sys::process::signal(child.id(), sig);
        let out = child.wait_with_output().unwrap();
        // Created: it reported the VM (it may have been killed just after).
        let created = String::from_utf8_lossy(&out.stdout).starts_with("victim ");
        let what = format!("round {round}: signal {sig} after {delay} ms (created: {created})");
        // A creator that died leaves nothing `creating` (nor running, unless it reported the
        // VM) once its supervisor, if it had one yet, has undone what was made: at once, or
        // within the moment the supervisor takes to notice (when the VM starts).
        wait_for(
            &format!("{what}: no VM `creating` (or running unreported)"),
            Duration::from_secs(10),
            || match state(&listed(home), "victim").as_deref() {
                Some("creating") => false,
                Some("running") => created,
                _ => true,
            },
        );
        let list = listed(home);
        let now = state(&list, "victim");
        if created {
            assert_eq!(now.as_deref(), Some("running"), "{what}: {list:?}");
            assert!(
                kiln_in(home, &["kill", "victim"]).status.success(),
                "{what}"
            );
        } else {
            // Not reported as started: it must not run, and plain `rm` resolves it.
            assert!(
                matches!(now.as_deref(), None | Some("failed" | "broken" | "stopped")),
                "{what}: {}: {list:?}\nengine.log: {}",
                stderr(&out),
                std::fs::read_to_string(home.join("vms/victim/engine.log")).unwrap_or_default()
            );
            if now.as_deref() == Some("failed") {
                let why = entry(&list, "victim").unwrap()["meta"]["exit_reason"].to_string();
                assert!(
                    why.contains("creator") && why.contains("died"),
                    "{what}: {why}"
                );
            }
        }
        outcomes.push(format!(
            "{delay}ms sig{sig} -> {}",
            now.as_deref().unwrap_or("gone")
        ));
        let rm = kiln_in(home, &["vm", "rm", "victim"]);
        assert!(
            rm.status.success() || stderr(&rm).contains("no VM named 'victim'"),
            "{what}: rm: {}",
            stderr(&rm)
        );
        assert!(!home.join("vms/victim").exists(), "{what}: still there");
        wait_for(
            &format!("{what}: no process of the VM"),
            Duration::from_secs(5),
            || processes_mentioning(home.to_str().unwrap()).is_empty(),
        );
        // The name is free again.
        let again = run(home).wait_with_output().unwrap();
        assert!(again.status.success(), "{what}: again: {}", stderr(&again));
        assert!(
            kiln_in(home, &["kill", "victim"]).status.success(),
            "{what}"
        );
        assert!(kiln_in(home, &["rm", "victim"]).status.success(), "{what}");
    }
    eprintln!("whole run {whole} ms; {}", outcomes.join(", "));
}

/// Garbage, a truncated `vm.json` and a directory without one are listed as broken with the
/// reason; stop, kill, logs and console refuse them in one line naming `rm --force`; plain
/// `rm` removes one that nothing holds, refuses one whose supervisor still runs, and
/// `rm --force` kills that (proven) supervisor and its QEMU first. A lock held by a process
/// that cannot be proven is never signalled.
#[test]
fn broken_records_are_listed_and_removable() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _cleanup = KillOnDrop(home.to_path_buf());
    // A real record to truncate, and a VM that runs while its record is broken.
    start_disk_vm(home, "held", "qemu");
    let vms = home.join("vms");
    let good = std::fs::read_to_string(vms.join("held/vm.json")).unwrap();
    for (name, content) in [
        ("garbage", Some("{ this is not json".to_string())),
        ("truncated", Some(good[..good.len() / 2].to_string())),
        ("junk", None),
    ] {
        std::fs::create_dir_all(vms.join(name)).unwrap();
        match content {
            Some(text) => std::fs::write(vms.join(name).join("vm.json"), text).unwrap(),
            None => std::fs::write(vms.join(name).join("notes.txt"), "junk").unwrap(),
        }
    }
    std::fs::write(vms.join("held/vm.json"), "garbage").unwrap();
    let out = kiln_in(home, &["vm", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let list = listed(home);
    let ps: Vec<serde_json::Value> =
        serde_json::from_slice(&kiln_in(home, &["ps", "--json"]).stdout).unwrap();
    assert_eq!(ps, list, "`kiln ps --json` is `kiln vm ls --json`");
    for name in ["garbage", "truncated", "junk", "held"] {
        assert_eq!(
            state(&list, name).as_deref(),
            Some("broken"),
            "{name}: {list:?}"
        );
        let why = entry(&list, name).unwrap()["meta"]["exit_reason"]
            .as_str()
            .unwrap()
            .to_string();
        let json = vms.join(name).join("vm.json");
        assert!(why.contains(json.to_str().unwrap()), "{name}: {why}");
        assert!(!why.contains('\n'), "{name}: {why}");
        let row = table.lines().find(|l| l.starts_with(name)).unwrap_or("");
        assert!(
            row.contains("broken") && row.contains(&why),
            "{name}: {table}"
        );
    }
    assert!(entry(&list, "junk").unwrap()["meta"]["exit_reason"]
        .as_str()
        .unwrap()
        .contains("missing"));
    // Commands that need the record say it is broken and how to remove it, in one line.
    for args in [
        ["stop", "garbage"],
        ["kill", "garbage"],
        ["logs", "garbage"],
        ["console", "garbage"],
        ["kill", "held"],
    ] {
        let out = kiln_in(home, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("broken"), "{args:?}: {err}");
        assert!(
            err.contains(&format!("kiln vm rm --force {}", args[1])),
            "{args:?}: {err}"
        );
    }
    // Nothing holds these: plain rm removes them.
    for name in ["garbage", "truncated", "junk"] {
        let out = kiln_in(home, &["vm", "rm", name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(!vms.join(name).exists(), "{name}");
    }
    // Its supervisor still runs: plain rm refuses, --force kills it (and QEMU with it).
    let out = kiln_in(home, &["vm", "rm", "held"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(vms.join("held").exists());
    let held_dir = vms.join("held");
    assert!(!processes_mentioning(held_dir.to_str().unwrap()).is_empty());
    let out = kiln_in(home, &["vm", "rm", "--force", "held"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!held_dir.exists());
    wait_for("no process of 'held'", Duration::from_secs(5), || {
        processes_mentioning(home.to_str().unwrap()).is_empty()
    });
    // A lock held by a process that does not prove itself (here: this test, with a start
    // time that is not its own) is never signalled: rm --force refuses and says why.
    let dir = vms.join("impostor");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = kiln_sys::lock::FileLock::exclusive(&dir.join("supervisor.lock")).unwrap();
    let me = std::process::id();
    let start = kiln_sys::process::start_time(me).unwrap();
    std::fs::write(dir.join("supervisor.lock"), format!("{me} {}\n", start + 7)).unwrap();
    let out = kiln_in(home, &["vm", "rm", "impostor"]);
    assert!(!out.status.success() && stderr(&out).contains("--force"));
    let out = kiln_in(home, &["vm", "rm", "--force", "impostor"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("supervisor.lock"), "{}", stderr(&out));
    assert!(dir.exists());
    drop(lock);
    assert!(kiln_in(home, &["vm", "rm", "impostor"]).status.success());
    assert!(listed(home).is_empty());
}

/// A supervisor killed with SIGKILL leaves its sockets behind (and QEMU's QMP socket: QEMU
/// dies with it): the next `kiln ps` removes them, shows the VM stopped and why, `console`
/// says it is not running, and `rm` removes it.
#[test]
fn killed_supervisor_sockets_are_cleaned_up() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _cleanup = KillOnDrop(home.to_path_buf());
    let rec = start_disk_vm(home, "crash", "qemu");
    let dir = rec.config.dir.clone();
    let sockets = ["control.sock", "console.sock", "serial.sock", "qmp.sock"];
    for s in ["control.sock", "console.sock", "qmp.sock"] {
        assert!(dir.join(s).exists(), "{s} while it runs");
    }
    let supervisor = rec.meta.supervisor_pid.unwrap();
    let qemu = rec.meta.pid.unwrap();
    assert!(kiln_sys::process::signal(supervisor, libc::SIGKILL));
    wait_for(
        "QEMU to die with its supervisor",
        Duration::from_secs(5),
        || !kiln_sys::process::alive(qemu, rec.meta.pid_start),
    );
    // (Not through the registry: reading it cleans up.)
    wait_for(
        "the supervisor lock to be free",
        Duration::from_secs(5),
        || !kiln_sys::lock::is_locked(&dir.join("supervisor.lock")),
    );
    // Left behind, until a command finds them stale.
    assert!(dir.join("control.sock").exists() && dir.join("qmp.sock").exists());
    let out = kiln_in(home, &["ps"]);
    assert!(out.status.success());
    for s in sockets {
        assert!(!dir.join(s).exists(), "{s} is still there after `kiln ps`");
    }
    let list = listed(home);
    assert_eq!(
        state(&list, "crash").as_deref(),
        Some("stopped"),
        "{list:?}"
    );
    assert_eq!(
        entry(&list, "crash").unwrap()["meta"]["end"]["kind"],
        "crashed"
    );
    let out = kiln_in(home, &["console", "crash"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not running"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("refused"), "{}", stderr(&out));
    assert!(kiln_in(home, &["vm", "rm", "crash"]).status.success());
    assert!(!dir.exists());
}

/// A VM recorded as `creating` whose creator is dead (and that no supervisor runs) shows as
/// `failed`, naming the creator's pid, in `ls`, `ps` and `--json`; plain `rm` removes it and
/// the name can be used again.
#[test]
fn a_dead_creators_vm_is_failed_and_removable() {
    require_tool("qemu-system-x86_64");
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _cleanup = KillOnDrop(home.to_path_buf());
    let rec = start_disk_vm(home, "orphan", "qemu");
    assert!(kiln_in(home, &["kill", "orphan"]).status.success());
    // As a creator killed between recording the VM and starting its supervisor leaves it: the
    // record says `creating`, the creation lock names a process that is gone.
    let dir = rec.config.dir.clone();
    let json = dir.join("vm.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    v["meta"]["state"] = "creating".into();
    v["meta"]["end"] = serde_json::Value::Null;
    v["meta"]["exit_reason"] = serde_json::Value::Null;
    std::fs::write(&json, serde_json::to_string(&v).unwrap()).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(dir.join("create.lock"), format!("{dead} 12345\n")).unwrap();
    let list = listed(home);
    assert_eq!(
        state(&list, "orphan").as_deref(),
        Some("failed"),
        "{list:?}"
    );
    let why = entry(&list, "orphan").unwrap()["meta"]["exit_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains(&format!("its creator (pid {dead}) died while creating it")),
        "{why}"
    );
    let table = String::from_utf8_lossy(&kiln_in(home, &["ps"]).stdout).into_owned();
    let row = table.lines().find(|l| l.starts_with("orphan")).unwrap();
    assert!(row.contains("failed") && row.contains(&why), "{table}");
    let out = kiln_in(home, &["vm", "rm", "orphan"]);
    assert!(out.status.success(), "{}", stderr(&out));
    start_disk_vm(home, "orphan", "qemu");
    assert!(kiln_in(home, &["kill", "orphan"]).status.success());
}
