#!/usr/bin/env python3
"""Networking: `kiln vm run` to the first successful `kiln vm ssh NAME -- true`, side by side with
QEMU started by hand with the same kernel, disks and network; and TCP throughput from the guest
to an "internet" namespace through TAP + NAT, through passt, and through QEMU's slirp (the
reference).

Everything runs in network namespaces this script makes (a "host" namespace where kiln runs and
an "internet" one behind a veth, 198.51.100.0/30, with an HTTP server on 203.0.113.80 serving
100 MiB); no traffic leaves them. Needs root.

The hand run uses exactly the command line kiln recorded for its VM (same kernel, initrd, kernel
arguments, disk copies prepared before the clock starts, the same seed disk and pinned key), with
a TAP device made by `ip tuntap` and QEMU opening it by name; it is timed from QEMU's start to the
first `ssh ... true` that succeeds, polled the same way.

Usage: bench/net.py [--image DIR] [--kiln PATH] [--runs N]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib

HOST_NS, INET_NS = "kiln-bench-host", "kiln-bench-inet"
POOL = "198.51.100.64/26"
SERVER = "203.0.113.80"
SERVER_PY = r"""
import socketserver, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = 100 << 20 if self.path == "/big" else 6
        self.send_response(200); self.send_header("Content-Length", str(n)); self.end_headers()
        chunk = bytes(1 << 20)
        while n > 0:
            k = min(n, len(chunk)); self.wfile.write(chunk[:k]); n -= k
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("203.0.113.80", 80), H).serve_forever()
"""


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def in_host(*args, **kw):
    return sh("ip", "netns", "exec", HOST_NS, *args, **kw)


def world():
    for ns in (HOST_NS, INET_NS):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "kbh0", "netns", HOST_NS, "type", "veth", "peer", "name", "kbi0", "netns", INET_NS)
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "198.51.100.1/30", "dev", "kbh0"],
                ["ip", "link", "set", "kbh0", "up"], ["ip", "route", "add", "default", "via", "198.51.100.2"]):
        in_host(*cmd)
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "198.51.100.2/30", "dev", "kbi0"],
                ["ip", "addr", "add", SERVER + "/32", "dev", "lo"], ["ip", "link", "set", "kbi0", "up"]):
        sh("ip", "netns", "exec", INET_NS, *cmd)
    server = subprocess.Popen(["ip", "netns", "exec", INET_NS, sys.executable, "-c", SERVER_PY])
    time.sleep(0.5)
    return server


def kiln(k, home, *args, check=True, env=None):
    e = dict(os.environ, KILN_HOME=home, **(env or {}))
    return in_host(k, *args, check=check, env=e)


def first_ssh(k, home, name, timeout=600):
    """`kiln vm ssh NAME -- true` (which waits for sshd itself) until it succeeds."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if kiln(k, home, "vm", "ssh", name, "--timeout", str(timeout), "--", "true", check=False).returncode == 0:
            return time.perf_counter()
        time.sleep(0.1)
    raise SystemExit(f"{name}: no ssh within {timeout} s")


def boot_kiln(k, image, home, name, net, env=None):
    t0 = time.perf_counter()
    kiln(k, home, "vm", "run", "--image", image, "--name", name, "--vcpu", "1", "--ram", "512",
         "--net", net, "--pool", POOL, env=env)
    return first_ssh(k, home, name) - t0


