"""What kiln's Python benchmarks share."""

import glob
import json
import os
import sys


def debian_image(given=None):
    """`given`, else the newest amd64 image from `kiln image debian` under /var/tmp."""
    if given:
        return given
    found = sorted(glob.glob("/var/tmp/kiln-debian-*/image.json"), key=os.path.getmtime)
    found = [f for f in found if (json.load(open(f)).get("builder") or {}).get("arch") != "i386"]
    if not found:
        sys.exit("no image: run `kiln image debian DIR` and pass --image DIR")
    return os.path.dirname(found[-1])


def vm_arguments(ap):
    """The options of a benchmark that runs Debian microVMs."""
    ap.add_argument("--image")
    ap.add_argument("--kiln", default=os.environ.get("KILN", "target/release/kiln"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vcpu", default="2")
    ap.add_argument("--ram", default="1024")
    return ap
