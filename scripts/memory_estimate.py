"""Measured against estimated memory: each case drawn in a fresh process, its peak resident memory over the
loaded pipeline (VmHWM after resetting it once loaded) beside memory.py's estimate for the same request.

    python scripts/memory_estimate.py out/shapes --case 32x50 --case 256x1 --case 512x1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from sdruntime.manifest import read_manifest
from sdruntime.memory import MemoryModel, RequestShape

MEASURE = """
import json, re, sys
from sdruntime.pipeline import StableDiffusionPipeline
from sdruntime.session import SessionSettings
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
folder, size, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = StableDiffusionPipeline.load(folder, settings=SessionSettings(intra_op_threads=1))
loaded = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
pipe(sys.argv[4], num_inference_steps=1, seed=list(range(images)), num_images=images, height=size, width=size)
print(json.dumps({"loaded": loaded, "measured": status("VmHWM") - loaded}))
"""


def measure(folder: str, side: int, images: int, prompt: str = "a red circle") -> dict[str, int]:
    """One generation (1 step, CFG, one thread) in a fresh process: its loaded RSS and the peak it adds, bytes."""
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(side), str(images), prompt],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--case", action="append", default=[], help="SIDExIMAGES, e.g. 256x1 (repeatable)")
    args = parser.parse_args()
    model = MemoryModel.of(read_manifest(args.folder))
    print("| size | images | loaded MiB | measured MiB | estimated MiB | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for case in args.case or ["32x50", "256x1", "384x1", "512x1"]:
        side, images = (int(x) for x in case.split("x"))
        result = measure(args.folder, side, images)
        estimate = model.peak(RequestShape(images, 2 * images, 2, side, side), 2 * images, images)
        print(
            f"| {side}x{side} | {images} | {result['loaded'] / 2**20:.0f} | {result['measured'] / 2**20:.0f} "
            f"| {estimate / 2**20:.0f} | {estimate / result['measured']:.2f} |"
        )


if __name__ == "__main__":
    main()
