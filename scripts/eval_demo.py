"""Score the `shapes` demo on held-out captions with a simple, deterministic judge.

    mkdir -p out && sdexport convert shapes -o out/shapes
    python scripts/eval_demo.py out/shapes                                # ONNX export + torch-free runtime
    python scripts/eval_demo.py out/shapes --torch models/shapes --psnr 20   # and PSNR vs diffusers
    python scripts/eval_demo.py --ground-truth                            # the judge on rendered images

Prompts are `make_shapes_dataset.eval_prompts()`: the 28 held-out (colour, shape, background)
triples at every position ("a red star on a green background, top left"), then each triple without
a position phrase ("a red star on a green background", where any position is right); 168 in all.
Image i uses seed i, 25 steps, guidance 7.5 and the exported scheduler. The judge, per image:
background = the palette colour most of the border pixels are nearest to; foreground = the palette
colour nearest to the pixels furthest from the background; shape = the circle/square/triangle/star
template (every size 10-24 px at every centre) with the best IoU against the foreground mask;
position = the template centre's nearest caption position (none when no shape is found).

It prints and writes (to --out) colour, background, shape and position accuracy overall, per
prompt form and per held-out triple (results.json), every verdict (judged.json), the images
(runtime.png) and a contact sheet of 40 prompts with their verdicts (contact_sheet.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
        position = None
        if shape is not None:
            position = min(shapes.POSITIONS, key=lambda p: math.dist(shapes.POSITIONS[p], (cx, cy)))
        return {
            "background": background,
            "colour": foreground,
            "shape": shape,
            "iou": round(iou, 3),
            "position": position,
        }


ASPECTS = ("colour", "background", "shape", "position")


def verdicts(judged: dict, truth: dict) -> dict[str, bool]:
    """Right or wrong for each aspect; a prompt without a position (None) takes any position."""
    right = {k: judged[k] == truth[k] for k in ASPECTS}
    right["position"] = truth["position"] is None or judged["position"] == truth["position"]
    return right


def score(judged: list[dict], truth: list[dict]) -> dict:
    """Fraction right per aspect, of colour+background+shape ("all three") and of all four."""
    rights = [verdicts(j, t) for j, t in zip(judged, truth)]
    result = {k: float(np.mean([r[k] for r in rights])) for k in ASPECTS}
    result["all three"] = float(np.mean([all(r[k] for k in ASPECTS[:3]) for r in rights]))
    result["all four"] = float(np.mean([all(r.values()) for r in rights]))
    return result


def triple_name(item: dict) -> str:
    return f"{item['colour']} {item['shape']} on {item['background']}"


def score_by(judged: list[dict], truth: list[dict], key: Callable[[dict], str]) -> dict[str, dict]:
    """`score` of each group of images that `key(truth item)` names, with its count "n"."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(truth):
        groups.setdefault(key(t), []).append(i)
    return {
        name: {**score([judged[i] for i in idx], [truth[i] for i in idx]), "n": len(idx)}
        for name, idx in groups.items()
    }


def prompt_form(item: dict) -> str:
    return "without position" if item["position"] is None else "with position"


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


def same_seed_stats(drawn: list[list[str | None]]) -> dict:
    """The position test's two numbers, from the positions judged for each seed's run of the five
    position captions (in `shapes.POSITIONS` order): how often the shape lands where its caption asks,
    and how often two captions with the same seed put it in the same place. A model that takes the
    place from the caption scores 1 and 0; one that takes it from the starting noise scores about 0.2
    and well above 0.2 (1 if the noise alone decides)."""
    asked = list(shapes.POSITIONS)
    followed = [d == a for row in drawn for d, a in zip(row, asked)]
    same = [row[i] is not None and row[i] == row[j] for row in drawn for i in range(5) for j in range(i + 1, 5)]
    return {"followed": float(np.mean(followed)), "same place": float(np.mean(same)), "runs": len(drawn)}


def same_seed_test(folder: Path, judge: Judge, seeds: int, steps: int, guidance: float) -> dict:
    """The first 4 held-out triples x `seeds` seeds x the 5 position captions, each seed shared by
    the five captions of its triple."""
    from sdruntime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder)
    drawn = []
    for colour, shape, background in shapes.held_out_triples()[:4]:
        for seed in range(seeds):
            row = []
            for position in shapes.POSITIONS:
                prompt = shapes.caption(colour, shape, background, position)
                image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed).images[0]
                row.append(judge(np.asarray(image))["position"])
            drawn.append(row)
    return same_seed_stats(drawn)


