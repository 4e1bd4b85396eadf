"""Export a full-size random-weight U-Net (SD 1.5's or SDXL base's) and run it in ONNX Runtime.

    python scripts/export_large.py --out /tmp/sd15-unet [--preset sd15-random] [--dtype fp32] [--latent 32]
    python scripts/export_large.py --out /tmp/sdxl-unet --preset sdxl-random --rss-limit-gb 21

Each phase runs in its own process so that its peak RSS is its own: the export (load, trace,
ORT's basic cleanup, one model.onnx + model.onnx_data, the check against PyTorch) and the run
(session creation and U-Net steps at batch 2, as guidance runs it). `--rss-limit-gb` stops a phase
whose resident memory passes the limit (this machine has no swap) and reports how far it got.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def export_phase(out: Path, dtype: str, preset: str) -> dict:
    import sdexport

    lines: list[str] = []
    t0 = time.perf_counter()
    sdexport.convert(
        preset,
        out,
        components=["unet"],
        dtype=dtype,
        overwrite=True,
        log=lambda s: (lines.append(s), print(s, flush=True)),
    )
    files = sorted(p.name for p in (out / "unet").iterdir())
    return {
        "export_s": round(time.perf_counter() - t0, 1),
        "export_peak_rss_gb": round(peak_rss_gb(), 2),
        "files": files,
        "bytes": sum((out / "unet" / f).stat().st_size for f in files),
        "log": lines,
    }


def run_phase(out: Path, latent: int, steps: int) -> dict:
    import numpy as np
    from sdruntime.manifest import read_manifest
    from sdruntime.session import Component, SessionSettings

    manifest = read_manifest(out)
    t0 = time.perf_counter()
    unet = Component(manifest, "unet", ["CPUExecutionProvider"], SessionSettings())
    session_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    sizes = {"batch": 2, "height": latent, "width": latent, "sequence": manifest.pipeline.tokenizer_max_length}
    feeds = {}
    for entry in manifest.components["unet"].inputs:  # any U-Net's inputs, sized from the manifest
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in entry.shape)
        feeds[entry.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.full(2, 500.0, np.float32)
    if "time_ids" in feeds:
        feeds["time_ids"] = np.tile(np.float32([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]), (2, 1))
    binding = unet.bind(feeds)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        binding.run()
        times.append(time.perf_counter() - t)
    return {
        "session_s": round(session_s, 1),
        "step_s_median": round(float(np.median(times)), 2),
        "latent": latent,
        "batch": 2,
        "run_peak_rss_gb": round(peak_rss_gb(), 2),
    }


def run_guarded(cmd: list[str], limit_gb: float | None) -> tuple[subprocess.CompletedProcess, float, bool]:
    """Run `cmd`, polling its resident memory twice a second; past `limit_gb` it is killed.
    Returns (the finished process, the highest RSS seen in GB, whether the guard killed it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, killed = [0.0], [False]

    def watch() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        seen[0] = max(seen[0], int(line.split()[1]) / 1024**2)
            except OSError:
                return
            if limit_gb is not None and seen[0] > limit_gb:
                killed[0] = True
                proc.kill()
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), seen[0], killed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd15-unet"))
    parser.add_argument("--preset", default="sd15-random", choices=["sd15-random", "sdxl-random"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--latent", type=int, default=32, help="latent height and width for the run (32 = 256x256 px)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rss-limit-gb", type=float, help="kill a phase whose RSS passes this (no swap here)")
    parser.add_argument("--phase", choices=["export", "run"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "export":
        print("RESULT " + json.dumps(export_phase(args.out, args.dtype, args.preset)))
        return
    if args.phase == "run":
        print("RESULT " + json.dumps(run_phase(args.out, args.latent, args.steps)))
        return
    results = {"preset": args.preset, "dtype": args.dtype}
    for phase in ("export", "run"):
        cmd = [
            sys.executable,
            __file__,
            "--phase",
            phase,
            "--out",
            str(args.out),
            "--dtype",
            args.dtype,
            "--latent",
            str(args.latent),
            "--steps",
            str(args.steps),
            "--preset",
            args.preset,
        ]
        started = time.perf_counter()
        proc, seen_gb, killed = run_guarded(cmd, args.rss_limit_gb)
        if killed:
            last = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
            results.update(
                {
                    f"{phase}_killed_at_rss_gb": round(seen_gb, 2),
                    f"{phase}_killed_after_s": round(time.perf_counter() - started, 1),
                    f"{phase}_last_log": last[0] if last else "",
                }
            )
            print(json.dumps(results, indent=2))
            sys.exit(f"{phase} passed --rss-limit-gb {args.rss_limit_gb} and was stopped")
        if proc.returncode != 0:
            print(json.dumps(results, indent=2))  # what the phases before it measured
            sys.exit(f"{phase} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.update(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
