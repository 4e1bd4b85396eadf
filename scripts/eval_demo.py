"""Score the `shapes` demo on held-out captions with a simple, deterministic judge.

    mkdir -p out && sdexport convert shapes -o out/shapes
    python scripts/eval_demo.py out/shapes -n 140                         # ONNX export + torch-free runtime
    python scripts/eval_demo.py out/shapes -n 140 --torch models/shapes --psnr 20   # and PSNR vs diffusers
    python scripts/eval_demo.py --ground-truth                            # the judge on rendered images

Prompts are the held-out (colour, shape, background) triples of `make_shapes_dataset.py` at every
position ("a red star on a green background, top left"); image i uses seed i, 25 steps, guidance
7.5 and the exported scheduler. The judge, per image: background = the palette colour most of the
border pixels are nearest to; foreground = the palette colour nearest to the pixels furthest from
the background; shape = the circle/square/triangle/star template (every size 10-24 px at every
centre) with the best IoU against the foreground mask; position = the template centre's nearest
caption position.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_shapes_dataset as shapes  # noqa: E402

PALETTE_RGB = np.array([shapes.PALETTE[c] for c in shapes.COLOURS], dtype=np.float32)
TEMPLATE_SIZES = range(10, 25)
TEMPLATE_CENTRES = range(5, 28)


class Judge:
    """Deterministic colour and shape classifier for 32x32 shape pictures."""

    def __init__(self, size: int = shapes.SIZE):
        self.size = size
        masks, self.params = [], []
        # render each shape and size once, centred on a canvas twice as large, and crop it at every centre
        big = 2 * size
        for shape in shapes.SHAPES:
            for s in TEMPLATE_SIZES:
                cover = shapes.shape_coverage(shape, size, size, s, canvas=big) > 0.5
                for cy in TEMPLATE_CENTRES:
                    for cx in TEMPLATE_CENTRES:
                        masks.append(cover[size - cy : big - cy, size - cx : big - cx])
                        self.params.append((shape, s, cx, cy))
        self.bank = np.stack(masks).reshape(len(masks), -1).astype(np.float32)
        self.bank_area = self.bank.sum(axis=1)

    def colours(self, image: np.ndarray) -> tuple[str, str | None, np.ndarray]:
        """(background, foreground or None, foreground mask) for an RGB uint8 image."""
        pixels = image.astype(np.float32)
        labels = np.linalg.norm(pixels[..., None, :] - PALETTE_RGB, axis=-1).argmin(axis=-1)
        border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
        border_rgb = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
        bg_label = int(np.bincount(border, minlength=len(PALETTE_RGB)).argmax())
        bg_rgb = np.median(border_rgb[border == bg_label], axis=0)
        distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
        candidates = distance > 60
        background = shapes.COLOURS[bg_label]
        if candidates.sum() < 4:
            return background, None, np.zeros(labels.shape, bool)
        # antialiased edges blend towards the background: the purest foreground pixels are the furthest
        far = np.sort(distance[candidates])[-max(4, int(candidates.sum()) // 4) :][0]
        fg_rgb = np.median(pixels[distance >= far], axis=0)
        fg_label = int(np.linalg.norm(PALETTE_RGB - fg_rgb, axis=-1).argmin())
        mask = np.linalg.norm(pixels - fg_rgb, axis=-1) < distance
        if fg_label == bg_label:
            return background, None, mask
        return background, shapes.COLOURS[fg_label], mask

    def shape(self, mask: np.ndarray) -> tuple[str | None, float, tuple[int, int]]:
        """(shape, best IoU, template centre) of a foreground mask."""
        if mask.sum() < 4:
            return None, 0.0, (self.size // 2, self.size // 2)
        flat = mask.reshape(-1).astype(np.float32)
        inter = self.bank @ flat
        iou = inter / (self.bank_area + flat.sum() - inter)
        best = int(iou.argmax())
        shape, _, cx, cy = self.params[best]
        return shape, float(iou[best]), (cx, cy)

    def __call__(self, image: np.ndarray) -> dict:
        background, foreground, mask = self.colours(np.asarray(image)[..., :3])
        shape, iou, (cx, cy) = self.shape(mask)
        position = min(shapes.POSITIONS, key=lambda p: math.dist(shapes.POSITIONS[p], (cx, cy)))
        return {
            "background": background,
            "colour": foreground,
            "shape": shape,
            "iou": round(iou, 3),
            "position": position,
        }


def score(judged: list[dict], truth: list[dict]) -> dict:
    keys = ("colour", "background", "shape", "position")
    result = {k: float(np.mean([j[k] == t[k] for j, t in zip(judged, truth)])) for k in keys}
    result["all three"] = float(np.mean([all(j[k] == t[k] for k in keys[:3]) for j, t in zip(judged, truth)]))
    return result


def ground_truth_items(variants: int = 2, seed: int = 0) -> tuple[list[np.ndarray], list[dict]]:
    """Rendered held-out and training captions with jitter, as the dataset makes them."""
    images, records = shapes.make_split(shapes.all_triples(), variants, seed)
    return list(images), records


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def save_grid(images: list[np.ndarray], path: Path, columns: int = 10, scale: int = 3) -> None:
    rows = math.ceil(len(images) / columns)
    grid = np.zeros((rows * 32, columns * 32, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = np.asarray(image)[..., :3]
    Image.fromarray(grid).resize((columns * 32 * scale, rows * 32 * scale), Image.NEAREST).save(path)


def generate_runtime(folder: Path, prompts: list[str], steps: int, guidance: float) -> list[np.ndarray]:
    from sdruntime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder)
    return [
        np.asarray(pipe(p, num_inference_steps=steps, guidance_scale=guidance, seed=i).images[0])
        for i, p in enumerate(prompts)
    ]


def generate_torch(folder: Path, prompts: list[str], steps: int, guidance: float) -> list[np.ndarray]:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(i)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator)
        images.append(np.asarray(out.images[0]))
    return images


def report(name: str, result: dict, n: int) -> None:
    print(f"{name} ({n} images): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, nargs="?", help="an `sdexport convert` output folder")
    parser.add_argument("-n", type=int, default=140, help="held-out prompts (seeds 0..n-1), at most 140")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--torch", type=Path, help="the diffusers folder, to compare with PyTorch")
    parser.add_argument("--psnr", type=int, default=10, help="images to generate with PyTorch for PSNR")
    parser.add_argument("--ground-truth", action="store_true", help="score the judge on rendered images")
    parser.add_argument("--out", type=Path, default=Path("out/shapes-eval"), help="grids and results.json")
    args = parser.parse_args()
    if not args.export and not args.ground_truth:
        parser.error("give an exported folder, or --ground-truth")

    judge = Judge()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.ground_truth:
        images, truth = ground_truth_items()
        results["ground truth"] = score([judge(im) for im in images], truth)
        report("judge on rendered images", results["ground truth"], len(images))
    if args.export:
        items = shapes.eval_prompts()[: args.n]
        prompts = [item["prompt"] for item in items]
        t0 = time.time()
        images = generate_runtime(args.export, prompts, args.steps, args.guidance)
        seconds = time.time() - t0
        judged = [judge(im) for im in images]
        results["runtime"] = score(judged, items)
        results["runtime_seconds"] = round(seconds, 1)
        report(f"runtime, {args.steps} steps, guidance {args.guidance}", results["runtime"], len(images))
        save_grid(images, args.out / "runtime.png")
        (args.out / "judged.json").write_text(
            json.dumps([{"prompt": p, "seed": i, **j} for i, (p, j) in enumerate(zip(prompts, judged))], indent=1)
        )
        if args.torch:
            k = min(args.psnr, len(prompts))
            reference = generate_torch(args.torch, prompts[:k], args.steps, args.guidance)
            values = [psnr(a, b) for a, b in zip(reference, images[:k])]
            results["psnr_db"] = {"min": min(values), "mean": float(np.mean(np.minimum(values, 100))), "n": k}
            print(
                f"PSNR runtime vs diffusers over {k} images: min {min(values):.1f} dB, "
                f"mean {results['psnr_db']['mean']:.1f} dB (inf counted as 100)",
                flush=True,
            )
            save_grid(reference, args.out / "diffusers.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