def report(name: str, result: dict, n: int) -> None:
    print(f"{name} ({n} images): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items()), flush=True)


def report_table(title: str, rows: dict[str, dict]) -> None:
    """One line per group: its count and the four accuracies in percent."""
    width = max(len(title), *(len(name) for name in rows))
    print(f"{title:<{width}}    n  colour  background  shape  position  all four")
    for name, r in rows.items():
        print(
            f"{name:<{width}} {r['n']:>4} {100 * r['colour']:>6.1f}% {100 * r['background']:>10.1f}% "
            f"{100 * r['shape']:>5.1f}% {100 * r['position']:>8.1f}% {100 * r['all four']:>8.1f}%",
            flush=True,
        )


# The contact sheet: each held-out triple k (0-27) at position k mod 5, then 12 triples spread over
# the 28 (k = 7i // 3) without a position: 40 prompts, every triple and both prompt forms.
SHEET_COLUMNS, SHEET_SCALE, SHEET_PAD, SHEET_LINE, SHEET_HEADER = 8, 4, 8, 12, 20
SHEET_CELL = (
    shapes.SIZE * SHEET_SCALE + 2 * SHEET_PAD + 16,
    shapes.SIZE * SHEET_SCALE + 2 * SHEET_PAD + 6 * SHEET_LINE,
)
RIGHT_INK, WRONG_INK = (0, 120, 0), (200, 0, 0)


def contact_sheet_indices() -> list[int]:
    """Indices into `eval_prompts()` of the 40 prompts on the contact sheet."""
    triples = len(shapes.held_out_triples())
    positions = len(shapes.POSITIONS)
    placed = [k * positions + k % positions for k in range(triples)]
    unplaced = [triples * positions + 7 * i // 3 for i in range(12)]
    return placed + unplaced


def contact_sheet_size(cells: int) -> tuple[int, int]:
    rows = math.ceil(cells / SHEET_COLUMNS)
    return SHEET_COLUMNS * SHEET_CELL[0], SHEET_HEADER + rows * SHEET_CELL[1]


def save_contact_sheet(
    images: list[np.ndarray], judged: list[dict], truth: list[dict], seeds: list[int], path: Path, title: str
) -> None:
    """A white sheet of upscaled images, each under its seed and short prompt, with one line per
    aspect: "+" and green when the judge found it right, "x" and red when wrong, and what it saw."""
    sheet = Image.new("RGB", contact_sheet_size(len(images)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((SHEET_PAD, 4), f"{title}   + right, x wrong (what the judge saw)", fill="black", font=font)
    side = shapes.SIZE * SHEET_SCALE
    labels = {"colour": "colour", "background": "bg", "shape": "shape", "position": "pos"}
    for i, (image, j, t, seed) in enumerate(zip(images, judged, truth, seeds)):
        row, column = divmod(i, SHEET_COLUMNS)
        x, y = column * SHEET_CELL[0] + SHEET_PAD, SHEET_HEADER + row * SHEET_CELL[1]
        big = Image.fromarray(np.asarray(image)[..., :3]).resize((side, side), Image.NEAREST)
        sheet.paste(big, (x, y))
        where = t["position"] or "any position"
        lines = [(f"#{seed} {t['colour']} {t['shape']}", "black"), (f"on {t['background']}, {where}", "black")]
        for k, right in verdicts(j, t).items():
            lines.append((f"{'+' if right else 'x'} {labels[k]} {j[k] or 'none'}", RIGHT_INK if right else WRONG_INK))
        for n, (text, ink) in enumerate(lines):
            draw.text((x, y + side + 2 + n * SHEET_LINE), text, fill=ink, font=font)
    sheet.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, nargs="?", help="an `sdexport convert` output folder")
    parser.add_argument("-n", type=int, help="only the first n held-out prompts (seeds 0..n-1); default all 168")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--torch", type=Path, help="the diffusers folder, to compare with PyTorch")
    parser.add_argument("--psnr", type=int, default=10, help="images to generate with PyTorch for PSNR")
    parser.add_argument("--ground-truth", action="store_true", help="score the judge on rendered images")
    parser.add_argument("--out", type=Path, default=Path("out/shapes-eval"), help="grids and results.json")
    parser.add_argument(
        "--same-seed",
        type=int,
        default=0,
        metavar="N",
        help="also the position test: 4 held-out triples x N seeds x the 5 position captions per seed",
    )
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
        results["runtime_by_form"] = score_by(judged, items, prompt_form)
        results["runtime_by_triple"] = score_by(judged, items, triple_name)
        results["runtime_seconds"] = round(seconds, 1)
        results["settings"] = {"prompts": len(items), "steps": args.steps, "guidance": args.guidance, "seeds": "i"}
        report(f"runtime, {args.steps} steps, guidance {args.guidance}", results["runtime"], len(images))
        report_table("prompt form", results["runtime_by_form"])
        report_table("held-out triple", results["runtime_by_triple"])
        save_grid(images, args.out / "runtime.png")
        (args.out / "judged.json").write_text(
            json.dumps(
                [
                    {"prompt": p, "seed": i, **j, "right": verdicts(j, t)}
                    for i, (p, j, t) in enumerate(zip(prompts, judged, items))
                ],
                indent=1,
            )
        )
        shown = [i for i in contact_sheet_indices() if i < len(items)]
        save_contact_sheet(
            [images[i] for i in shown],
            [judged[i] for i in shown],
            [items[i] for i in shown],
            shown,
            args.out / "contact_sheet.png",
            f"shapes, held-out prompts: {args.steps} steps, guidance {args.guidance}, seed = prompt number",
        )
        print(f"contact sheet of {len(shown)} prompts -> {args.out / 'contact_sheet.png'}", flush=True)
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
        if args.same_seed:
            results["same_seed"] = same_seed_test(args.export, judge, args.same_seed, args.steps, args.guidance)
            print(
                f"same seed, five position captions ({results['same_seed']['runs']} runs): shape where asked "
                f"{results['same_seed']['followed']:.1%}, two captions in the same place "
                f"{results['same_seed']['same place']:.1%}",
                flush=True,
            )
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