def boot_hand(k, home, name):
    """QEMU by hand with the command kiln recorded for NAME (which is then killed)."""
    rec = json.load(open(os.path.join(home, "vms", name, "vm.json")))
    cmd, meta = rec["config"]["command"], rec["meta"]
    net, vmdir = meta["net"], os.path.join(home, "vms", name)
    ident = meta["ssh_identity"]
    kiln(k, home, "vm", "kill", name)
    hand = tempfile.mkdtemp(prefix="kiln-bench-hand-")
    for f in ("home.ext4", "var.ext4", "seed.tar", "known_hosts"):
        sh("cp", "--sparse=always", os.path.join(vmdir, f), hand)
    base = next(d["backing"] for d in rec["config"]["disks"] if d.get("backing"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, os.path.join(hand, "root.qcow2"))
    args = [a.replace(vmdir, hand) for a in cmd]
    i = args.index("-chardev")
    del args[i:i + 4]
    args += ["-serial", "file:" + os.path.join(hand, "serial.log")]
    tap = net["tap"]
    in_host("ip", "tuntap", "add", tap, "mode", "tap")
    in_host("ip", "addr", "add", f"{net['gateway']}/30", "dev", tap)
    in_host("ip", "link", "set", tap, "up")
    ssh = ["ssh", "-i", ident, "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={hand}/known_hosts",
           "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias=kiln-{name}", "-o", "ConnectTimeout=2",
           "-o", "LogLevel=ERROR", f"root@{net['guest_ip']}", "true"]
    t0 = time.perf_counter()
    qemu = subprocess.Popen(["ip", "netns", "exec", HOST_NS] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while in_host(*ssh, check=False).returncode != 0:
            if qemu.poll() is not None:
                raise SystemExit("hand QEMU exited")
            time.sleep(0.1)
        return time.perf_counter() - t0
    finally:
        qemu.kill()
        qemu.wait()
        in_host("ip", "link", "del", tap, check=False)
        shutil.rmtree(hand, ignore_errors=True)


DOWNLOAD = ("s=$(date +%s.%N); exec 3<>/dev/tcp/" + SERVER + "/80; printf 'GET /big HTTP/1.0\\r\\n\\r\\n' >&3; "
            "n=$(cat <&3 | wc -c); e=$(date +%s.%N); echo $n $s $e")


def throughput(k, home, name):
    out = kiln(k, home, "vm", "ssh", name, "--", DOWNLOAD).stdout.split()
    n, s, e = int(out[0]), float(out[1]), float(out[2])
    assert n > 100 << 20, out
    return (100 << 20) * 8 / (e - s) / 1e6  # Mbit/s of payload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image")
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/net.py needs root (network namespaces, TAP, nftables)")
    image = benchlib.debian_image(a.image)
    k = os.path.abspath(a.kiln)
    server = world()
    home = tempfile.mkdtemp(prefix="kiln-bench-net-")
    res = {"kiln tap": [], "hand tap": [], "kiln user": []}
    tput = {"TAP + NAT": [], "passt": [], "slirp (QEMU)": []}
    try:
        kiln(k, home, "net", "up")
        for r in range(a.runs):
            res["kiln tap"].append(boot_kiln(k, image, home, "bench-tap", "tap"))
            tput["TAP + NAT"].append(throughput(k, home, "bench-tap"))
            res["hand tap"].append(boot_hand(k, home, "bench-tap"))
            kiln(k, home, "vm", "rm", "--force", "bench-tap")
            res["kiln user"].append(boot_kiln(k, image, home, "bench-usr", "user"))
            tput["passt"].append(throughput(k, home, "bench-usr"))
            kiln(k, home, "vm", "rm", "--force", "bench-usr")
            boot_kiln(k, image, home, "bench-slirp", "user", env={"KILN_PASST": "/nonexistent"})
            tput["slirp (QEMU)"].append(throughput(k, home, "bench-slirp"))
            kiln(k, home, "vm", "rm", "--force", "bench-slirp")
            print(f"run {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} s" for n, v in res.items()) + "; "
                  + ", ".join(f"{n} {v[-1]:.0f} Mbit/s" for n, v in tput.items()), flush=True)
    finally:
        kiln(k, home, "net", "down", check=False)
        for name in ("bench-tap", "bench-usr", "bench-slirp"):
            kiln(k, home, "vm", "rm", "--force", name, check=False)
        server.kill()
        for ns in (HOST_NS, INET_NS):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(home, ignore_errors=True)
    med = lambda v: statistics.median(v)
    print(f"\n| {a.runs} runs, median (min) | time | vs QEMU by hand |\n|---|---|---|")
    for n, v in res.items():
        print(f"| `{n}`: run to first ssh | {med(v):.2f} s ({min(v):.2f}) | {med(v) / med(res['hand tap']):.2f}x |")
    print(f"\n| 100 MiB guest download, median (min) | Mbit/s | vs slirp |\n|---|---|---|")
    for n, v in tput.items():
        print(f"| {n} | {med(v):.0f} ({min(v):.0f}) | {med(v) / med(tput['slirp (QEMU)']):.2f}x |")


if __name__ == "__main__":
    main()
