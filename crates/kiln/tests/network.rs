//! Networking and SSH for microVMs, proven in a world of network namespaces the test builds
//! (see `common::netns`): TAP + NAT (`kiln net up|down|status`), user mode through passt,
//! published ports, `kiln vm ssh` against the pinned host key, and bad input. As root only;
//! without root or namespaces the tests skip, and fail instead under KILN_REQUIRE_NET=1.

mod common;

use std::path::Path;

use common::netns::{self, World};

/// A TCP listener on the guest's port 80 (perl, from the image's perl-base), in the background:
/// it reads a request up to its blank line (closing with unread input would reset the
/// connection and lose the answer), then answers. Perl takes seconds to start under TCG: the
/// script returns once the port listens.
const LISTENER: &str = "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>80,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){while(<$c>){last if /^\\r?$/} print $c \"hello from the guest\\n\"; close $c}' </dev/null >/dev/null 2>&1 & for i in $(seq 300); do ss -ltn | grep -q ':80 ' && echo started && break; sleep 0.1; done";

/// A UDP echo on the guest's port 5300 ("pong:" and what it got), in the background.
const UDP_ECHO: &str = "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>5300,Proto=>\"udp\") or die; while($a=$s->recv($m,512)){$s->send(\"pong:$m\",0,$a)}' </dev/null >/dev/null 2>&1 & for i in $(seq 300); do ss -lun | grep -q ':5300 ' && echo started && break; sleep 0.1; done";

/// The world of namespaces for test `tag`, the Debian image, a kiln home of the test's own and
/// the guard that ends its VMs; `None` where the test skips.
fn setup(
    tag: &str,
) -> Option<(
    World,
    std::path::PathBuf,
    tempfile::TempDir,
    common::KillOnDrop,
)> {
    let w = World::new(tag)?;
    let image = common::debian::debian_image()?;
    let home = tempfile::tempdir().unwrap();
    let guard = common::KillOnDrop(home.path().to_path_buf());
    Some((w, image, home, guard))
}

fn run_vm(w: &World, home: &Path, image: &Path, name: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "run",
        "--image",
        image.to_str().unwrap(),
        "--name",
        name,
        "--vcpu",
        "1",
        "--ram",
        "512",
    ];
    args.extend_from_slice(extra);
    w.kiln_ok(home, &args);
}

