#!/usr/bin/env python3
"""Benchmark kiln's image pipeline against qemu-img, side by side in one run.

1. `kiln build` (every format) against the same set made the reference way: qemu-img convert for
   qcow2/vmdk/vhd/vdi and xorriso for the ISO.
2. `kiln convert` of a 4 GiB sparse raw image holding 256 MiB of data into qcow2, vmdk, vhd and
   vdi, against `qemu-img convert` with the equivalent options.

Reports medians and the ratio kiln/qemu-img (below 1.0 means kiln is faster).
Usage: bench/images.py [--runs N] [--json FILE]   (builds kiln in release mode first)
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "target", "release", "kiln")

def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t

def median_of(runs, prepare, cmd):
    times = []
    for _ in range(runs):
        prepare()
        times.append(timed(cmd))
    return statistics.median(times)

def make_sparse_source(path, size=4 << 30, data=256 << 20, chunk=1 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
        stride = size // (data // chunk)
        for i in range(data // chunk):
            f.seek(i * stride)
            f.write(os.urandom(chunk))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "kiln"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="kiln-bench-", dir=os.environ.get("KILN_BENCH_DIR", "/var/tmp"))
    rows = []
    try:
        # 1. kiln build vs the reference toolchain.
        out = os.path.join(work, "build")
        ref = os.path.join(work, "ref")
        def clean(d):
            return lambda: (shutil.rmtree(d, ignore_errors=True), os.makedirs(d))
        kiln_build = median_of(args.runs, clean(out), [KILN, "build", "--out", out])
        img = os.path.join(out, "boot.img")
        script = " && ".join([
            f"cp {img} {ref}/boot.img",
            f"qemu-img convert -f raw -O qcow2 {ref}/boot.img {ref}/boot.qcow2",
            f"qemu-img convert -f raw -O vmdk -o subformat=monolithicFlat {ref}/boot.img {ref}/boot.vmdk",
            f"qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on {ref}/boot.img {ref}/boot.vhd",
            f"qemu-img convert -f raw -O vdi {ref}/boot.img {ref}/boot.vdi",
            f"mkdir -p {ref}/iso && cp {out}/boot.bin {ref}/iso/ && xorriso -as mkisofs -quiet -b boot.bin -no-emul-boot -boot-load-size 4 -o {ref}/boot.iso {ref}/iso",
        ])
        ref_build = median_of(args.runs, clean(ref), ["sh", "-c", script])
        rows.append(("build: all formats", kiln_build, ref_build))

        # 2. convert a 4 GiB sparse raw with 256 MiB of data.
        src = os.path.join(work, "src.raw")
        print("making a 4 GiB sparse source with 256 MiB of data ...", file=sys.stderr)
        make_sparse_source(src)
        subprocess.run(["sync"])
        for fmt, qfmt, opts in [
            ("qcow2", "qcow2", []),
            ("vmdk", "vmdk", ["-o", "subformat=monolithicFlat"]),
            ("vhd", "vpc", ["-o", "subformat=fixed,force_size=on"]),
            ("vdi", "vdi", []),
        ]:
            k_out = os.path.join(work, f"k.{fmt}")
            q_out = os.path.join(work, f"q.{fmt}")
            def rm(*paths):
                def f():
                    for p in paths:
                        for q in (p, p.replace(f".{fmt}", f"-flat.{fmt}")):
                            if os.path.exists(q):
                                os.unlink(q)
                return f
            k = median_of(args.runs, rm(k_out), [KILN, "convert", src, k_out])
            kn = median_of(args.runs, rm(k_out), [KILN, "convert", "--no-fsync", src, k_out])
            qemu = ["qemu-img", "convert", "-f", "raw", "-O", qfmt, *opts, src, q_out]
            q = median_of(args.runs, rm(q_out), qemu)
            # qemu-img leaves its output in the page cache; `sync FILE...` makes it as durable as kiln's.
            q_files = f"{q_out} {q_out.replace(f'.{fmt}', f'-flat.{fmt}')}" if fmt == "vmdk" else q_out
            qs = median_of(args.runs, rm(q_out), ["sh", "-c", " ".join(qemu) + f" && sync {q_files}"])
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", qfmt, src, k_out], capture_output=True, text=True)
            if cmp.returncode != 0:
                sys.exit(f"kiln's {fmt} differs from the source: {cmp.stdout}{cmp.stderr}")
            rows.append((f"convert 4 GiB sparse (256 MiB data) -> {fmt}, durable (fsync / + sync)", k, qs))
            rows.append((f"convert 4 GiB sparse (256 MiB data) -> {fmt}, page cache (--no-fsync / plain)", kn, q))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"| operation | kiln (s) | qemu-img (s) | kiln / qemu-img |")
    print(f"|---|---:|---:|---:|")
    for name, k, q in rows:
        print(f"| {name} | {k:.3f} | {q:.3f} | {k / q:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"operation": n, "kiln_s": k, "qemu_img_s": q, "ratio": k / q} for n, k, q in rows], f, indent=2)

if __name__ == "__main__":
    main()
