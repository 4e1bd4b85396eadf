"""What a saved image says about itself: enough to draw it again, in the format its name asks for."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdruntime import StableDiffusionPipeline
from sdruntime.cli import main
from sdruntime.image import read_parameters

# A1111's reader: "Key: value" pairs, values JSON-quoted when they hold a comma, colon or newline
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def fields(text: str) -> dict[str, str]:
    return {key: value for key, value in FIELD.findall(text.splitlines()[-1])}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def pipe(tiny32) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.load(tiny32)


@pytest.fixture
def init_png(tmp_path) -> Path:
    y, x = np.mgrid[0:64, 0:64]
    path = tmp_path / "init.png"
    Image.fromarray(np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_each_image_of_a_batch_comes_back_from_its_seed(tiny32, tmp_path):
    common = ["--steps", "3", "--scheduler", "euler-a"]
    assert (
        main(["generate", str(tiny32), "a dog", "-n", "3", "--seed", "5", *common, "-o", str(tmp_path / "b.png")]) == 0
    )
    batch = [tmp_path / f"b-{i}.png" for i in range(3)]
    seeds = [fields(read_parameters(path))["Seed"] for path in batch]
    assert seeds == ["5", "6", "7"]
    for path, seed in zip(batch, seeds):
        alone = tmp_path / f"alone-{seed}.png"
        assert main(["generate", str(tiny32), "a dog", "--seed", seed, *common, "-o", str(alone)]) == 0
        np.testing.assert_array_equal(pixels(alone), pixels(path))
        assert read_parameters(alone) == read_parameters(path)


def test_a_random_batch_records_one_seed_per_image(pipe):
    batch = pipe("a dog", num_images=2, num_inference_steps=3, scheduler="euler-a")
    seeds = [int(fields(text)["Seed"]) for text in batch.parameters]
    assert seeds[1] == seeds[0] + 1
    for image, seed in zip(batch.images, seeds):
        alone = pipe("a dog", seed=seed, num_inference_steps=3, scheduler="euler-a").images[0]
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(image))


def test_a_shared_generator_says_where_in_the_batch(pipe):
    # one int seed for a batch draws it from one generator, as diffusers does: the seed alone is not enough
    batch = pipe("a dog", num_images=2, seed=3, num_inference_steps=2)
    assert [fields(text).get("Batch pos") for text in batch.parameters] == ["0", "1"]
    assert all(fields(text)["Seed"] == "3" and fields(text)["Batch size"] == "2" for text in batch.parameters)
    single = pipe("a dog", seed=3, num_inference_steps=2)
    assert "Batch pos" not in fields(single.parameters[0])


def test_the_text_records_every_setting_that_changes_the_pixels(tiny32, pipe, init_png, tmp_path):
    out = tmp_path / "all.png"
    code = main(
        [
            "generate",
            str(tiny32),
            "a red circle",
            "--negative-prompt",
            "blurry",
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--guidance",
            "5",
            "--seed",
            "9",
            "--eta",
            "0.5",
            "--clip-skip",
            "1",
            "--image",
            str(init_png),
            "--strength",
            "0.6",
            "--height",
            "64",
            "--width",
            "64",
            "--timestep-spacing",
            "trailing",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    text = read_parameters(out)
    assert text.splitlines()[:2] == ["a red circle", "Negative prompt: blurry"]
    got = fields(text)
    init_hash = hashlib.sha256(init_png.read_bytes()).hexdigest()[:10]
    expected = {
        "Steps": "4",
        "Sampler": "ddim",
        "Timestep spacing": "trailing",
        "CFG scale": "5",
        "Seed": "9",
        "Size": "64x64",
        "Eta": "0.5",
        "Clip skip": "1",
        "Denoising strength": "0.6",
        "Init image hash": init_hash,
        "Model hash": pipe.model_hash,
        "Model": "tiny-sd",
    }
    assert {key: got.get(key) for key in expected} == expected
    assert re.fullmatch(r"[0-9a-f]{10}", got["Model hash"])


def test_scheduler_options_are_recorded(pipe):
    text = pipe(
        "a dog", seed=1, num_inference_steps=2, scheduler="ddim", scheduler_options={"steps_offset": 1}
    ).parameters[0]
    assert fields(text)["Scheduler options"] == "steps_offset=1"


@pytest.mark.filterwarnings("ignore:this export is fp16")
def test_model_hash_follows_the_weights(tiny16, pipe):
    assert StableDiffusionPipeline.load(tiny16).model_hash != pipe.model_hash


def test_settings_that_do_not_apply_are_left_out(pipe):
    got = fields(pipe("a dog", seed=1, num_inference_steps=2, scheduler="euler").parameters[0])
    assert {"Timestep spacing", "Model hash"} <= set(got)
    assert not {"Eta", "Clip skip", "Denoising strength", "Init image hash", "Latents"} & set(got)


@pytest.mark.parametrize(
    ("suffix", "magic", "format_"),
    [
        (".jpg", b"\xff\xd8\xff", "JPEG"),
        (".jpeg", b"\xff\xd8\xff", "JPEG"),
        (".webp", b"RIFF", "WEBP"),
    ],
)
def test_output_format_follows_the_extension(tiny32, tmp_path, suffix, magic, format_):
    out = tmp_path / f"dog{suffix}"
    assert main(["generate", str(tiny32), 'a dög, "quoted"', "--steps", "2", "--seed", "3", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(magic) and Image.open(out).format == format_
    text = read_parameters(out)
    assert text.splitlines()[0] == 'a dög, "quoted"' and fields(text)["Seed"] == "3"


def test_interpolate_is_reproducible_with_ancestral_noise(tiny32, tmp_path):
    runs = []
    for run in ("one", "two"):
        args = [
            "interpolate",
            str(tiny32),
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--frames",
            "3",
            "--steps",
            "4",
            "--scheduler",
            "euler-a",
            "--seed",
            "4",
            "-o",
            str(tmp_path / run),
        ]
        assert main(args) == 0
        runs.append(sorted((tmp_path / run).glob("frame-*.png")))
    assert len(runs[0]) == 3
    for a, b in zip(*runs):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    texts = [read_parameters(path) for path in runs[0]]
    assert [fields(text)["Interpolation"] for text in texts] == [
        f"pairwise t={t} of noise seeds 4 and 5" for t in ("0.00", "0.50", "1.00")
    ]
    assert all(fields(text)["Sampler"] == "euler-a" and fields(text)["Seed"] == "4" for text in texts)


def test_interpolate_grid_frames_carry_metadata(tiny32, tmp_path):
    args = [
        "interpolate",
        str(tiny32),
        *sum([["--prompt", p] for p in "abcd"], []),
        "--grid",
        "2",
        "--steps",
        "2",
        "-o",
        str(tmp_path / "grid"),
    ]
    assert main(args) == 0
    last = read_parameters(tmp_path / "grid" / "frame-003.png")
    assert fields(last)["Interpolation"] == "bilinear u=1.00 v=1.00 of noise seeds 0 to 3"


def test_interpolate_takes_the_timestep_spacing(tiny32, tmp_path):
    args = [
        "interpolate",
        str(tiny32),
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--frames",
        "2",
        "--steps",
        "2",
        "--scheduler",
        "euler",
        "--timestep-spacing",
        "trailing",
        "-o",
        str(tmp_path / "walk"),
    ]
    assert main(args) == 0
    assert fields(read_parameters(tmp_path / "walk" / "frame-001.png"))["Timestep spacing"] == "trailing"
