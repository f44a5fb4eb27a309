#!/usr/bin/env python3
"""kiln vm run vs QEMU started by hand: time to a running VM, time to the serial login prompt,
and resident memory of kiln's processes next to QEMU's.

The hand-started QEMU runs exactly the command line kiln recorded in vm.json (same kernel,
initrd, cmdline and disks, on copies prepared before the clock starts), so the difference is
kiln's own overhead: validation, the copy-on-write overlay, the per-VM disks and the supervisor.

Usage: bench/vm_boot.py [--image DIR] [--kiln PATH] [--runs N]
Needs an image from `kiln image debian` (default: the newest /var/tmp/kiln-debian-*/).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import benchlib


def wait_for(path, needle, timeout):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    return time.perf_counter()
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"'{needle.decode()}' not in {path} within {timeout} s")


def qmp_up(path, timeout=15):
    """Polls until QEMU's QMP socket answers with its greeting (what `kiln vm run` waits for)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.settimeout(5)
            if b"QMP" in s.recv(4096):
                return time.perf_counter(), s
        except OSError:
            pass
        time.sleep(0.001)
    raise SystemExit(f"QMP {path} did not come up")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def serial_listener(path, log):
    """Listens on `path`, accepts QEMU's serial connection and appends what it sends to `log`."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def pump():
        conn, _ = srv.accept()
        with open(log, "ab") as out:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
        conn.close()

    threading.Thread(target=pump, daemon=True).start()
    return srv


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def main():
    ap = argparse.ArgumentParser()
    benchlib.vm_arguments(ap)
    a = ap.parse_args()
    image = benchlib.debian_image(a.image)
    home = tempfile.mkdtemp(prefix="kiln-bench-")
    env = dict(os.environ, KILN_HOME=home)
    rows = {"kiln_run": [], "kiln_login": [], "hand_up": [], "hand_login": [],
            "sup_rss": [], "sup_pss": [], "qemu_rss": [], "hand_qemu_rss": []}
    try:
        for i in range(a.runs):
            name = f"bench-{i}"
            t0 = time.perf_counter()
            subprocess.run([a.kiln, "vm", "run", "--name", name, "--image", image,
                            "--vcpu", a.vcpu, "--ram", a.ram], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            t_run = time.perf_counter()
            vmdir = os.path.join(home, "vms", name)
            t_login = wait_for(os.path.join(vmdir, "serial.log"), b"login:", 300)
            with open(os.path.join(vmdir, "vm.json")) as f:
                rec = json.load(f)
            rows["kiln_run"].append(t_run - t0)
            rows["kiln_login"].append(t_login - t0)
            rows["sup_rss"].append(rss_kib(rec["meta"]["supervisor_pid"]))
            rows["sup_pss"].append(pss_kib(rec["meta"]["supervisor_pid"]))
            rows["qemu_rss"].append(rss_kib(rec["meta"]["pid"]))
            subprocess.run([a.kiln, "vm", "kill", name], env=env, check=True,
                           stdout=subprocess.DEVNULL)

            # The same machine by hand: copies of the disks made before the clock starts.
            hand = os.path.join(home, "hand")
            shutil.rmtree(hand, ignore_errors=True)
            os.makedirs(hand)
            cmd = [c.replace(vmdir, hand) for c in rec["config"]["command"]]
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", rec["meta"]["rootfs"],
                            "-F", "raw", os.path.join(hand, "root.qcow2")], check=True)
            # Fresh disks as kiln makes them (the image's seeds at the default size), not the
            # ones the kiln VM just booted on.
            with open(os.path.join(image, "image.json")) as f:
                manifest = json.load(f)
            for d, seed in (("home.ext4", manifest["home_seed"]), ("var.ext4", manifest["var_seed"])):
                subprocess.run(["cp", "--sparse=always", os.path.join(image, seed),
                                os.path.join(hand, d)], check=True)
            subprocess.run([a.kiln, "vm", "rm", name], env=env, check=True, stdout=subprocess.DEVNULL)
            # kiln's command line connects QEMU's serial port to a socket its supervisor listens
            # on; by hand, a thread here plays that part and writes the log.
            serial = serial_listener(os.path.join(hand, "serial.sock"), os.path.join(hand, "serial.log"))
            t0 = time.perf_counter()
            q = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            t_up, s = qmp_up(os.path.join(hand, "qmp.sock"))
            t_login = wait_for(os.path.join(hand, "serial.log"), b"login:", 300)
            rows["hand_up"].append(t_up - t0)
            rows["hand_login"].append(t_login - t0)
            rows["hand_qemu_rss"].append(rss_kib(q.pid))
            q.kill()
            q.wait()
            s.close()
            serial.close()
            print(f"run {i}: kiln running {rows['kiln_run'][-1]*1000:.0f} ms, login "
                  f"{rows['kiln_login'][-1]:.2f} s | hand running {rows['hand_up'][-1]*1000:.0f} ms, "
                  f"login {rows['hand_login'][-1]:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    low = {k: min(v) for k, v in rows.items() if v}
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"| {a.runs} runs, median (min) | kiln vm run | qemu by hand | kiln's overhead |")
    print(f"|---|---|---|---|")
    print(f"| time to a running VM (QMP greeting) | {med['kiln_run']*1000:.0f} ms ({low['kiln_run']*1000:.0f}) | "
          f"{med['hand_up']*1000:.0f} ms ({low['hand_up']*1000:.0f}) | "
          f"{(med['kiln_run']-med['hand_up'])*1000:+.0f} ms ({(low['kiln_run']-low['hand_up'])*1000:+.0f}) |")
    print(f"| time to the serial login prompt | {med['kiln_login']:.2f} s ({low['kiln_login']:.2f}) | "
          f"{med['hand_login']:.2f} s ({low['hand_login']:.2f}) | "
          f"{(med['kiln_login']-med['hand_login'])*1000:+.0f} ms |")
    print(f"| resident memory of QEMU | {med['qemu_rss']/1024:.1f} MiB | {med['hand_qemu_rss']/1024:.1f} MiB | |")
    print(f"| kiln's resident process (the supervisor), RSS / PSS | {med['sup_rss']/1024:.1f} / "
          f"{med['sup_pss']/1024:.1f} MiB | - | {med['sup_rss']/1024:+.1f} MiB |")


if __name__ == "__main__":
    main()
