"""Memory admission (sdruntime/memory.py): the estimate stays above what a generation measures, a batch past
the budget is drawn in pieces with the same pixels, and an image past it is refused in one line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdruntime.cli import main as sdruntime_main
from sdruntime.manifest import read_manifest
from sdruntime.memory import (
    MemoryModel,
    MemoryRefused,
    Pieces,
    RequestShape,
    admit,
    largest_side,
    parse_memory_size,
)
from sdruntime.pipeline import StableDiffusionPipeline
from sdruntime.request import GenerationError, GenerationRequest
from sdruntime.session import SessionSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from memory_estimate import measure  # noqa: E402

PROMPT = "a red circle on a blue background, center"
# `sdruntime ARGS...` in a fresh process that prints its peak resident memory last
# (VmHWM, not getrusage's ru_maxrss, which a child keeps from the parent it was forked from)
PEAK_OF_CLI = """
import re, sys
from sdruntime.cli import main
code = main(sys.argv[1:])
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
sys.exit(code)
"""


def cli_peak(*args: str) -> int:
    run = subprocess.run([sys.executable, "-c", PEAK_OF_CLI, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from sdexport import convert

    return convert("shapes", tmp_path_factory.mktemp("memory") / "shapes", log=lambda line: None)


@pytest.fixture(scope="module")
def shapes_pipe(shapes) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.load(shapes, settings=SessionSettings(intra_op_threads=1))


@pytest.mark.parametrize(
    ("text", "size"), [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("4096", 4096)]
)
def test_memory_sizes_read_as_free_writes_them(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "2XB", "-1G", "0"])
def test_a_bad_memory_size_is_one_line(text):
    with pytest.raises(GenerationError, match="is not a size such as 2GiB"):
        parse_memory_size(text)


@pytest.mark.parametrize(("size", "images"), [(32, 50), (256, 1), (384, 1)])
def test_the_estimate_stays_above_the_measured_peak(shapes, size, images):
    measured = measure(str(shapes), size, images, PROMPT)["measured"]
    model = MemoryModel.of(read_manifest(shapes))
    shape = RequestShape(images, 2 * images, 2, size, size)
    estimate = model.peak(shape, 2 * images, images)
    # conservative, but not wildly. `measured` is what a generation adds to the loaded process: at 32x50 it
    # was 81-98 MiB over runs (loaded 166-179 MiB, the peak 260-267 MiB), the estimate 249 MiB, 2.5-3.05x
    assert measured < estimate < 3.5 * measured, (measured, estimate)


def test_a_batch_past_the_budget_is_cut_into_pieces_and_keeps_its_pixels(shapes_pipe):
    # one shared generator (one int seed for 6 images) and one generator per image
    for seed in (7, [7, 8, 9, 10, 11, 12]):
        request = GenerationRequest(PROMPT, num_inference_steps=3, scheduler="euler-a", seed=seed, num_images=6)
        whole = shapes_pipe.generate(request)
        shape = RequestShape(6, 12, 2, 32, 32)
        budget = shapes_pipe.memory_model.peak(shape, 4, 4) + 1  # four rows fit, five do not
        pieces = admit(shapes_pipe.memory_model, shape, budget)
        assert (pieces.unet_rows, pieces.decoder_rows) == (4, 4)
        shapes_pipe.admit = lambda plan, pieces=pieces: pieces
        try:
            cut = shapes_pipe.generate(request)
        finally:
            del shapes_pipe.admit
        assert np.array_equal(cut.latents, whole.latents)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(cut.images, whole.images))


def test_within_the_budget_a_request_is_one_piece(shapes_pipe):
    shape = RequestShape(2, 4, 2, 32, 32)
    assert admit(shapes_pipe.memory_model, shape, 2**40) == Pieces(4, 2, shapes_pipe.memory_model.peak(shape, 4, 2))
    assert admit(None, shape, 1) == Pieces(4, 2, 0)  # an export whose configs cannot be read: no estimate


@pytest.mark.parametrize("images", [1, 3])
def test_an_image_past_the_budget_is_refused_with_the_largest_size_that_fits(shapes_pipe, images):
    model = shapes_pipe.memory_model
    budget = 512 * 2**20
    request = RequestShape(images, 2 * images, 2, 1024, 1024)  # with classifier-free guidance
    with pytest.raises(MemoryRefused) as caught:
        admit(model, request, budget)
    side = caught.value.largest_side
    message = str(caught.value)
    assert message.startswith("1024x1024 needs about ") and f"the largest that fits is {side}x{side}" in message
    assert "\n" not in message and side % model.size_multiple == 0 and 32 < side < 1024
    # the size it names is admitted for the same request, and one step more is not
    assert admit(model, RequestShape(images, 2 * images, 2, side, side), budget).unet_rows >= 1
    grown = side + model.size_multiple
    with pytest.raises(MemoryRefused):
        admit(model, RequestShape(images, 2 * images, 2, grown, grown), budget)
    if images == 1:
        assert largest_side(model, budget) == side  # the default: one image with guidance, as a card shows it


def test_the_cli_refuses_an_image_too_large_for_the_machine_in_one_line(shapes, tmp_path, capsys):
    started = time.monotonic()
    code = sdruntime_main(
        ["generate", str(shapes), PROMPT, "--height", "8192", "--width", "8192", "-o", str(tmp_path / "x.png")]
    )
    assert code == 2 and time.monotonic() - started < 10
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sdruntime: error: 8192x8192 needs about ") and "the largest that fits is" in line
    assert not (tmp_path / "x.png").exists()


def test_the_cli_draws_a_batch_in_pieces_under_max_memory(shapes, tmp_path):
    """A small form of the acceptance's `-n 1000 --max-memory 1GiB`: pieces, and each image as drawn alone."""
    out = str(tmp_path / "batch.png")
    args = ("--steps", "1", "--threads", "1", "--seed", "3", "-n", "40", "--max-memory", "300MiB", "-o", out)
    peak = cli_peak("generate", str(shapes), PROMPT, *args)
    assert peak < 300 * 2**20
    pipe = StableDiffusionPipeline.load(shapes, settings=SessionSettings(intra_op_threads=1))
    for i in (0, 17, 39):
        alone = pipe(PROMPT, num_inference_steps=1, seed=3 + i).images[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"batch-{i}.png")), np.asarray(alone))


@pytest.mark.slow  # about 40 s: the acceptance's own numbers
def test_a_thousand_images_stay_under_one_and_a_half_gigabytes(shapes, tmp_path):
    out = str(tmp_path / "many.png")
    args = ("--steps", "1", "--seed", "0", "-n", "1000", "--max-memory", "1GiB", "-o", out)
    peak = cli_peak("generate", str(shapes), PROMPT, *args)
    assert peak < 1.5e9
    pipe = StableDiffusionPipeline.load(shapes)
    for i in (0, 500, 999):
        alone = pipe(PROMPT, num_inference_steps=1, seed=i).images[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"many-{i}.png")), np.asarray(alone))