fn status(w: &World, home: &Path) -> serde_json::Value {
    let out = w.kiln_ok(home, &["net", "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counter(s: &serde_json::Value, vm: &str, key: &str) -> u64 {
    s["pool_leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vm)
        .and_then(|v| v["counters"][key].as_u64())
        .unwrap_or(0)
}

#[test]
fn tap_nat_isolation_and_cleanup() {
    let Some((w, image, home, _cleanup)) = setup("tap") else {
        return;
    };
    run_vm(
        &w,
        home.path(),
        &image,
        "tap-a",
        &[
            "--net",
            "tap",
            "--pool",
            netns::POOL,
            "-p",
            "8080:80",
            "-p",
            "5353:5300/udp",
        ],
    );
    run_vm(
        &w,
        home.path(),
        &image,
        "tap-b",
        &["--net", "tap", "--pool", netns::POOL],
    );
    let rec = kiln_host::Host::new(home.path().to_path_buf())
        .get("tap-a")
        .unwrap();
    let net = &rec.meta.net;
    assert_eq!(net.mode, "tap");
    let (ip_a, tap_a) = (net.guest_ip.unwrap(), net.tap.clone().unwrap());
    assert_eq!(
        (net.prefix, net.gateway.map(|g| g.to_string())),
        (Some(30), Some("198.51.100.65".into()))
    );
    assert_eq!(ip_a.to_string(), "198.51.100.66");
    let ip_b = kiln_host::Host::new(home.path().to_path_buf())
        .get("tap-b")
        .unwrap()
        .meta
        .net
        .guest_ip
        .unwrap();
    assert_eq!(
        ip_b.to_string(),
        "198.51.100.70",
        "each VM has a /30 of its own"
    );
    let out = w.kiln(home.path(), &["vm", "ip", "tap-a"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "198.51.100.66");

    // SSH with the pinned host key.
    for name in ["tap-a", "tap-b"] {
        let (ok, said) = w.guest(home.path(), name, "hostname");
        assert!(ok && said == name, "{name}: {said}");
    }
    // A published port, relayed by the supervisor to a listener in the guest.
    let (ok, said) = w.guest(home.path(), "tap-a", LISTENER);
    assert!(ok && said.contains("started"), "{said}");
    let got = w.fetch("127.0.0.1:8080", "GET / HTTP/1.0\\r\\n\\r\\n");
    assert!(
        got.contains("hello from the guest"),
        "-p 8080:80 on TAP: {got:?}"
    );
    let (ok, said) = w.guest(home.path(), "tap-a", UDP_ECHO);
    assert!(ok && said.contains("started"), "{said}");
    assert_eq!(
        w.fetch_udp("127.0.0.1:5353", "ping"),
        "pong:ping",
        "-p 5353:5300/udp on TAP"
    );

    // NAT down: the internet is out of reach.
    let (ok, said) = w.guest(home.path(), "tap-a", &netns::get_script());
    assert!(
        !ok && !said.contains("hello"),
        "reached out before `kiln net up`: {said}"
    );

    let out = w.kiln_ok(home.path(), &["net", "up"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("NAT up through {}", w.host_if)
    );
    let out = w.kiln(home.path(), &["net", "up"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("NAT already up through {}", w.host_if)
    );
    let before = status(&w, home.path());
    assert_eq!(before["up"], true);
    assert_eq!(before["forwarding"], true);
    let (ok, said) = w.guest(home.path(), "tap-a", &netns::get_script());
    assert!(
        ok && said.contains("hello from the internet"),
        "GET through NAT: {said}"
    );
    assert_eq!(
        w.seen.lock().unwrap().last().map(|a| a.to_string()),
        Some(netns::HOST_ADDR.to_string()),
        "the server sees the host's masqueraded address"
    );
    let after = status(&w, home.path());
    assert!(
        counter(&after, "tap-a", "out_packets") > counter(&before, "tap-a", "out_packets"),
        "{after}"
    );
    assert!(
        counter(&after, "tap-a", "in_bytes") > counter(&before, "tap-a", "in_bytes"),
        "{after}"
    );

    // Isolation: tap-a cannot reach tap-b (its sshd), even with NAT up.
    let (ok, said) = w.guest(
        home.path(),
        "tap-a",
        &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{ip_b}/22 && head -c 4 <&3'"),
    );
    assert!(!ok && !said.contains("SSH-"), "tap-a reached tap-b: {said}");
    assert!(counter(&status(&w, home.path()), "tap-a", "blocked_packets") > 0);

    // Down: no internet, SSH still works; down again does nothing.
    let out = w.kiln(home.path(), &["net", "down"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "NAT down");
    let (ok, said) = w.guest(home.path(), "tap-a", &netns::get_script());
    assert!(
        !ok && !said.contains("hello"),
        "reached out after `kiln net down`: {said}"
    );
    let (ok, said) = w.guest(home.path(), "tap-a", "hostname");
    assert!(ok && said == "tap-a", "{said}");
    let out = w.kiln_ok(home.path(), &["net", "down"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "NAT was not up; nothing to do"
    );

    // A clone of a snapshot of tap-a has its own network: its own /30 and TAP, applied in the
    // guest when it notices the resume, reached by SSH with its own pinned key.
    w.kiln_ok(home.path(), &["vm", "snapshot", "tap-a", "--tag", "n"]);
    w.kiln_ok(
        home.path(),
        &[
            "vm",
            "run",
            "--from",
            "tap-a:n",
            "--name",
            "tap-c",
            "--pool",
            netns::POOL,
        ],
    );
    let clone = kiln_host::Host::new(home.path().to_path_buf())
        .get("tap-c")
        .unwrap();
    let ip_c = clone.meta.net.guest_ip.unwrap();
    assert!(ip_c != ip_a && ip_c != ip_b, "{ip_c}");
    let (ok, said) = w.guest(home.path(), "tap-c", "hostname; ip -4 -o addr show");
    assert!(ok, "{said}");
    assert!(
        said.starts_with("tap-c\n") && said.contains(&format!(" {ip_c}/30 ")),
        "{said}"
    );
    assert!(!said.contains(&format!(" {ip_a}/")), "{said}");
    let (ok, said) = w.guest(home.path(), "tap-a", "hostname");
    assert!(ok && said == "tap-a", "{said}");
    for args in [["vm", "kill", "tap-c"], ["vm", "rm", "tap-c"]] {
        w.kiln_ok(home.path(), &args);
    }

    // A reboot from inside the guest ends the VM and releases its TAP and chains.
    let tap_b = kiln_host::Host::new(home.path().to_path_buf())
        .get("tap-b")
        .unwrap()
        .meta
        .net
        .tap
        .unwrap();
    assert!(w.ruleset().contains(&tap_b));
    let _ = w.guest(home.path(), "tap-b", "systemctl reboot");
    let host = kiln_host::Host::new(home.path().to_path_buf());
    common::wait_for(
        "tap-b to end after its reboot",
        std::time::Duration::from_secs(180),
        || !host.get("tap-b").unwrap().is_alive(),
    );
    assert!(!w.host_links().contains(&tap_b), "tap-b's TAP is gone");
    assert!(!w.ruleset().contains(&tap_b), "tap-b's chains are gone");

    // Stop and remove: no TAP and no kiln rule remain.
    assert!(w.host_links().contains(&tap_a));
    w.kiln_ok(home.path(), &["vm", "stop", "tap-a", "--timeout", "60"]);
    for name in ["tap-a", "tap-b"] {
        w.kiln_ok(home.path(), &["vm", "rm", name]);
    }
    let links = w.host_links();
    assert!(!links.contains("kn-"), "a TAP remains: {links}");
    let rules = w.ruleset();
    assert!(
        !rules.contains("kiln") && !rules.contains("kn-"),
        "kiln rules remain: {rules}"
    );
    assert!(
        kiln_net::pool::leases(&home.path().join("net"))
            .unwrap()
            .is_empty(),
        "leases released"
    );
}

#[test]
fn user_mode_passt_ssh_and_published_port() {
    let Some((w, image, home, _cleanup)) = setup("usr") else {
        return;
    };
    // A key of the user's own instead of kiln's.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("mine");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    let public = key.with_extension("pub");
    run_vm(
        &w,
        home.path(),
        &image,
        "usr-a",
        &[
            "--net",
            "user",
            "-p",
            "8080:80",
            "-p",
            "5353:5300/udp",
            "--ssh-key",
            public.to_str().unwrap(),
        ],
    );
    let rec = kiln_host::Host::new(home.path().to_path_buf())
        .get("usr-a")
        .unwrap();
    assert_eq!(rec.meta.net.mode, "user");
    assert_eq!(rec.meta.ssh_identity.as_deref(), Some(key.as_path()));
    assert!(
        !home.path().join("ssh/id_ed25519").exists(),
        "kiln made no key of its own"
    );
    assert_eq!(rec.meta.net.stack, Some(kiln_host::UserStack::Passt));
    let passt = rec.meta.net.passt_pid.expect("passt's pid is recorded");
    // passt drops root (to nobody) early in its start-up, which may still be under way when
    // `vm run` has returned on a loaded machine.
    common::wait_for(
        "passt to run unprivileged",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{passt}/status"))
                .unwrap()
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u != "0"))
                .unwrap()
        },
    );

    let (ok, said) = w.guest(home.path(), "usr-a", "hostname");
    assert!(ok && said == "usr-a", "{said}");
    let (ok, said) = w.guest(home.path(), "usr-a", &netns::get_script());
    assert!(
        ok && said.contains("hello from the internet"),
        "GET through passt: {said}"
    );
    // A listener in the guest (perl from the image's perl-base) behind -p 8080:80.
    let (ok, said) = w.guest(home.path(), "usr-a", LISTENER);
    assert!(ok && said.contains("started"), "{said}");
    // The client speaks first: bookworm's passt completes an inbound handshake only then.
    let got = w.fetch("127.0.0.1:8080", "GET / HTTP/1.0\\r\\n\\r\\n");
    assert!(got.contains("hello from the guest"), "-p 8080:80: {got:?}");
    let (ok, said) = w.guest(home.path(), "usr-a", UDP_ECHO);
    assert!(ok && said.contains("started"), "{said}");
    assert_eq!(
        w.fetch_udp("127.0.0.1:5353", "ping"),
        "pong:ping",
        "-p 5353:5300/udp"
    );

    w.kiln_ok(home.path(), &["vm", "stop", "usr-a", "--timeout", "60"]);
    assert!(
        !kiln_sys::process::alive(passt, None),
        "passt is gone after the VM stops"
    );
}

#[test]
fn bad_network_input() {
    let Some(w) = World::new("bad") else { return };
    let home = tempfile::tempdir().unwrap();
    let _cleanup = common::KillOnDrop(home.path().to_path_buf());
    // Any rootfs and kernel will do: every error comes before a VM starts.
    let dir = tempfile::tempdir().unwrap();
    let (rootfs, kernel) = (dir.path().join("root.ext4"), dir.path().join("vmlinuz"));
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&kernel, b"not really").unwrap();
    let base = [
        "vm",
        "run",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--name",
        "bad",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = w.kiln(home.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            !home.path().join("vms/bad").exists(),
            "{extra:?} left a VM directory"
        );
        err
    };
    assert_eq!(
        run(&["-p", "80"]),
        "kiln: error: invalid port '80': expected [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]"
    );
    assert_eq!(
        run(&["-p", "8080:80/sctp"]),
        "kiln: error: invalid port '8080:80/sctp': the protocol suffix is /tcp or /udp"
    );
    // A taken host port, in both modes.
    let taken = w.listen_in_host("127.0.0.1:0");
    let port = taken.local_addr().unwrap().port();
    let spec = format!("{port}:80");
    for mode in ["user", "tap"] {
        let err = run(&["--net", mode, "-p", &spec]);
        assert_eq!(
            err,
            format!("kiln: error: port 127.0.0.1:{port}:80: the host port is in use"),
            "{mode}"
        );
    }
    drop(taken);
    // A pool over a host route (the veth's 198.51.100.0/30).
    let err = run(&["--net", "tap", "--pool", "198.51.100.0/24"]);
    assert_eq!(err, format!("kiln: error: pool 198.51.100.0/24 overlaps the host route 198.51.100.0/30 on {}; choose another pool", w.host_if));
    assert!(run(&["--net", "tap", "--pool", "198.51.100.1/24"])
        .starts_with("kiln: error: invalid --pool '198.51.100.1/24': host bits are set"));
    // --net tap without root: as nobody.
    let nobody_home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        nobody_home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = w
        .command("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            common::KILN,
        ])
        .args(base)
        .args(["--net", "tap"])
        .env("KILN_HOME", nobody_home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.trim(),
        "kiln: error: --net tap needs root (CAP_NET_ADMIN); run it with sudo, or use --net user"
    );
    assert!(!nobody_home.path().join("vms/bad").exists());
    // NAT: down with nothing up is a no-op; up twice is one up.
    let out = w.kiln_ok(home.path(), &["net", "down"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "NAT was not up; nothing to do"
    );
    let out = w.kiln(home.path(), &["net", "up", "--uplink", "nope0"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "kiln: error: invalid uplink 'nope0': no such network interface"
    );
    assert!(!w.ruleset().contains("kiln"), "a failed up leaves no table");
    for _ in 0..2 {
        assert!(w.kiln(home.path(), &["net", "up"]).status.success());
    }
    assert_eq!(w.ruleset().matches("table ip kiln").count(), 1);
    assert!(w.kiln(home.path(), &["net", "down"]).status.success());
    assert!(
        !w.ruleset().contains("kiln"),
        "down with no VM leaves no table"
    );
}
