#!/usr/bin/env python3
"""Snapshots of a Debian microVM: `kiln vm resume` -> first console answer against `kiln vm run`
-> first console answer (the same VM, the same run), the snapshot's size and the time to take
it, and QEMU started by hand from the same snapshot files (the reference: QEMU's own
`-incoming` of the mapped-ram state kiln wrote, disks copied before the clock starts).

With --firmware: the 256-byte program instead, on the builtin VMM and on QEMU (pc): a line
half typed, `kiln vm snapshot --stop`, then `kiln vm resume` -> the REPL's answer to the rest
of the line, against `kiln vm run --disk` -> the answer to a whole line. (In-process, without
kiln's CLI and supervisor: `cargo run --release -p kiln-vmm --example resume`.)

Usage: bench/snapshot.py [--image DIR] [--kiln PATH] [--runs N] [--vcpu 2] [--ram 1024]
       bench/snapshot.py --firmware [--kiln PATH] [--runs N]
Needs an image from `kiln image debian` (default: the newest /var/tmp/kiln-debian-*/).
"""

import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib

PROBE = b"echo kiln-$((6*7))\n"
ANSWER = b"kiln-42"


def qmp(s, cmd, **args):
    msg = {"execute": cmd}
    if args:
        msg["arguments"] = args
    s.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while True:
        buf += s.recv(65536)
        for line in buf.split(b"\n"):
            if line.strip():
                m = json.loads(line)
                if "return" in m or "error" in m:
                    if "error" in m:
                        raise SystemExit(f"QMP {cmd}: {m['error']}")
                    return m["return"]
        buf = buf[buf.rfind(b"\n") + 1:]


def hand_resume(rec, snap, hand):
    """QEMU by hand, from the snapshot: the recorded command line with -incoming defer."""
    vmdir = rec["config"]["dir"]
    shutil.rmtree(hand, ignore_errors=True)
    os.makedirs(hand)
    with open(os.path.join(snap, "snapshot.json")) as f:
        m = json.load(f)
    disks = {d["device"]: d for d in rec["config"]["disks"]}
    cmd = rec["config"]["command"]
    for e in m["disks"]:
        path = disks[e["device"]]["path"]
        own = os.path.join(hand, os.path.basename(path))
        subprocess.run(["cp", "--sparse=always", os.path.join(snap, e["file"]), own], check=True)
        cmd = [c.replace(path.replace(",", ",,"), own) for c in cmd]
    cmd = [c.replace(vmdir, hand) for c in cmd] + ["-incoming", "defer"]
    for p in glob.glob(os.path.join(vmdir, "seed.tar")):
        shutil.copy(p, hand)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.path.join(hand, "serial.sock"))
    srv.listen(1)
    t0 = time.perf_counter()
    q = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    conn, _ = srv.accept()
    qs = None
    while qs is None:
        try:
            qs = socket.socket(socket.AF_UNIX)
            qs.connect(os.path.join(hand, "qmp.sock"))
        except OSError:
            qs = None
            time.sleep(0.001)
    qs.recv(65536)
    qmp(qs, "qmp_capabilities")
    qmp(qs, "migrate-set-capabilities",
        capabilities=[{"capability": "mapped-ram", "state": True}])
    qmp(qs, "migrate-incoming", channels=[{"channel-type": "main", "addr": {
        "transport": "file", "filename": os.path.join(snap, "machine"), "offset": 0}}])
    while qmp(qs, "query-migrate").get("status") != "completed":
        time.sleep(0.002)
    qmp(qs, "cont")
    conn.settimeout(0.05)
    conn.sendall(PROBE)
    seen = b""
    while ANSWER not in seen.replace(b"$((6*7))", b""):
        try:
            seen += conn.recv(65536)
        except socket.timeout:
            pass
    t = time.perf_counter() - t0
    q.kill()
    q.wait()
    return t


def repl(sock_path, send, needle, timeout=30, resend=None):
    """Connects to a console socket, types `send` (again every `resend` seconds, for a guest
    still booting) and returns when `needle` has come back."""
    t_end = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            break
        except OSError:
            if time.monotonic() > t_end:
                raise SystemExit(f"{sock_path}: no console")
            time.sleep(0.001)
    s.settimeout(0.01)
    if send:
        s.sendall(send)
    seen = b""
    last = time.monotonic()
    while needle not in seen:
        if time.monotonic() > t_end:
            raise SystemExit(f"{sock_path}: no {needle!r}; got {seen[-300:]!r}")
        if resend and time.monotonic() - last > resend:
            s.sendall(send)
            last = time.monotonic()
        try:
            seen += s.recv(65536)
        except socket.timeout:
            pass
    t = time.perf_counter()
    s.close()
    return t


def answer(sock_path, timeout=300, resend=None):
    """The first console answer: the guest's reply to PROBE."""
    return repl(sock_path, PROBE, ANSWER, timeout, resend)


