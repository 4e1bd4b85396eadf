"""The shapes demo's dataset generator and judge (scripts/make_shapes_dataset.py, scripts/eval_demo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def test_eval_prompts_are_held_out_captions_with_and_without_a_position():
    items = shapes.eval_prompts()
    assert len(items) == 168 and len({i["prompt"] for i in items}) == 168
    placed, unplaced = items[:140], items[140:]
    assert all(i["position"] in shapes.POSITIONS for i in placed)
    assert all(i["position"] is None and "," not in i["prompt"] for i in unplaced)
    held = shapes.held_out_triples()
    assert [(i["colour"], i["shape"], i["background"]) for i in unplaced] == held
    assert {(i["colour"], i["shape"], i["background"]) for i in placed} == set(held)
    for i in items:
        assert i["prompt"] == shapes.caption(i["colour"], i["shape"], i["background"], i["position"])
    assert shapes.caption("red", "circle", "blue", "top left") == "a red circle on a blue background, top left"
    assert shapes.caption("red", "star", "green", None) == "a red star on a green background"


def test_training_captions_always_name_a_position():
    _, records = shapes.make_split(shapes.all_triples()[:3], variants=1, seed=0)
    assert all(r["caption"].endswith(", " + r["position"]) for r in records)


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
    assert result == {
        "colour": 1.0,
        "background": 1.0,
        "shape": 1.0,
        "position": 1.0,
        "all three": 1.0,
        "all four": 1.0,
    }


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
    assert verdict["position"] is None


def rendered(item: dict, shape: str | None = None, position: str = "center") -> np.ndarray:
    """The ground-truth picture of an eval item, optionally with another shape or position."""
    cx, cy = shapes.POSITIONS[item["position"] or position]
    return shapes.render(item["colour"], shape or item["shape"], item["background"], cx, cy, 16)


def test_judge_scores_rendered_eval_prompts_and_any_position_without_one(judge):
    items = shapes.eval_prompts()
    unplaced = [i for i in items if i["position"] is None]
    # without a position phrase, a shape anywhere is right
    for position in shapes.POSITIONS:
        judged = [judge(rendered(i, position=position)) for i in unplaced]
        assert eval_demo.score(judged, unplaced)["all four"] == 1.0
    # with one, the same picture in the wrong place is wrong on position only
    placed = [i for i in items if i["position"] == "top left"]
    judged = [judge(rendered({**i, "position": "bottom right"})) for i in placed]
    result = eval_demo.score(judged, placed)
    assert result["position"] == 0.0 and result["all three"] == 1.0 and result["all four"] == 0.0


def test_no_shape_is_never_in_the_right_place(judge):
    item = {"colour": "red", "shape": "star", "background": "green", "position": "center"}
    blank = np.full((32, 32, 3), shapes.PALETTE["green"], np.uint8)
    right = eval_demo.verdicts(judge(blank), item)
    assert right == {"colour": False, "background": True, "shape": False, "position": False}
    assert eval_demo.verdicts(judge(blank), {**item, "position": None})["position"]


def fake_verdict(item: dict, **wrong) -> dict:
    return {
        "colour": item["colour"],
        "background": item["background"],
        "shape": item["shape"],
        "position": item["position"] or "center",
        **wrong,
    }


def test_scores_per_triple_and_per_prompt_form():
    items = shapes.eval_prompts()
    first = eval_demo.triple_name(items[0])
    # the first triple gets the wrong shape at every position; everything else is right
    judged = [
        fake_verdict(i, shape="circle" if i["shape"] != "circle" else "star")
        if eval_demo.triple_name(i) == first
        else fake_verdict(i)
        for i in items
    ]
    by_triple = eval_demo.score_by(judged, items, eval_demo.triple_name)
    assert len(by_triple) == 28 and all(r["n"] == 6 for r in by_triple.values())
    assert by_triple[first]["shape"] == 0.0 and by_triple[first]["colour"] == 1.0
    assert by_triple[first]["position"] == 1.0 and by_triple[first]["all four"] == 0.0
    assert all(r["all four"] == 1.0 for name, r in by_triple.items() if name != first)
    assert eval_demo.score(judged, items)["shape"] == pytest.approx(27 / 28)
    by_form = eval_demo.score_by(judged, items, eval_demo.prompt_form)
    assert by_form["with position"]["n"] == 140 and by_form["without position"]["n"] == 28
    assert by_form["without position"]["shape"] == pytest.approx(27 / 28)


def test_contact_sheet_covers_every_triple_and_both_forms(tmp_path):
    items = shapes.eval_prompts()
    chosen = [items[i] for i in eval_demo.contact_sheet_indices()]
    assert len(chosen) == 40 and len(set(eval_demo.contact_sheet_indices())) == 40
    assert {eval_demo.triple_name(i) for i in chosen} == {eval_demo.triple_name(i) for i in items}
    assert {eval_demo.prompt_form(i) for i in chosen} == {"with position", "without position"}
    assert {i["position"] for i in chosen} == {*shapes.POSITIONS, None}
    images = [rendered(i, position="top right") for i in chosen]
    judged = [fake_verdict(i) for i in chosen]
    judged[0] = fake_verdict(chosen[0], colour="purple")
    path = tmp_path / "sheet.png"
    eval_demo.save_contact_sheet(images, judged, chosen, eval_demo.contact_sheet_indices(), path, "test")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == eval_demo.contact_sheet_size(40) == (8 * 160, 20 + 5 * 216)
    # each picture is scaled up 4x, pixel for pixel
    x, y = eval_demo.SHEET_PAD, eval_demo.SHEET_HEADER
    assert np.array_equal(sheet[y : y + 128 : 4, x : x + 128 : 4], images[0])
    # one wrong verdict: red ink appears in the first cell only, green ink in every cell
    cell_w, cell_h = eval_demo.SHEET_CELL

    def has(ink, column, row):
        """Whether the text under a cell's picture has pixels of this ink (antialiased: mostly it)."""
        cell = sheet[y + row * cell_h + 128 : y + (row + 1) * cell_h, column * cell_w : (column + 1) * cell_w]
        ink = np.array(ink, np.float32)
        white = np.array([255, 255, 255], np.float32)
        t = ((cell - white) @ (ink - white)) / ((ink - white) @ (ink - white))
        near_line = np.linalg.norm(cell - (white + t[..., None] * (ink - white)), axis=-1) < 12
        return bool((near_line & (t > 0.5)).any())

    assert has(eval_demo.WRONG_INK, 0, 0) and not has(eval_demo.WRONG_INK, 1, 0)
    assert all(has(eval_demo.RIGHT_INK, c, r) for c in range(8) for r in range(5))
    assert not has(eval_demo.WRONG_INK, 7, 4)


