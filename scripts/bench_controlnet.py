"""What a ControlNet costs per step on one export, against a plain run of the same export and settings.

    python scripts/bench_controlnet.py EXPORT [--size 256] [--steps 5] [--rounds 3] [--provider cpu]
    python scripts/bench_controlnet.py EXPORT --baseline OLD_EXPORT   # also a U-Net without residual inputs

EXPORT holds at least one ControlNet (`sdexport convert ... --controlnet` or `sdexport add-controlnet`). Arms,
each in one process, interleaved round by round: `plain` (no ControlNet: the U-Net's residual inputs keep their
zero defaults), `controlnet` (one ControlNet, scale 1), `controlnet-x2` (two, stacked, when the export has two),
and with --baseline, `baseline`: the same settings on another export whose U-Net has no residual inputs (an
export made before ControlNets), to measure what the inputs cost a run that uses none. Seconds per step are the
denoising loop's (timings["denoise"] / steps), medians over rounds; the first call of each arm warms up and is
not counted. The ratios are against `plain`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a red circle on a blue background, top left"


def control_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))


def arms(pipe, baseline, names: list[str], size: int, steps: int) -> dict:
    """Each arm: a function that draws one image and returns (seconds per step, U-Net seconds per step)."""
    common = dict(num_inference_steps=steps, height=size, width=size, seed=0, guidance_scale=7.5)
    image = control_image(size)

    def run(target, **extra):
        def draw():
            timings = target(PROMPT, **common, **extra).timings
            return timings["denoise"] / timings["steps"], timings["unet"] / timings["steps"]

        return draw

    found = {"plain": run(pipe), "controlnet": run(pipe, control_image=image, controlnet=names[0])}
    if len(names) > 1:
        found["controlnet-x2"] = run(pipe, control_image=[image, image], controlnet=names[:2])
    if baseline is not None:
        found["baseline"] = run(baseline)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--baseline", help="an export of the same model whose U-Net takes no residuals")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    from sdruntime import StableDiffusionPipeline
    from sdruntime.control import exported_controlnets

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.load(args.export, provider=args.provider)
    names = list(exported_controlnets(pipe.manifest))
    if not names:
        raise SystemExit(f"{args.export} has no ControlNet: add one with `sdexport add-controlnet`")
    baseline = StableDiffusionPipeline.load(args.baseline, provider=args.provider) if args.baseline else None
    table = arms(pipe, baseline, names, args.size, args.steps)
    for draw in table.values():  # warm-up: sessions' first runs allocate
        draw()
    seconds = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, draw in table.items():
            seconds[name].append(draw())
    plain = statistics.median(s for s, _ in seconds["plain"])
    results = {}
    print(f"{args.export}: {args.size}x{args.size}, {args.steps} steps, guidance 7.5, {args.rounds} rounds")
    print(f"{'arm':<15}{'s/step':>9}{'U-Net s/step':>14}{'vs plain':>10}")
    for name, runs in seconds.items():
        step = statistics.median(s for s, _ in runs)
        unet = statistics.median(u for _, u in runs)
        results[name] = {"seconds_per_step": step, "unet_seconds_per_step": unet, "ratio": step / plain}
        print(f"{name:<15}{step:>9.3f}{unet:>14.3f}{step / plain:>10.2f}")
    print(f"(whole run {time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
