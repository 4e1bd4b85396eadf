"""Export an SD 1.5-sized random-weight U-Net (> 2 GB in fp32) and run it in ONNX Runtime.

    python scripts/export_large.py --out /tmp/sd15-unet [--dtype fp32] [--latent 32] [--steps 3]

Each phase runs in its own process so that its peak RSS is its own: the export (load, trace,
ORT's basic cleanup, one model.onnx + model.onnx_data, the check against PyTorch) and the run
(session creation and U-Net steps at batch 2, as guidance runs it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def export_phase(out: Path, dtype: str) -> dict:
    import sdexport

    lines: list[str] = []
    t0 = time.perf_counter()
    sdexport.convert("sd15-random", out, components=["unet"], dtype=dtype, overwrite=True,
                     log=lambda s: (lines.append(s), print(s, flush=True)))
    files = sorted(p.name for p in (out / "unet").iterdir())
    return {"export_s": round(time.perf_counter() - t0, 1), "export_peak_rss_gb": round(peak_rss_gb(), 2),
            "files": files, "bytes": sum((out / "unet" / f).stat().st_size for f in files), "log": lines}


def run_phase(out: Path, latent: int, steps: int) -> dict:
    import numpy as np
    from sdruntime.manifest import read_manifest
    from sdruntime.session import Component, SessionSettings

    manifest = read_manifest(out)
    t0 = time.perf_counter()
    unet = Component(manifest, "unet", ["CPUExecutionProvider"], SessionSettings())
    session_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
        "timestep": np.full(2, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
    }
    binding = unet.bind(feeds)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        binding.run()
        times.append(time.perf_counter() - t)
    return {"session_s": round(session_s, 1), "step_s_median": round(float(np.median(times)), 2),
            "latent": latent, "batch": 2, "run_peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd15-unet"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--latent", type=int, default=32, help="latent height and width for the run (32 = 256x256 px)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phase", choices=["export", "run"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "export":
        print("RESULT " + json.dumps(export_phase(args.out, args.dtype)))
        return
    if args.phase == "run":
        print("RESULT " + json.dumps(run_phase(args.out, args.latent, args.steps)))
        return
    results = {}
    for phase in ("export", "run"):
        cmd = [sys.executable, __file__, "--phase", phase, "--out", str(args.out), "--dtype", args.dtype,
               "--latent", str(args.latent), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{phase} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.update(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
