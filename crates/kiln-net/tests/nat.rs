//! The nftables table on real nftables, in a network namespace of the test's own (a thread
//! that unshares one; the `ip` and `nft` it runs are in it too). Nothing leaves the namespace.

use kiln_net::{nat, pool, tap::Tap, Ipv4Net};

/// Runs `f` on a thread in a fresh network namespace, or skips without root.
fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) {
    let required = std::env::var("KILN_REQUIRE_NET").is_ok_and(|v| v == "1");
    if !kiln_sys::process::is_root() {
        assert!(
            !required,
            "KILN_REQUIRE_NET=1 but {test} is not running as root"
        );
        eprintln!("SKIP {test}: needs root (network namespaces, TAP, nftables)");
        return;
    }
    std::thread::spawn(move || {
        kiln_sys::net::unshare_netns().expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("{test} failed"));
}

fn ip(args: &str) {
    let st = std::process::Command::new("ip")
        .args(args.split(' '))
        .status()
        .unwrap();
    assert!(st.success(), "ip {args}");
}

#[test]
fn chains_up_down_and_cleanup() {
    in_netns("chains_up_down_and_cleanup", || {
        ip("link set lo up");
        ip("link add up0 type veth peer name up1");
        ip("link set up1 up");
        ip("addr add 198.51.100.1/30 dev up0");
        ip("link set up0 up");
        let state = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let pool: Ipv4Net = "198.51.100.64/26".parse().unwrap();
        // A pool over a route of the host is refused.
        let e = pool::lease(
            home.path(),
            "198.51.100.0/24".parse().unwrap(),
            "a",
            &|_| true,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "pool 198.51.100.0/24 overlaps the host route 198.51.100.0/30 on up0; choose another pool");
        let a = pool::lease(home.path(), pool, "a", &|_| true).unwrap();
        let tap = Tap::create(a.subnet).unwrap();
        assert!(kiln_net::tap::exists(tap.name()));
        // The TAP's route makes its /30 taken for any other kiln home too.
        let other_home = tempfile::tempdir().unwrap();
        let b = pool::lease(other_home.path(), pool, "b", &|_| true).unwrap();
        assert_ne!(a.subnet, b.subnet);

        let forwarding_before = nat::forwarding().unwrap();
        assert!(!forwarding_before, "a new namespace does not forward");
        nat::add_vm(tap.name(), a.guest_ip()).unwrap();
        // Twice is the same as once.
        nat::add_vm(tap.name(), a.guest_ip()).unwrap();
        let s = nat::status().unwrap();
        assert!(s.table && !s.up && !s.forwarding, "{s:?}");
        assert_eq!(s.vms.len(), 1);
        assert_eq!(s.vms[0].tap, tap.name());

        assert_eq!(nat::up("up0", state.path()).unwrap(), nat::Up::Started);
        assert_eq!(nat::up("up0", state.path()).unwrap(), nat::Up::AlreadyUp);
        let e = nat::up("nope0", state.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid uplink 'nope0': no such network interface"
        );
        let s = nat::status().unwrap();
        assert!(
            s.up && s.forwarding && s.uplink.as_deref() == Some("up0"),
            "{s:?}"
        );
        let rules = std::process::Command::new("nft")
            .args(["list", "table", "ip", "kiln"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains("masquerade")
                && rules.contains(&format!("ip saddr != {} counter", a.guest_ip())),
            "{rules}"
        );

        assert!(nat::down(state.path()).unwrap());
        assert!(
            !nat::down(state.path()).unwrap(),
            "down with nothing up does nothing"
        );
        let s = nat::status().unwrap();
        assert!(
            !s.up && !s.forwarding && s.table,
            "forwarding is off again, the VM's chains stay: {s:?}"
        );

        nat::remove_vm(tap.name()).unwrap();
        nat::remove_vm(tap.name()).unwrap();
        let s = nat::status().unwrap();
        assert!(!s.table, "no VM and NAT down: no table: {s:?}");
        let name = tap.name().to_string();
        drop(tap);
        assert!(
            !kiln_net::tap::exists(&name),
            "the TAP goes with its last descriptor"
        );
        pool::release(home.path(), "a").unwrap();
    });
}
