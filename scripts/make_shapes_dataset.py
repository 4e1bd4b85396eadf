"""A procedural, captioned image set of coloured shapes on plain backgrounds, for the `shapes` demo.

    python scripts/make_shapes_dataset.py -o out/shapes-data          # images.npz + captions.json

Each 32x32 image holds one shape (circle, square, triangle, star) of one palette colour on a
background of another palette colour, at one of five positions, with a jittered size (40-60% of
the side) and offset, captioned "a red circle on a blue background, top left". Every training
caption names its position. Some colour/shape/background triples are held out of training for
evaluation (`held_out_triples`); every colour, shape, background and colour pair still appears in
training with other partners. The evaluation prompts (`eval_prompts`) also ask for each held-out
triple without a position ("a red circle on a blue background"), a form the training captions
never use, where any position is right.
Rendering is supersampled 4x and box-filtered, so edges are antialiased and the result is
deterministic. `eval_demo.py` imports this module for the palette and the shape renderer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 220, 50),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle", "star"]
# caption words -> shape centre in pixels (x, y); corners sit 5 px off the middle
POSITIONS = {
    "center": (16, 16),
    "top left": (11, 11),
    "top right": (21, 11),
    "bottom left": (11, 21),
    "bottom right": (21, 21),
}
SIZE_RANGE = (14, 19)  # shape size in pixels, inclusive: 44-59% of the image side
JITTER = 1  # +-pixels of random offset around the position's centre
HOLDOUT_SEED = 1234


def caption(colour: str, shape: str, background: str, position: str | None) -> str:
    """The caption; position None leaves the position phrase out (evaluation prompts only)."""
    text = f"a {colour} {shape} on a {background} background"
    return text if position is None else f"{text}, {position}"


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """The outline of a shape of `size` pixels centred at (cx, cy); None for the circle (an ellipse)."""
    h = size / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        # a fat five-pointed star (inner radius 0.5) reads as a star even at 32 px
        outer, inner = size * 0.56, size * 0.28
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.1 * size + radius * math.sin(angle)))
        return points
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")


def shape_coverage(shape: str, cx: float, cy: float, size: float, canvas: int = SIZE) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 [canvas, canvas], supersampled 4x."""
    s = SUPERSAMPLE
    mask = Image.new("L", (canvas * s, canvas * s), 0)
    draw = ImageDraw.Draw(mask)
    polygon = shape_polygon(shape, cx, cy, size)
    if polygon is None:
        h = size / 2
        draw.ellipse([(cx - h) * s, (cy - h) * s, (cx + h) * s - 1, (cy + h) * s - 1], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in polygon], fill=255)
    small = mask.resize((canvas, canvas), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(colour: str, shape: str, background: str, cx: float, cy: float, size: float) -> np.ndarray:
    """An RGB uint8 image [32, 32, 3]."""
    cover = shape_coverage(shape, cx, cy, size)[..., None]
    fg = np.array(PALETTE[colour], dtype=np.float32)
    bg = np.array(PALETTE[background], dtype=np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def all_triples() -> list[tuple[str, str, str]]:
    """(colour, shape, background) for every colour on every other background: 8 * 7 * 4 = 224."""
    return [(c, s, b) for c, b in itertools.permutations(COLOURS, 2) for s in SHAPES]


def held_out_triples() -> list[tuple[str, str, str]]:
    """28 (colour, shape, background) triples kept out of training: half of the 56 colour pairs,
    each with one of its four shapes (7 per shape), so each pair keeps three shapes in training."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    pairs = list(itertools.permutations(COLOURS, 2))
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[: len(pairs) // 2]]
    return sorted((c, SHAPES[i % len(SHAPES)], b) for i, (c, b) in enumerate(chosen))


def eval_prompts() -> list[dict]:
    """168 held-out prompts with their ground truth: every held-out triple at every position
    (28 * 5 = 140), then every held-out triple without a position phrase (28, position None: any
    position is right). The placed prompts come first, so prompt i keeps seed i whatever follows."""
    triples = held_out_triples()
    placed = [(c, s, b, p) for c, s, b in triples for p in POSITIONS]
    unplaced = [(c, s, b, None) for c, s, b in triples]
    return [
        {"colour": c, "shape": s, "background": b, "position": p, "prompt": caption(c, s, b, p)}
        for c, s, b, p in placed + unplaced
    ]


def make_split(triples, variants: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """`variants` jittered renders of each triple at each position."""
    rng = np.random.default_rng(seed)
    images, records = [], []
    for (colour, shape, background), position in itertools.product(triples, POSITIONS):
        px, py = POSITIONS[position]
        for _ in range(variants):
            size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
            cx, cy = px + int(rng.integers(-JITTER, JITTER + 1)), py + int(rng.integers(-JITTER, JITTER + 1))
            images.append(render(colour, shape, background, cx, cy, size))
            records.append(
                {
                    "colour": colour,
                    "shape": shape,
                    "background": background,
                    "position": position,
                    "cx": cx,
                    "cy": cy,
                    "size": size,
                    "caption": caption(colour, shape, background, position),
                }
            )
    return np.stack(images), records


def build(out: Path, variants: int = 16, eval_variants: int = 1, seed: int = 0) -> dict:
    """Write train.npz / eval.npz (uint8 images) and records.json (captions and ground truth)."""
    held = set(held_out_triples())
    train_triples = [t for t in all_triples() if t not in held]
    train_images, train_records = make_split(train_triples, variants, seed)
    eval_images, eval_records = make_split(sorted(held), eval_variants, seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "train.npz", images=train_images)
    np.savez_compressed(out / "eval.npz", images=eval_images)
    summary = {
        "size": SIZE,
        "palette": PALETTE,
        "shapes": SHAPES,
        "positions": list(POSITIONS),
        "size_range": SIZE_RANGE,
        "variants": variants,
        "seed": seed,
        "held_out_triples": sorted(held),
        "train": train_records,
        "eval": eval_records,
    }
    (out / "records.json").write_text(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("out/shapes-data"))
    parser.add_argument("--variants", type=int, default=16, help="jittered renders per caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, help="also write a grid of the first training images here")
    args = parser.parse_args()
    summary = build(args.out, args.variants, seed=args.seed)
    print(
        f"{len(summary['train'])} training images ({len(summary['train']) // args.variants} captions), "
        f"{len(summary['eval'])} held-out images, {len(summary['held_out_triples'])} held-out triples -> {args.out}"
    )
    if args.preview:
        images = np.load(args.out / "train.npz")["images"]
        pick = images[:: max(1, len(images) // 64)][:64]
        grid = pick.reshape(8, 8, SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(8 * SIZE, 8 * SIZE, 3)
        Image.fromarray(grid).resize((16 * SIZE, 16 * SIZE), Image.NEAREST).save(args.preview)


if __name__ == "__main__":
    main()