def test_same_seed_stats_tell_caption_from_noise():
    asked = list(shapes.POSITIONS)
    follows = eval_demo.same_seed_stats([asked, asked])
    assert follows == {"followed": 1.0, "same place": 0.0, "runs": 2}
    noise = eval_demo.same_seed_stats([["center"] * 5, ["top left"] * 4 + [None]])
    assert noise["followed"] == pytest.approx(2 / 10)  # "center" and "top left" land where asked once each
    assert noise["same place"] == pytest.approx((10 + 6) / 20)  # a missing shape is never in the same place


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert eval_demo.psnr(a, a) == float("inf")
    assert eval_demo.psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)


# scripts/train_demo.py: the recipe's options


@pytest.fixture(scope="module")
def train_demo():
    import train_demo

    return train_demo


def test_captions_without_position_and_empty_ones(train_demo):
    import torch

    captions = [shapes.caption("red", "circle", "blue", p) for p in shapes.POSITIONS]
    idx = torch.arange(5).repeat(20)
    tokenizer = train_demo.make_tokenizer()

    def texts(table):
        ids, keep = table.pick(idx, torch.Generator().manual_seed(0))
        return [tokenizer.decode(row, skip_special_tokens=True).replace(" ,", ",") for row in ids], keep

    placed, keep = texts(train_demo.Captions(captions, uncond_prob=0.0))
    assert placed == [captions[i] for i in idx] and keep.all()
    unplaced, _ = texts(train_demo.Captions(captions, uncond_prob=0.0, unplaced_prob=1.0))
    assert set(unplaced) == {"a red circle on a blue background"}
    empty, keep = texts(train_demo.Captions(captions, uncond_prob=1.0, unplaced_prob=0.5))
    assert set(empty) == {""} and not keep.any()
    mixed, _ = texts(train_demo.Captions(captions, uncond_prob=0.0, unplaced_prob=0.3))
    share = sum("," not in t for t in mixed) / len(mixed)
    assert 0.15 < share < 0.45


def test_offset_noise_moves_each_channels_mean(train_demo):
    import torch

    plain = train_demo.sample_noise((64, 4, 8, 8), torch.Generator().manual_seed(1), 0.0)
    assert torch.equal(plain, torch.randn((64, 4, 8, 8), generator=torch.Generator().manual_seed(1)))
    offset = train_demo.sample_noise((64, 4, 8, 8), torch.Generator().manual_seed(1), 0.5)
    # the spatial mean of plain noise has std 1/8; offset noise adds 0.5 to that in quadrature
    assert plain.mean(dim=(2, 3)).std() == pytest.approx(0.125, rel=0.2)
    assert offset.mean(dim=(2, 3)).std() == pytest.approx((0.5**2 + 0.125**2) ** 0.5, rel=0.2)


def test_schedule_matches_the_saved_scheduler(train_demo):
    from diffusers import PNDMScheduler

    for beta_end in (0.012, 0.02):
        scheduler = PNDMScheduler(**train_demo.scheduler_config(beta_end))
        assert train_demo.alphas_cumprod(beta_end).numpy() == pytest.approx(scheduler.alphas_cumprod.numpy())
    # a later beta_end leaves less signal at the first sampling step (t = 961 of 25 steps)
    assert train_demo.alphas_cumprod(0.02)[961] ** 0.5 < 0.3 * train_demo.alphas_cumprod(0.012)[961] ** 0.5


