"""What each block of a transformer costs to export: time, peak RSS and bytes written, measured on presets
that keep a model's real widths but few blocks, and extrapolated linearly to the full block counts.

    python scripts/measure_blocks.py --preset flux-width-random --dtype fp32 --counts 1,1 2,1 1,2 --full 19,38

Each count runs `sdexport convert PRESET --components transformer` in its own process (so its peak RSS is
its own), from a copy of the preset's recipe with num_layers (double-stream blocks) and num_single_layers
set. The fit: peak = a + b x double + c x single (and the same for time and bytes), solved exactly from
three runs (least squares from more). A JSON line per run and the fit go to stdout, and to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def child(preset_folder: Path, out: Path, dtype: str) -> None:
    """One export, in this process, of the preset in `preset_folder` (found through $SDEXPORT_MODELS); prints
    its measurements as JSON on the last line."""
    os.environ["SDEXPORT_MODELS"] = str(preset_folder.parent)
    import sdexport

    started = time.perf_counter()
    sdexport.convert(preset_folder.name, out, components=["transformer"], dtype=dtype, log=print)
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in (out / "transformer").iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2), "bytes": written}))


def measure(preset: str, dtype: str, double: int, single: int, work: Path) -> dict:
    """Export the preset with `double` and `single` blocks in a child process; its figures."""
    source = REPO / "models" / preset / "recipe.json"
    recipe = json.loads(source.read_text())
    recipe["transformer"].update(num_layers=double, num_single_layers=single)
    for key in ("tokenizer", "tokenizer_2", "tokenizer_3", "configs"):
        if key in recipe:
            recipe[key] = str((source.parent / recipe[key]).resolve())
    folder = work / f"{preset}-{double}-{single}"
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps(recipe))
    out = work / f"out-{double}-{single}"
    command = [sys.executable, __file__, "--child", str(folder), str(out), dtype]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the export with {double} + {single} blocks failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"double": double, "single": single, **json.loads(result.stdout.strip().splitlines()[-1])}


def fit(runs: list[dict], key: str) -> tuple[float, float, float]:
    """(fixed, per double block, per single block) of `key`, least squares over the runs."""
    design = np.array([[1.0, r["double"], r["single"]] for r in runs])
    values = np.array([float(r[key]) for r in runs])
    solution, *_ = np.linalg.lstsq(design, values, rcond=None)
    return tuple(float(x) for x in solution)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flux-width-random")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--counts", nargs="+", default=["1,1", "2,1", "1,2"], help="DOUBLE,SINGLE block counts")
    parser.add_argument("--full", default="19,38", help="the full model's DOUBLE,SINGLE block counts")
    parser.add_argument("--json", type=Path, help="also write the runs and the fit here")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="measure-blocks-") as work:
        for count in args.counts:
            double, single = (int(x) for x in count.split(","))
            runs.append(measure(args.preset, args.dtype, double, single, Path(work)))
            print(json.dumps(runs[-1]), flush=True)
    full = [int(x) for x in args.full.split(",")]
    report = {"preset": args.preset, "dtype": args.dtype, "runs": runs, "fit": {}, "full_blocks": full}
    for key in ("seconds", "peak_rss_gib", "bytes"):
        fixed, per_double, per_single = fit(runs, key)
        total = fixed + per_double * full[0] + per_single * full[1]
        report["fit"][key] = {"fixed": fixed, "per_double": per_double, "per_single": per_single, "full": total}
    print(json.dumps(report["fit"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