def firmware(a):
    home = tempfile.mkdtemp(prefix="kiln-bench-")
    env = dict(os.environ, KILN_HOME=home)
    subprocess.run([a.kiln, "build", "--out", os.path.join(home, "build")], check=True,
                   stdout=subprocess.DEVNULL)
    rows = {}
    try:
        for engine in ("builtin", "qemu"):
            boot, resume = [], []
            for i in range(a.runs):
                name = f"{engine}-{i}"
                disk = os.path.join(home, f"{name}.img")
                shutil.copy(os.path.join(home, "build", "boot.img"), disk)
                sock = os.path.join(home, "vms", name, "console.sock")
                t0 = time.perf_counter()
                subprocess.run([a.kiln, "vm", "run", "--disk", disk, "--engine", engine,
                                "--name", name], env=env, check=True, stdout=subprocess.DEVNULL)
                repl(sock, b"", b"$ ")
                boot.append(repl(sock, b"hello\r", b"olleh\r\n$ ") - t0)
                repl(sock, b"hel", b"olleh\r\n$ hel")
                subprocess.run([a.kiln, "vm", "snapshot", name, "--tag", "h", "--stop"],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                t0 = time.perf_counter()
                subprocess.run([a.kiln, "vm", "resume", name], env=env, check=True,
                               stdout=subprocess.DEVNULL)
                resume.append(repl(sock, b"lo\r", b"olleh\r\n$ ") - t0)
                subprocess.run([a.kiln, "vm", "kill", name], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            rows[engine] = (statistics.median(boot), min(boot), statistics.median(resume),
                            min(resume))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"| {a.runs} runs, median (min) | `vm run` -> answer | `vm resume` -> answer |")
    print("|---|---:|---:|")
    for engine, (b, bl, r, rl) in rows.items():
        print(f"| {engine} | {b * 1000:.0f} ms ({bl * 1000:.0f}) | {r * 1000:.0f} ms ({rl * 1000:.0f}) |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--firmware", action="store_true")
    benchlib.vm_arguments(ap)
    a = ap.parse_args()
    if a.firmware:
        return firmware(a)
    image = benchlib.debian_image(a.image)
    home = tempfile.mkdtemp(prefix="kiln-bench-")
    env = dict(os.environ, KILN_HOME=home)
    rows = {k: [] for k in ("boot", "take", "paused", "stored", "resume", "hand")}
    try:
        for i in range(a.runs):
            name = f"snap-{i}"
            vmdir = os.path.join(home, "vms", name)
            t0 = time.perf_counter()
            subprocess.run([a.kiln, "vm", "run", "--name", name, "--image", image,
                            "--vcpu", a.vcpu, "--ram", a.ram], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            rows["boot"].append(answer(os.path.join(vmdir, "console.sock"), resend=5) - t0)
            time.sleep(5)  # let the guest settle, as a user would before snapshotting
            t0 = time.perf_counter()
            out = subprocess.run([a.kiln, "vm", "snapshot", name, "--tag", "b", "--stop", "--json"],
                                 env=env, check=True, capture_output=True).stdout
            rows["take"].append(time.perf_counter() - t0)
            m = json.loads(out)
            rows["paused"].append(m["paused_ms"] / 1000)
            rows["stored"].append(m["stored_bytes"])
            t0 = time.perf_counter()
            subprocess.run([a.kiln, "vm", "resume", name, "--tag", "b"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            rows["resume"].append(answer(os.path.join(vmdir, "console.sock")) - t0)
            with open(os.path.join(vmdir, "vm.json")) as f:
                rec = json.load(f)
            subprocess.run([a.kiln, "vm", "kill", name], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            rows["hand"].append(hand_resume(rec, os.path.join(vmdir, "snapshots", "b"),
                                            os.path.join(home, "hand")))
            subprocess.run([a.kiln, "vm", "rm", name], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"run {i}: boot {rows['boot'][-1]:.2f} s, snapshot {rows['take'][-1]:.2f} s "
                  f"(paused {rows['paused'][-1]:.2f} s, {rows['stored'][-1] / 2**20:.0f} MiB), "
                  f"resume {rows['resume'][-1] * 1000:.0f} ms, QEMU by hand "
                  f"{rows['hand'][-1] * 1000:.0f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    low = {k: min(v) for k, v in rows.items()}
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"| {a.runs} runs, median (min), {a.vcpu} vCPUs, {a.ram} MiB, TCG | time | ratio |")
    print("|---|---:|---:|")
    print(f"| `kiln vm run` -> first console answer | {med['boot']:.2f} s ({low['boot']:.2f}) | 1 |")
    print(f"| `kiln vm resume` -> first console answer | {med['resume'] * 1000:.0f} ms "
          f"({low['resume'] * 1000:.0f}) | {med['boot'] / med['resume']:.0f}x faster |")
    print(f"| QEMU by hand from the same snapshot -> first answer | {med['hand'] * 1000:.0f} ms "
          f"({low['hand'] * 1000:.0f}) | kiln {med['resume'] / med['hand']:.2f}x |")
    print(f"| `kiln vm snapshot --stop` (guest paused) | {med['take']:.2f} s "
          f"({med['paused']:.2f} s paused) | |")
    print(f"| snapshot stored on disk (RAM {a.ram} MiB) | {med['stored'] / 2**20:.0f} MiB | |")


if __name__ == "__main__":
    main()