def test_guided_target_is_guidance_at_the_effective_scale(train_demo):
    import torch

    uncond, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(train_demo.guided_target(uncond, noise), noise)
    # a caption branch on the target of effective scale 2 makes guidance 7.5 act as guidance 2
    cond = uncond + 2 / 7.5 * (noise - uncond)
    guided = uncond + 7.5 * (cond - uncond)
    assert torch.allclose(guided, train_demo.guided_target(uncond, noise, 2.0), atol=1e-5)


def test_guided_teacher_is_a_frozen_copy(train_demo):
    import torch

    text_encoder, unet = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    teacher = train_demo.frozen_copy(text_encoder, unet)
    for model, copy in zip((text_encoder, unet), teacher):
        assert not copy.training and not any(p.requires_grad for p in copy.parameters())
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(model.weight, copy.weight)
    # training the student leaves the teacher as it was
    with torch.no_grad():
        unet.weight.add_(1.0)
    assert not torch.equal(unet.weight, teacher[1].weight)


def test_unet_attention_in_the_lowest_levels(train_demo):
    top = train_demo.unet_config((64, 128), 1, 128, attn_levels=2)
    assert top["down_block_types"] == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert top["up_block_types"] == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    bottom = train_demo.unet_config((64, 128), 1, 128, attn_levels=1)
    assert bottom["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert bottom["up_block_types"] == ("CrossAttnUpBlock2D", "UpBlock2D") and bottom["sample_size"] == 8
    three = train_demo.unet_config((32, 64, 128), 1, 128, attn_levels=1, sample_size=16)
    assert three["down_block_types"] == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    assert three["up_block_types"] == ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert three["sample_size"] == 16 and three["block_out_channels"] == (32, 64, 128)


def test_vae_levels_set_the_latent_size(train_demo):
    import torch
    from diffusers import AutoencoderKL

    for widths, side in (((8, 16, 32), 8), ((16, 32), 16)):
        vae = AutoencoderKL(**train_demo.vae_config(widths))
        with torch.no_grad():
            assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, side, side)


def test_v_prediction_target_recovers_the_latents(train_demo):
    import torch

    z, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = torch.tensor([0.9, 0.5, 1e-4]).view(-1, 1, 1, 1)
    noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    assert torch.equal(train_demo.prediction_target("epsilon", z, noise, a), noise)
    v = train_demo.prediction_target("v_prediction", z, noise, a)
    # diffusers' and the runtime's conversions: x0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x_t
    assert torch.allclose(a.sqrt() * noisy - (1 - a).sqrt() * v, z, atol=1e-5)
    assert torch.allclose(a.sqrt() * v + (1 - a).sqrt() * noisy, noise, atol=1e-5)
    # at the noisiest steps v is almost the picture itself (negated), so the loss asks for the picture
    assert torch.allclose(v[2], -z[2], atol=0.05)
    with pytest.raises(ValueError, match="v_prediction"):
        train_demo.prediction_target("sample", z, noise, a)


def test_saved_scheduler_takes_the_prediction_type(train_demo):
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**train_demo.scheduler_config(0.02, "v_prediction"))
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_end == 0.02
    assert train_demo.scheduler_config()["prediction_type"] == "epsilon"


@pytest.mark.slow
def test_training_reuses_a_vae_saves_the_schedule_and_resumes(tmp_path):
    """Two U-Net steps, then two more from the checkpoint and two guided steps with a teacher, on a
    reused VAE (two script runs: 20-60 s)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    shapes.build(tmp_path / "data", variants=1)
    command = [
        sys.executable,
        str(repo / "scripts" / "train_demo.py"),
        *("--data", str(tmp_path / "data"), "--work", str(tmp_path / "work")),
        *("--vae-from", str(repo / "models" / "shapes"), "--batch", "4", "--guided-steps", "0"),
        *("--unet-widths", "32", "32", "--text-width", "32", "--text-layers", "1", "--preview", "0"),
        *("--attn-top", "--unplaced-prob", "0.5", "--offset-noise", "0.1", "--beta-end", "0.02"),
        *("--prediction-type", "v_prediction"),
    ]
    first = subprocess.run([*command, "--steps", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    guided = ("--guided-steps", "2", "--guided-teacher", "--guided-effective", "2.5")
    second = subprocess.run(
        [*command, "--steps", "4", *guided, "--out", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 2" in second.stdout and "guided: 2 steps" in second.stdout
    scheduler = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_end"] == 0.02 and scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["prediction_type"] == "v_prediction"
    unet = json.loads((tmp_path / "model" / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    vae = json.loads((tmp_path / "model" / "vae" / "config.json").read_text())
    assert (
        vae["scaling_factor"]
        == json.loads((repo / "models" / "shapes" / "vae" / "config.json").read_text())["scaling_factor"]
    )
