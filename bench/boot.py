#!/usr/bin/env python3
"""Boot-time benchmark: kiln's builtin VMM against QEMU, on the same image, in one run.

For each engine: wall time from process start to the banner on serial, and from the stop
request (ACPI power button) to process exit; medians of N runs; the peak RSS of the VMM process;
the host CPU the VM costs while the program idles at its prompt (ms of CPU per second, VMM
process and its children); and, for kiln, the number of VM exits to power-off. Plain QEMU runs
the same image: kiln's program idles like the original it replaces (sti + hlt).

Usage: bench/boot.py [--runs N] [--idle SECONDS] [--image build/boot.img]
(builds kiln in release mode first)
"""
import argparse, json, os, re, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "target", "release", "kiln")
BANNER = b"ClientAPI"

def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

def wait_for(proc, needle, timeout):
    """Reads proc.stdout until needle appears; returns the time it appeared."""
    buf = b""
    deadline = time.perf_counter() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while time.perf_counter() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            if needle in buf:
                return time.perf_counter()
        elif chunk == b"":
            raise RuntimeError(f"exited before {needle!r}: {buf!r}")
        else:
            time.sleep(0.0002)
    raise RuntimeError(f"no {needle!r} within {timeout}s: {buf!r}")

def qmp_powerdown(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ("qmp_capabilities", "system_powerdown"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while b"return" not in f.readline():
            pass
    return s

IDLE = 2.0

def cpu_seconds(pids):
    """User + system CPU time the processes have used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick

def idle_cpu(pids):
    """ms of CPU per second the processes use while the guest idles at its prompt."""
    time.sleep(0.5)  # let the boot's last work settle
    before = cpu_seconds(pids)
    time.sleep(IDLE)
    return (cpu_seconds(pids) - before) / IDLE

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []

def run_kiln(image, rt, engine="builtin"):
    env = dict(os.environ, KILN_RUNTIME_DIR=rt, KILN_HOME=os.path.join(rt, "home"))
    t0 = time.perf_counter()
    p = subprocess.Popen([KILN, "-v", "run", "--engine", engine, "--serial-only", "--ram", "16",
                          "--name", "bench", image],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    banner = wait_for(p, BANNER, 30) - t0
    # kiln's own process and, on the qemu engine, its QEMU.
    rss = (peak_rss_kib(p.pid) or 0) + sum(peak_rss_kib(c) or 0 for c in children(p.pid))
    idle = idle_cpu([p.pid, *children(p.pid)])
    t1 = time.perf_counter()
    subprocess.run([KILN, "stop", "bench"], env=env, check=True, stdout=subprocess.DEVNULL)
    p.wait(30)
    stop = time.perf_counter() - t1
    err = p.stderr.read().decode()
    exits = re.search(r"VM exits: (\d+) total", err)
    return banner, stop, rss, int(exits.group(1)) if exits else None, idle

def run_qemu(image, extra, powers_off):
    with tempfile.TemporaryDirectory() as d:
        qmp = os.path.join(d, "qmp.sock")
        t0 = time.perf_counter()
        p = subprocess.Popen(["qemu-system-x86_64", "-display", "none", "-serial", "stdio", "-nic", "none",
                              "-m", "16", "-qmp", f"unix:{qmp},server=on,wait=off", *extra],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        banner = wait_for(p, BANNER, 60) - t0
        rss = peak_rss_kib(p.pid)
        idle = idle_cpu([p.pid])
        t1 = time.perf_counter()
        s = qmp_powerdown(qmp)
        try:
            p.wait(10 if powers_off else 0.5)
            stop = time.perf_counter() - t1
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            stop = None
        s.close()
        return banner, stop, rss, None, idle

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def main():
    global IDLE
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image")
    ap.add_argument("--idle", type=float, default=2.0)
    args = ap.parse_args()
    IDLE = args.idle
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "kiln"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="kiln-bench-boot-")
    image = args.image
    if not image:
        subprocess.run([KILN, "build", "--out", work], check=True, stdout=subprocess.DEVNULL)
        image = os.path.join(work, "boot.img")
    drive = ["-drive", f"file={image},format=raw,if=ide"]
    engines = [
        ("kiln run (builtin, KVM)", lambda: run_kiln(image, work)),
        ("kiln run --engine qemu (pc + SeaBIOS, TCG; RSS: kiln + QEMU)", lambda: run_kiln(image, work, "qemu")),
        ("qemu pc + SeaBIOS, TCG", lambda: run_qemu(image, ["-machine", "pc", "-accel", "tcg", *drive], True)),
        ("qemu pc + SeaBIOS, KVM", lambda: run_qemu(image, ["-machine", "pc", "-accel", "kvm", *drive], True)),
        ("qemu microvm + bios-microvm, TCG, virtio-blk", lambda: run_qemu(image, [
            "-machine", "microvm", "-accel", "tcg", "-bios", "/usr/share/seabios/bios-microvm.bin",
            "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"], False)),
    ]
    rows = []
    for name, fn in engines:
        results = []
        for _ in range(args.runs):
            try:
                results.append(fn())
            except Exception as e:  # a reference that cannot boot here is reported, not fatal
                print(f"{name}: {e}", file=sys.stderr)
                break
        if not results:
            rows.append((name, None, None, None, None, None))
            continue
        rows.append((name, median([r[0] for r in results]), median([r[1] for r in results]),
                     max(r[2] or 0 for r in results), median([r[3] for r in results]),
                     median([r[4] for r in results])))
    fastest_qemu = min((r[1] for r in rows[2:] if r[1]), default=None)
    fmt = lambda v, scale=1000, unit="ms": "n/a" if v is None else f"{v * scale:.1f} {unit}"
    print(f"median of {args.runs} runs; image {image}")
    print("| engine | start → banner | stop → exit | peak RSS | idle CPU | VM exits |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, banner, stop, rss, exits, idle in rows:
        print(f"| {name} | {fmt(banner)} | {fmt(stop)} | {'n/a' if not rss else f'{rss / 1024:.1f} MiB'} | {fmt(idle, 1000, 'ms/s')} | {exits if exits else ''} |")
    if rows[0][1] and fastest_qemu:
        print(f"\nkiln start → banner is {fastest_qemu / rows[0][1]:.0f}x faster than the fastest QEMU boot")

if __name__ == "__main__":
    main()
