#!/usr/bin/env bash
# Compare `kiln-convert` (kiln_image::convert) with `qemu-img convert` on a 4 GiB sparse raw
# image holding 256 MiB of data, for qcow2, vmdk (monolithicFlat), vhd (fixed) and vdi.
# kiln fsyncs its output before renaming it into place; qemu-img does not fsync at all, so
# "qemu-img+sync" (qemu-img followed by `sync FILE`) is the like-for-like durable number.
# kiln-no-fsync is kiln with WriteOptions { fsync: false }, the like-for-like number for plain
# qemu-img.
# Usage: bench/convert-bench.sh [WORKDIR] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/kiln-bench}
runs=${2:-5}
target=${CARGO_TARGET_DIR:-$here/../../target}
if [ -z "${KILN_CONVERT:-}" ]; then
  (cd "$here" && cargo build --release --example kiln-convert -q)
fi
kiln=${KILN_CONVERT:-$target/release/examples/kiln-convert}
mkdir -p "$work"
cd "$work"
if [ ! -f src.raw ]; then
  python3 - <<'PY'
import os, random
random.seed(1)
with open('src.raw', 'wb') as f:
    f.truncate(4 << 30)
    buf = os.urandom(2 << 20)
    for o in sorted(random.sample(range((4 << 30) // (2 << 20)), 128)):
        f.seek(o * (2 << 20)); f.write(buf)
PY
fi
sync
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf "%-6s %12s %15s %16s %10s\n" format qemu-img qemu-img+sync kiln-no-fsync kiln
for f in qcow2 vmdk vhd vdi; do
  q=$f; opts=()
  [ $f = vhd ] && q=vpc && opts=(-o subformat=fixed,force_size=on)
  [ $f = vmdk ] && opts=(-o subformat=monolithicFlat)
  qs=(); qss=(); ks=(); kns=()
  for _ in $(seq "$runs"); do
    rm -f q.$f k.$f q-flat.vmdk k-flat.vmdk; sync
    qs+=("$(t qemu-img convert -f raw -O $q "${opts[@]}" src.raw q.$f)")
    rm -f q.$f q-flat.vmdk; sync
    sf=q.$f; [ $f = vmdk ] && sf="q.$f q-flat.vmdk"
    qss+=("$(t sh -c "qemu-img convert -f raw -O $q ${opts[*]} src.raw q.$f && sync $sf")")
    sync
    rm -f k.$f k-flat.vmdk; sync
    kns+=("$(t env KILN_NO_FSYNC=1 "$kiln" src.raw k.$f $f)")
    rm -f k.$f k-flat.vmdk; sync
    ks+=("$(t "$kiln" src.raw k.$f $f)")
  done
  printf "%-6s %11.3fs %14.3fs %15.3fs %9.3fs\n" $f \
    "$(printf '%s\n' "${qs[@]}" | median)" "$(printf '%s\n' "${qss[@]}" | median)" \
    "$(printf '%s\n' "${kns[@]}" | median)" "$(printf '%s\n' "${ks[@]}" | median)"
done
