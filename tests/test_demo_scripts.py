"""The shapes demo's dataset generator and judge (scripts/make_shapes_dataset.py, scripts/eval_demo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_demo  # noqa: E402
import make_shapes_dataset as shapes  # noqa: E402


@pytest.fixture(scope="module")
def judge():
    return eval_demo.Judge()


def test_held_out_triples_leave_every_part_in_training():
    held = set(shapes.held_out_triples())
    train = [t for t in shapes.all_triples() if t not in held]
    assert len(shapes.all_triples()) == 224 and len(held) == 28
    assert held <= set(shapes.all_triples())
    assert {c for c, _, _ in train} == set(shapes.COLOURS)
    assert {b for _, _, b in train} == set(shapes.COLOURS)
    assert {s for _, s, _ in train} == set(shapes.SHAPES)
    # every colour pair keeps at least three of its four shapes in training
    for c, _, b in held:
        assert sum((c, s, b) in held for s in shapes.SHAPES) == 1
    assert shapes.held_out_triples() == shapes.held_out_triples()  # deterministic


def test_eval_prompts_are_held_out_captions():
    items = shapes.eval_prompts()
    assert len(items) == 140 and len({i["prompt"] for i in items}) == 140
    assert items[0]["prompt"] == shapes.caption(
        items[0]["colour"], items[0]["shape"], items[0]["background"], items[0]["position"]
    )
    assert shapes.caption("red", "circle", "blue", "top left") == "a red circle on a blue background, top left"


def test_render_puts_the_shape_colour_on_the_background():
    image = shapes.render("red", "square", "blue", 16, 16, 16)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert tuple(image[16, 16]) == shapes.PALETTE["red"]
    assert tuple(image[0, 0]) == shapes.PALETTE["blue"]
    assert np.array_equal(image, shapes.render("red", "square", "blue", 16, 16, 16))


def test_build_writes_the_dataset(tmp_path):
    summary = shapes.build(tmp_path, variants=1)
    train = np.load(tmp_path / "train.npz")["images"]
    held = np.load(tmp_path / "eval.npz")["images"]
    records = json.loads((tmp_path / "records.json").read_text())
    assert train.shape == (196 * 5, 32, 32, 3) and held.shape == (28 * 5, 32, 32, 3)
    assert len(records["train"]) == len(train) and records["eval"] == summary["eval"]
    held_captions = {i["prompt"] for i in shapes.eval_prompts()}
    assert not held_captions & {r["caption"] for r in records["train"]}


def test_judge_scores_the_ground_truth_perfectly(judge):
    images, truth = shapes.make_split(shapes.held_out_triples(), variants=2, seed=3)
    result = eval_demo.score([judge(im) for im in images], truth)
    assert result == {"colour": 1.0, "background": 1.0, "shape": 1.0, "position": 1.0, "all three": 1.0}


def test_judge_tolerates_noise(judge):
    images, truth = shapes.make_split(shapes.all_triples()[::4], variants=1, seed=5)
    rng = np.random.default_rng(0)
    noisy = [np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8) for im in images]
    result = eval_demo.score([judge(im) for im in noisy], truth)
    assert result["colour"] >= 0.98 and result["background"] == 1.0 and result["shape"] >= 0.95


def test_judge_says_none_for_a_blank_picture(judge):
    blank = np.full((32, 32, 3), shapes.PALETTE["green"], np.uint8)
    verdict = judge(blank)
    assert verdict["background"] == "green" and verdict["colour"] is None and verdict["shape"] is None


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert eval_demo.psnr(a, a) == float("inf")
    assert eval_demo.psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)
