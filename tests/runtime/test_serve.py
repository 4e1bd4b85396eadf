"""`sdruntime serve` (sdruntime/serve.py, sdruntime/serving.py): request checks, batches that draw what single
runs draw, and a real server on a local Ray (started by the command itself) answered over HTTP: pixels equal to
`sdruntime generate`, 400s, a full queue, a replica killed mid-request."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from sdruntime.cli import main as sdruntime_main
from sdruntime.errors import InvalidArgument
from sdruntime.manifest import read_manifest
from sdruntime.pipeline import StableDiffusionPipeline
from sdruntime.serving import (
    ImageStore,
    ModelFacts,
    RequestError,
    draw_batch,
    edit_body,
    model_facts,
    parse_request,
)

PROMPT = "a red circle on a blue background, center"
GENERATOR_TITLE = "ServeReplica:sdexport:ImageGenerator"


def png_file(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height: Pillow reads the size without decoding a pixel."""
    data = bytearray(png_file(Image.new("L", (1, 1))))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])  # depth, colour type, ...
    data[12:33] = header + struct.pack(">I", zlib.crc32(header))
    return bytes(data)


INIT_B64 = b64(png_file(Image.new("RGB", (64, 64), (200, 30, 30))))


@pytest.fixture(scope="module")
def tiny_pipe32(tiny32):
    return StableDiffusionPipeline.load(tiny32)


@pytest.fixture(scope="module")
def facts(tiny_pipe32) -> ModelFacts:
    return model_facts(tiny_pipe32)


# -- requests -----------------------------------------------------------------------------------------


def test_request_defaults_and_seeds_follow_the_cli(facts):
    request = parse_request({"prompt": PROMPT, "seed": 7, "n": 3}, facts)
    assert request.seeds == (7, 8, 9)  # as `sdruntime generate --seed 7 -n 3` numbers them
    assert (request.width, request.height) == facts.default_size
    assert request.steps == 25 and request.scheduler == facts.default_scheduler
    assert request.guidance is None and facts.default_guidance == 7.5  # None: the plan's, as the CLI leaves it
    assert request.response_format == "b64_json" and request.negative_prompt is None
    m = facts.size_multiple
    single = parse_request({"prompt": PROMPT, "size": f"{2 * m}x{3 * m}"}, facts)
    assert single.response_format == "b64_json" and (single.width, single.height) == (2 * m, 3 * m)  # OpenAI's
    assert parse_request({"prompt": PROMPT}, facts, default_format="png").response_format == "png"  # Accept: image/png
    auto = parse_request({"prompt": PROMPT, "size": "auto"}, facts)  # OpenAI's "auto": the export's default size
    assert (auto.width, auto.height) == facts.default_size
    assert 0 <= single.seeds[0] < 2**32  # drawn by the server, so the answer can name it


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        ({"prompt": PROMPT, "guidance_scale": 3}, "unknown field 'guidance_scale'"),
        ({"prompt": PROMPT, "steps": 0}, "'steps' must be an integer from 1 to 150, got 0"),
        ({"prompt": PROMPT, "steps": True}, "'steps' must be an integer"),
        ({"prompt": PROMPT, "size": "20x16"}, "'size' 20x16 must be multiples of 16"),  # tiny-sd's multiple
        ({"prompt": PROMPT, "size": "big"}, "'size' must be 'WIDTHxHEIGHT'"),
        ({"prompt": PROMPT, "scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"prompt": PROMPT, "scheduler": "ddim", "scheduler_options": {"karras": 1}}, "ddim has no setting 'karras'"),
        ({"prompt": PROMPT, "scheduler_options": {"clip_sample": [1]}}, "'scheduler_options' must be an object"),
        ({"prompt": PROMPT, "scheduler_options": "clip_sample=false"}, "'scheduler_options' must be an object"),
        ({"prompt": PROMPT, "seed": 2**32}, "'seed' must be an integer from 0 to 4294967295"),
        ({"prompt": PROMPT, "n": 2, "response_format": "png"}, "a PNG response holds one image"),
        ([PROMPT], "the body must be a JSON object"),
        ({"prompt": PROMPT, "image": "not base64!"}, "'image' is not base64 .*: send the image file's bytes base64"),
        ({"prompt": PROMPT, "image": b64(b"not an image")}, r"cannot read the init image \(12 bytes\): cannot ident"),
        ({"prompt": PROMPT, "image": INIT_B64, "mask": b64(b"GIF89a")}, r"cannot read the mask image \(6 bytes\)"),
        ({"prompt": PROMPT, "image": INIT_B64, "mask": 3}, "'mask' must be a base64-encoded PNG or JPEG file, got int"),
        ({"prompt": PROMPT, "image": b64(png_claiming(4097, 8))}, "'image' is larger than 4096x4096 pixels"),
        ({"prompt": PROMPT, "image": b64(png_claiming(20000, 20000))}, "'image' is larger than 4096x4096 pixels"),
        ({"prompt": PROMPT, "strength": 0.5}, "'strength' says how far to noise 'image': send an image, or leave"),
        ({"prompt": PROMPT, "image": INIT_B64, "strength": 0}, r"'strength' must be a number in \(0, 1\], got 0"),
        ({"prompt": PROMPT, "image": INIT_B64, "strength": float("nan")}, "'strength' must be a number in"),
        ({"prompt": PROMPT, "image": INIT_B64, "strength": True}, "'strength' must be a number in"),
    ],
)
def test_bad_requests_are_refused_in_one_line(facts, body, message):
    with pytest.raises(InvalidArgument, match=message) as caught:
        parse_request(body, facts)
    assert "\n" not in str(caught.value)


def openai_fields(params: type) -> dict[str, tuple]:
    """The fields of an openai request type (image_generate_params.py's, image_edit_params.py's), each with the
    values its Literal lists (none for free values)."""
    hints = typing.get_type_hints(params, include_extras=True)

    def literals(hint) -> tuple:
        if typing.get_origin(hint) is typing.Literal:
            return typing.get_args(hint)
        return tuple(v for arg in typing.get_args(hint) for v in literals(arg))

    return {name: literals(hint) for name, hint in hints.items()}


@pytest.mark.parametrize("params", ["ImageGenerateParamsNonStreaming", "ImageEditParamsNonStreaming"])
def test_every_field_of_openais_reference_is_taken_or_refused_by_name(facts, params):
    """Field by field, value by value, as the openai package's types list them: each value draws or is refused in one
    line naming its field (OpenAI's `param`), never as an unknown field; the values that mean what this server does
    (the defaults) are taken."""
    openai_types = pytest.importorskip("openai.types")
    module = "image_generate_params" if params.startswith("ImageGenerate") else "image_edit_params"
    fields = openai_fields(getattr(getattr(openai_types, module), params))
    assert {"model", "quality", "size", "response_format", "user"} <= set(fields)
    taken = []
    for name, values in fields.items():
        for value in values or (None,):
            if name in ("prompt", "image", "stream") or (name == "response_format" and value == "url"):
                continue
            try:
                parse_request({"prompt": PROMPT, name: value}, facts)
                taken.append((name, value))
            except RequestError as e:
                assert e.param == name and e.code != "unknown_parameter" and "\n" not in str(e), (name, value, e)
    for default in [("quality", "auto"), ("style", "vivid"), ("background", "auto"), ("moderation", "auto")]:
        assert default in taken or default[0] not in fields
    assert ("output_format", "png") in taken and ("response_format", "b64_json") in taken and ("size", "auto") in taken
    assert ("quality", "hd") not in taken and ("output_format", "jpeg") not in taken


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "dall-e-3"}, 404, "model", "model_not_found"),
        ({"guidance_scale": 3}, 400, "guidance_scale", "unknown_parameter"),
        ({"size": "20x16"}, 400, "size", "invalid_value"),
        ({"quality": "hd"}, 400, "quality", "unsupported_value"),
        ({"output_format": "webp"}, 400, "output_format", "unsupported_value"),
        ({"frame_count": 4}, 400, "frame_count", "unsupported_parameter"),
        ({"user": 3}, 400, "user", "invalid_type"),
        ({"steps": 0}, 400, "steps", "invalid_value"),
        ({"scheduler": "heun"}, 400, "scheduler", "invalid_value"),
        ({"image": "not base64!"}, 400, "image", "invalid_value"),
        ({"n": 2, "response_format": "png"}, 400, "response_format", "invalid_value"),
        ({"stream": True, "response_format": "url"}, 400, "response_format", "invalid_value"),
    ],
)
def test_refusals_name_their_field_and_openais_code(facts, body, status, param, code):
    with pytest.raises(RequestError) as caught:
        parse_request({"prompt": PROMPT, **body}, facts)
    assert (caught.value.status, caught.value.param, caught.value.code) == (status, param, code)


def test_openai_values_that_mean_ours_draw_the_same_request(facts):
    plain = parse_request({"prompt": PROMPT, "seed": 1}, facts)
    dressed = {"model": facts.name, "size": "auto", "quality": "auto", "style": "vivid", "user": "u-1"}
    dressed |= {"output_format": "png", "background": "opaque", "moderation": "low", "safety_identifier": "h"}
    assert parse_request({"prompt": PROMPT, "seed": 1, **dressed}, facts) == plain


def test_the_image_store_keeps_pngs_for_a_bounded_time_and_count():
    now = [0.0]
    store = ImageStore(ttl_s=10.0, max_images=2, clock=lambda: now[0])
    first, second = store.put(b"1"), store.put(b"2")
    assert (store.get(first), store.get(second), store.get("nope")) == (b"1", b"2", None) and first != second
    third = store.put(b"3")  # past the count: the oldest goes
    assert (store.get(first), store.get(second), store.get(third)) == (None, b"2", b"3")
    now[0] = 9.9
    assert store.get(third) == b"3"
    now[0] = 10.0
    assert store.get(second) is None and store.get(third) is None and not store.images


def rgba_png(alpha: np.ndarray) -> bytes:
    return png_file(Image.fromarray(np.dstack([np.full(alpha.shape + (3,), 90, np.uint8), alpha]), "RGBA"))


def test_an_edit_form_becomes_the_body_with_openais_mask_meaning(facts):
    """OpenAI's mask: fully transparent pixels are edited; this server's: white is repainted. Form values arrive as
    text and are read as the fields' types."""
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[10:30, 5:40] = 0
    alpha[0, 0] = 128  # half transparent: kept, as OpenAI edits only where alpha is zero
    init = png_file(Image.new("RGB", (64, 48), (200, 30, 30)))
    form = [("image", init), ("mask", rgba_png(alpha)), ("prompt", "7"), ("n", "2"), ("guidance", "3.5")]
    form += [("stream", "false"), ("scheduler", "ddim"), ("loras[]", "a"), ("scheduler_options[clip_sample]", "false")]
    body = edit_body(form)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    assert np.array_equal(mask, np.where(alpha == 0, 255, 0))
    assert base64.b64decode(body["image"]) == init
    assert {k: v for k, v in body.items() if k not in ("image", "mask")} == {
        "prompt": "7",
        "n": 2,
        "guidance": 3.5,
        "stream": False,
        "scheduler": "ddim",
        "loras": ["a"],
        "scheduler_options": {"clip_sample": False},
    }
    request = parse_request({**body, "loras": None}, facts)
    assert (request.width, request.height, request.seeds[1] - request.seeds[0]) == (64, 48, 1)
    # no mask: an image's own transparent pixels are the mask (DALL-E 2's edits); an opaque one is image-to-image
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(edit_body([("image", rgba_png(alpha))])["mask"])))), mask
    )
    assert "mask" not in edit_body([("image", init)])
    grey = png_file(Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8)))  # no alpha: ours already
    assert base64.b64decode(edit_body([("image", init), ("mask", grey)])["mask"]) == grey
    for form, param in [
        ([], "image"),
        ([("image", init)] * 2, "image"),
        ([("image", init), ("prompt", b"x")], "prompt"),
    ]:
        with pytest.raises(RequestError) as caught:
            edit_body(form)
        assert caught.value.param == param


def test_scheduler_options_reach_the_scheduler_and_split_batches(tiny_pipe32, facts):
    """The field does what `--scheduler-option` does: the picture of the same options given to the pipeline;
    requests with other options run in another batch."""
    body = {"prompt": PROMPT, "seed": 3, "steps": 3, "scheduler": "ddim"}
    plain, clipped = (
        parse_request(body, facts),
        parse_request({**body, "scheduler_options": {"clip_sample": False}}, facts),
    )
    assert clipped.scheduler_options == (("clip_sample", False),) and plain.batch_key != clipped.batch_key
    results = draw_batch(tiny_pipe32, [plain, clipped], max_images=4)
    assert [[i.batch_images for i in r.images] for r in results] == [[1], [1]]
    alone = tiny_pipe32(
        PROMPT, num_inference_steps=3, scheduler="ddim", seed=3, scheduler_options={"clip_sample": False}
    )
    assert "Scheduler options: clip_sample=false" in results[1].images[0].parameters
    assert results[1].images[0].parameters == alone.parameters[0]


# -- image inputs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint_files(tmp_path_factory) -> tuple[Path, Path]:
    """init.png and mask.png at 72x56, which draw at 64x48 (rounded down to tiny-sd's multiple of 16)."""
    folder = tmp_path_factory.mktemp("inpaint")
    y, x = np.mgrid[0:56, 0:72]
    rgb = np.stack([x * 3, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "init.png")
    Image.fromarray((((x > 20) & (x < 60) & (y > 10)) * 255).astype(np.uint8)).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def image_body(init: Path, mask: Path | None, **fields) -> dict:
    body = {"prompt": PROMPT, "image": b64(init.read_bytes()), **fields}
    return body if mask is None else {**body, "mask": b64(mask.read_bytes())}


@pytest.mark.parametrize("inpaint", [False, True], ids=["image-to-image", "inpainting"])
def test_image_inputs_draw_the_png_of_sdruntime_generate(tiny_pipe32, facts, tiny32, inpaint_files, tmp_path, inpaint):
    """The same PNG, byte for byte: the pixels, the size taken from the image, and the parameters with the
    sha256 of the files the fields carried."""
    init, mask = inpaint_files[0], inpaint_files[1] if inpaint else None
    request = parse_request(image_body(init, mask, seed=4, steps=4, strength=0.75), facts)
    assert (request.width, request.height) == (64, 48) and request.batch_key is None
    [result] = draw_batch(tiny_pipe32, [request], max_images=4)
    assert result.error is None
    out = tmp_path / "cli.png"
    masks = ["--mask", str(mask)] if inpaint else []
    options = ["--seed", "4", "--steps", "4", "--strength", "0.75", "--image", str(init), *masks, "-o", str(out)]
    assert sdruntime_main(["generate", str(tiny32), PROMPT, *options]) == 0
    assert result.images[0].png == out.read_bytes()
    assert ("Mask hash: " in result.images[0].parameters) == inpaint


def test_requests_with_images_run_alone(tiny_pipe32, facts, inpaint_files):
    """Even with the very same files: diffusers encodes a call's image with its first generator."""
    same = image_body(*inpaint_files, seed=1, steps=2)
    bodies = [same, same, {"prompt": PROMPT, "seed": 1, "steps": 2}, {"prompt": PROMPT, "seed": 2, "steps": 2}]
    results = draw_batch(tiny_pipe32, [parse_request(b, facts) for b in bodies], max_images=8)
    assert [[i.batch_images for i in r.images] for r in results] == [[1], [1], [2], [2]]
    assert results[0].images[0].png == results[1].images[0].png


def test_image_requests_the_runtime_refuses_get_its_line_as_a_400(tiny_pipe32, facts, inpaint_files):
    init, mask = inpaint_files
    small = b64(png_file(Image.new("L", (32, 32), 255)))
    refused = {
        "mask_image needs the image to inpaint: pass image too": {"prompt": PROMPT, "mask": b64(mask.read_bytes())},
        "mask_image is 32x32, the image 72x56: give a mask of the image's size": {
            **image_body(init, None),
            "mask": small,
        },
    }
    requests = [parse_request({**body, "steps": 2}, facts) for body in refused.values()]
    for message, result in zip(refused, draw_batch(tiny_pipe32, requests, max_images=4)):
        assert result.user_error and result.error == message and not result.images
    no_encoder = dataclasses.replace(facts, image_inputs=False)
    with pytest.raises(InvalidArgument, match="this export has no VAE encoder, so it draws from prompts alone"):
        parse_request(image_body(init, mask), no_encoder)


# -- ControlNet -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_pipe32(tiny_controlnet32):
    return StableDiffusionPipeline.load(tiny_controlnet32)


@pytest.fixture(scope="module")
def control_facts(control_pipe32) -> ModelFacts:
    return model_facts(control_pipe32)


@pytest.fixture(scope="module")
def control_file(tmp_path_factory) -> Path:
    """A 72x56 control image of random 8-pixel blocks, as an edge map would be: it draws at 64x48."""
    path = tmp_path_factory.mktemp("control") / "control.png"
    blocks = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))).save(path)
    return path


CONTROL_REQUESTS = {
    "text-to-image": (
        dict(control=[dict(image="CONTROL", scale=0.8, start=0.1)], guess_mode=True),
        ["--control", "CONTROL:0.8", "--control-start", "0.1", "--guess-mode"],
    ),
    "inpainting": (
        dict(image="INIT", mask="MASK", control=[dict(name="edges", image="CONTROL", end=0.75)]),
        ["--image", "INIT", "--mask", "MASK", "--control", "edges=CONTROL", "--control-end", "0.75"],
    ),
}


@pytest.mark.parametrize("case", list(CONTROL_REQUESTS))
def test_control_draws_the_png_of_sdruntime_generate(
    control_pipe32, control_facts, tiny_controlnet32, control_file, inpaint_files, tmp_path, case
):
    """The same PNG, byte for byte, as `generate --control`: the size from the control image (or the init image),
    the scale (diffusers' for the mode when absent), the span, and the control file's sha256 in the parameters."""
    files = {"CONTROL": control_file, "INIT": inpaint_files[0], "MASK": inpaint_files[1]}
    fields, options = CONTROL_REQUESTS[case]
    body = json.loads(re.sub("INIT|MASK|CONTROL", lambda m: b64(files[m.group()].read_bytes()), json.dumps(fields)))
    request = parse_request({"prompt": PROMPT, "seed": 6, "steps": 3, **body}, control_facts)
    assert (request.width, request.height) == (64, 48) and request.batch_key is None
    [result] = draw_batch(control_pipe32, [request], max_images=4)
    assert result.error is None
    out = tmp_path / "cli.png"
    options = [re.sub("INIT|MASK|CONTROL", lambda m: str(files[m.group()]), option) for option in options]
    assert (
        sdruntime_main(
            ["generate", str(tiny_controlnet32), PROMPT, "--seed", "6", "--steps", "3", *options, "-o", str(out)]
        )
        == 0
    )
    assert result.images[0].png == out.read_bytes()
    weight = "0.8" if case == "text-to-image" else "0.5"  # 0.5: diffusers' for SD inpainting
    assert f'ControlNet 0: "Model: edges, Weight: {weight}, ' in result.images[0].parameters


def test_models_list_the_controlnets(control_facts, facts):
    assert control_facts.card()["controlnets"] == ["edges"] and facts.card()["controlnets"] == []


CONTROL_B64 = b64(png_file(Image.new("RGB", (64, 64), (0, 0, 0))))


@pytest.mark.parametrize(
    ("exported", "body", "message"),
    [
        ("edges", {"control": {"image": CONTROL_B64}}, "'control' must be a non-empty list of objects"),
        ("edges", {"control": []}, "'control' must be a non-empty list of objects"),
        ("edges", {"control": [CONTROL_B64]}, "'control' must be a non-empty list of objects"),
        ("edges", {"control": [{"image": "not base64!"}]}, r"'control\[0\].image' is not base64 .*: send the"),
        ("edges", {"control": [{"image": b64(b"nope")}]}, r"cannot read the control image \(4 bytes\): cannot ident"),
        ("edges", {"control": [{"image": b64(png_claiming(5000, 8))}]}, r"'control\[0\].image' is larger than 4096"),
        ("edges", {"control": [{"name": "edges"}]}, r"'control\[0\]' has no 'image': send the control image"),
        (
            "edges",
            {"control": [{"name": "pose", "image": CONTROL_B64}]},
            r"unknown ControlNet 'pose' in 'control\[0\].name': this export has edges",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64, "weight": 1}]},
            r"unknown field 'control\[0\].weight': an entry has name, image",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64, "scale": "high"}]},
            r"'control\[0\].scale' must be a number from 0 to 10, got 'high'",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64, "scale": float("nan")}]},
            r"'control\[0\].scale' must be a number",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64, "end": 1.5}]},
            r"'control\[0\].end' must be a number from 0 to 1, got 1.5",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64, "start": 0.8, "end": 0.2}]},
            r"'control\[0\]': 'start' 0.8 must be below 'end' 0.2",
        ),
        ("edges", {"control": [{"image": CONTROL_B64}] * 9}, "'control' has 9 entries: send at most 8"),
        (
            "edges",
            {"guess_mode": True},
            "'guess_mode' applies to ControlNets: send 'control' too, or leave guess_mode out",
        ),
        (
            "edges",
            {"control": [{"image": CONTROL_B64}], "guess_mode": "yes"},
            "'guess_mode' must be true or false, got 'yes'",
        ),
        (
            "edges,depth",
            {"control": [{"image": CONTROL_B64}]},
            r"'control\[0\]' has no 'name' and this export has 2 ControlNets \(edges, depth\): name the one",
        ),
        (
            "",
            {"control": [{"image": CONTROL_B64}]},
            "this export has no ControlNet: leave out 'control', or add one with `sdexport add-controlnet",
        ),
    ],
)
def test_bad_control_requests_are_refused_in_one_line(control_facts, exported, body, message):
    facts = dataclasses.replace(control_facts, controlnets=tuple(filter(None, exported.split(","))))
    with pytest.raises(InvalidArgument, match=message) as caught:
        parse_request({"prompt": PROMPT, **body}, facts)
    assert "\n" not in str(caught.value)


# -- batches -----------------------------------------------------------------------------------------


def test_a_batch_draws_what_single_runs_draw(tiny_pipe32, facts):
    bodies = [
        {"prompt": PROMPT, "seed": 3, "steps": 4},
        {"prompt": "a green star", "seed": 11, "steps": 4, "n": 2},
        {"prompt": "a blue square", "seed": 5, "steps": 4, "scheduler": "euler"},  # another schedule: alone
        {"prompt": "a white triangle", "seed": 9, "steps": 4, "negative_prompt": "blurry"},  # negatives: alone
    ]
    requests = [parse_request(b, facts) for b in bodies]
    results = draw_batch(tiny_pipe32, requests, max_images=4)
    assert [[i.batch_images for i in r.images] for r in results] == [[3], [3, 3], [1], [1]]
    for request, result in zip(requests, results):
        assert result.error is None and [i.seed for i in result.images] == list(request.seeds)
        for image in result.images:
            alone = tiny_pipe32(
                request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps,
                scheduler=request.scheduler,
                seed=image.seed,
            )
            drawn = Image.open(io.BytesIO(image.png))
            assert np.array_equal(np.asarray(drawn), np.asarray(alone.images[0]))
            assert drawn.text["parameters"] == alone.parameters[0] == image.parameters


def test_batches_are_cut_at_max_images_and_a_bad_group_fails_alone(tiny_pipe32, facts):
    requests = [parse_request({"prompt": PROMPT, "seed": s, "steps": 2, "n": 2}, facts) for s in (0, 10)]
    results = draw_batch(tiny_pipe32, requests, max_images=3)
    assert [[i.batch_images for i in r.images] for r in results] == [[3, 3], [3, 1]]
    # a request parse_request would refuse, to see the pipeline's own refusal reach only its group
    broken = parse_request({"prompt": PROMPT, "seed": 1, "steps": 2}, facts)
    broken = dataclasses.replace(broken, width=12)
    results = draw_batch(tiny_pipe32, [broken, requests[0]], max_images=8)
    assert results[0].user_error and f"width 12 is not a positive multiple of {facts.size_multiple}" in results[0].error
    assert not results[0].images and results[1].error is None and len(results[1].images) == 2


# -- the runtime without Ray -------------------------------------------------------------------------


def test_runtime_imports_no_ray_unless_serving(tiny32):
    script = (
        "import sys\n"
        "from sdruntime.cli import main\n"
        "from sdruntime import StableDiffusionPipeline\n"
        "StableDiffusionPipeline.load(sys.argv[1])('a red circle', num_inference_steps=1, seed=0)\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi', 'starlette'))\n"
        "assert not loaded, loaded\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "sys.exit(main(['serve', sys.argv[1]]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tiny32)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        'sdruntime: error: serving needs Ray Serve (ray is missing): pip install "sdexport-runtime[serve]"'
    )


# -- a server on a local Ray -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_server(folder: Path, log: Path):
    """A module's own `sdruntime serve` of `folder` at the plain settings (60 s limit, 1 GiB replica budget),
    healthy when yielded and stopped after: a generator for a module-scoped fixture."""
    running = Server(folder, log, "--timeout", "60", "--max-memory", "1GiB")
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


class Server:
    """`sdruntime serve` in a subprocess; every process it starts is stopped with it."""

    def __init__(self, folder: Path, log: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "sdruntime.cli", "serve", str(folder), "--port", str(self.port), *options]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, limit_s: float = 120.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if request(self.url + "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not healthy in {limit_s} s: {self.log.read_text()[-3000:]}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def generator_pids(self) -> list[int]:
        """The ImageGenerator replicas' processes (Ray titles each worker with its actor)."""
        pids = []
        for child in self.descendants():
            try:
                if GENERATOR_TITLE in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self) -> None:
        children = self.descendants()
        self.process.send_signal(signal.SIGINT)  # Ctrl-C: the command shuts Serve and its Ray down
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for child in children:  # whatever did not go with it
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def request(
    url: str, body: dict | bytes | None = None, timeout: float = 120, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, or of a POST when there is a body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def server(tiny32, tmp_path_factory):
    # a small queue, so that a burst fills it (8: room for the batching test's 6); batches of up to 4 images;
    # a replica budget that 1024x1024 passes (its VAE's attention alone would take 3 GiB)
    running = Server(
        tiny32,
        tmp_path_factory.mktemp("serve") / "serve.log",
        "--max-batch",
        "4",
        "--max-queue",
        "8",
        "--timeout",
        "60",
        "--max-memory",
        "1GiB",
    )
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


def generate(server: Server, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return request(server.url + "/v1/images/generations", body, headers=headers)


def generate_png(server: Server, body: dict) -> tuple[int, dict, bytes]:
    """The PNG file itself (`response_format: "png"`, this server's own), with the seed in X-Seed."""
    return generate(server, {**body, "response_format": "png"})


def test_http_draws_the_pixels_and_metadata_of_sdruntime_generate(server, tiny32, tmp_path):
    body = {"prompt": PROMPT, "seed": 42, "steps": 6, "scheduler": "euler-a"}
    status, headers, png = generate(server, body, {"Accept": "image/png"})  # as `curl -H 'Accept: image/png'`
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "42"
    assert generate_png(server, body)[2] == png
    out = tmp_path / "cli.png"
    code = sdruntime_main(
        ["generate", str(tiny32), PROMPT, "--seed", "42", "--steps", "6", "--scheduler", "euler-a", "-o", str(out)]
    )
    assert code == 0
    served, local = Image.open(io.BytesIO(png)), Image.open(out)
    assert np.array_equal(np.asarray(served), np.asarray(local))
    assert served.text["parameters"] == local.text["parameters"]


def test_concurrent_requests_share_a_unet_batch_and_keep_their_pixels(server):
    bodies = [{"prompt": p, "seed": s, "steps": 20} for s, p in enumerate(["a red circle", "a green star"] * 3)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: generate_png(server, b), bodies))
    assert [status for status, _, _ in together] == [200] * len(bodies), [body for _, _, body in together]
    assert max(int(headers["x-batch-images"]) for _, headers, _ in together) > 1
    for body, (_, _, png) in zip(bodies, together):
        status, headers, alone = generate_png(server, body)
        assert status == 200 and headers["x-batch-images"] == "1"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(io.BytesIO(alone))))


def test_b64_json_answers_several_images_with_their_seeds(server):
    status, _, body = generate(server, {"prompt": PROMPT, "seed": 5, "steps": 2, "n": 2})
    data = json.loads(body)["data"]
    assert status == 200 and [d["seed"] for d in data] == [5, 6]
    for d in data:
        image = Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))
        assert image.text["parameters"] == d["parameters"] and f"Seed: {d['seed']}," in d["parameters"]


def test_a_streamed_request_gets_a_progress_event_per_step_then_its_images(server):
    body = {"prompt": PROMPT, "seed": 8, "steps": 3, "scheduler": "euler", "n": 2}
    status, headers, streamed = generate(server, {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = []
    for block in streamed.decode().strip().split("\n\n"):  # as an SSE client reads them
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    assert [name for name, _ in events] == ["progress"] * 3 + ["result"]
    # this export has no tiny decoder: progress without previews (tests/runtime/test_tiny_decoder.py has them)
    assert [data for _, data in events[:3]] == [{"step": i, "steps": 3} for i in (1, 2, 3)]
    status, _, plain = generate(server, {**body, "response_format": "b64_json"})
    assert status == 200
    expected = [(d["b64_json"], d["seed"], d["parameters"]) for d in json.loads(plain)["data"]]
    assert [(d["b64_json"], d["seed"], d["parameters"]) for d in events[-1][1]["data"]] == expected
    status, _, refused = generate(server, {**body, "stream": True, "decoder": "tiny"})
    assert status == 400 and "no tiny decoder" in json.loads(refused)["error"]["message"]


def test_bad_requests_get_400_with_one_message(server):
    status, headers, body = generate(server, {"prompt": PROMPT, "steps": 0})
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["message"] == "'steps' must be an integer from 1 to 150, got 0"
    status, _, body = request(server.url + "/v1/images/generations", b"{not json")
    assert status == 400 and json.loads(body)["error"]["message"].startswith("the body is not JSON")
    status, _, body = generate(server, {"prompt": PROMPT, "image": "not base64!"})
    assert status == 400 and json.loads(body)["error"]["message"].startswith("'image' is not base64")
    status, _, body = generate(server, {"prompt": PROMPT, "control": [{"image": INIT_B64}]})
    assert status == 400 and json.loads(body)["error"]["message"].startswith("this export has no ControlNet")


def test_http_inpaints_as_sdruntime_generate(server, tiny32, inpaint_files, tmp_path):
    status, headers, png = generate_png(server, image_body(*inpaint_files, seed=8, steps=3))
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-batch-images"] == "1"
    out = tmp_path / "cli.png"
    init, mask = (str(path) for path in inpaint_files)
    options = ["--seed", "8", "--steps", "3", "--image", init, "--mask", mask, "-o", str(out)]
    assert sdruntime_main(["generate", str(tiny32), PROMPT, *options]) == 0
    assert png == out.read_bytes()


def test_models_and_health_report_the_manifest(server, tiny32):
    status, _, body = request(server.url + "/v1/models")
    card = json.loads(body)["data"][0]
    manifest = read_manifest(tiny32)
    assert status == 200 and card["id"] == tiny32.name and card["family"] == manifest.pipeline.family
    assert card["size_multiple"] == manifest.size_multiple and card["dtype"] == manifest.dtype
    assert card["image_inputs"] is True and card["controlnets"] == []
    status, _, body = request(server.url + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "replicas": {"running": 1}}


def test_a_request_past_the_replica_memory_gets_400_and_the_server_stays_up(server):
    status, _, body = request(server.url + "/v1/models")
    card = json.loads(body)["data"][0]
    side = int(card["largest_size"].split("x")[0])
    assert status == 200 and card["memory_budget_bytes"] == 2**30 and 64 <= side < 1024
    status, headers, body = generate(server, {"prompt": PROMPT, "steps": 2, "size": "1024x1024"})
    message = json.loads(body)["error"]["message"]
    assert status == 400 and headers["content-type"] == "application/json"
    assert message.startswith("1024x1024 needs about ") and f"the largest that fits is {side}x{side}" in message
    assert request(server.url + "/health")[0] == 200
    status, _, png = generate_png(server, {"prompt": PROMPT, "seed": 1, "steps": 2, "size": f"{side}x{side}"})
    assert status == 200 and Image.open(io.BytesIO(png)).size == (side, side)


def test_serve_refuses_a_busy_port_in_one_line_before_starting_ray(tiny32, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        code = sdruntime_main(["serve", str(tiny32), "--port", str(port)])
    assert code == 2 and time.monotonic() - started < 10
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"sdruntime: error: cannot listen on 127.0.0.1:{port} (")
    assert line.endswith("choose another --port")


def test_serve_refuses_a_damaged_export_in_one_line_before_starting_ray(tiny32, tmp_path, capsys):
    damaged = shutil.copytree(tiny32, tmp_path / "damaged")
    unet = damaged / "unet" / "model.onnx"
    unet.write_bytes(unet.read_bytes()[:1000])
    started = time.monotonic()
    code = sdruntime_main(["serve", str(damaged), "--port", str(free_port())])
    assert code == 2 and time.monotonic() - started < 10
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"sdruntime: error: {unet} has 1000 bytes but the manifest records")
    code = sdruntime_main(["serve", str(damaged), "--port", str(free_port()), "--no-verify"])
    assert code == 2 and f"{unet} is not an ONNX model" in capsys.readouterr().err


def test_a_full_queue_answers_503_with_retry_after_at_once(server):
    # one replica holds 2 batches of 4; 8 more may wait; the rest of a burst of 40 is turned away
    body = {"prompt": PROMPT, "steps": 20, "size": "128x128"}
    started = time.monotonic()

    def timed(_) -> tuple[int, dict, bytes, float]:
        sent = time.monotonic()
        return (*generate(server, body), time.monotonic() - sent)

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(timed, range(40)))
    statuses = sorted(status for status, _, _, _ in answers)
    assert set(statuses) == {200, 503}, statuses
    for status, headers, payload, seconds in answers:
        if status == 503:  # refused at once, not after waiting its turn
            assert int(headers["retry-after"]) >= 1 and seconds < 2
            assert json.loads(payload)["error"]["message"] == "the queue is full: retry later"
    assert time.monotonic() - started < 60


def test_a_replica_killed_mid_request_fails_it_cleanly_and_is_replaced(server):
    [victim] = server.generator_pids()
    before = psutil.Process(victim).cpu_times().user
    answer: list = []
    worker = threading.Thread(
        target=lambda: answer.append(generate(server, {"prompt": PROMPT, "steps": 150, "size": "256x256", "n": 4}))
    )
    worker.start()
    deadline = time.monotonic() + 30
    while psutil.Process(victim).cpu_times().user - before < 0.5:  # drawing, not waiting
        assert time.monotonic() < deadline, "the replica never started drawing"
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    worker.join(60)
    assert answer, "the request in flight got no answer"
    status, headers, body = answer[0]
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["message"].startswith("the replica drawing this request stopped")
    server.wait_healthy()
    assert server.generator_pids() != [victim]
    assert generate(server, {"prompt": PROMPT, "seed": 1, "steps": 2})[0] == 200


@pytest.mark.slow  # a second server: 30-40 s
def test_a_request_past_the_timeout_gets_504_at_its_limit(tiny32, tmp_path):
    slow = Server(tiny32, tmp_path / "serve.log", "--timeout", "2")
    try:
        slow.wait_healthy()
        started = time.monotonic()
        status, _, body = generate(slow, {"prompt": PROMPT, "steps": 150, "size": "256x256"})  # about 10 s
        assert status == 504 and 2 <= time.monotonic() - started < 10
        assert json.loads(body)["error"]["message"] == "not drawn within the server's 2 s limit: retry later"
    finally:
        slow.stop()


@pytest.mark.slow  # a second server: 30-40 s
def test_a_shapes_replica_refuses_1024_within_its_budget_and_stays_up(shapes32, tmp_path):
    """The shipped model on a replica budget that its 1024x1024 would pass many times (the estimate: about
    26 GiB): 400 naming the largest size, then that size and the default one draw, and /health stays 200."""
    shapes = Server(shapes32, tmp_path / "serve.log", "--max-memory", "1GiB")
    try:
        shapes.wait_healthy()
        card = json.loads(request(shapes.url + "/v1/models")[2])["data"][0]
        side = int(card["largest_size"].split("x")[0])
        status, _, body = generate(shapes, {"prompt": PROMPT, "steps": 2, "size": "1024x1024"})
        message = json.loads(body)["error"]["message"]
        assert status == 400 and f"the largest that fits is {side}x{side}" in message
        assert request(shapes.url + "/health")[0] == 200
        for size in (f"{side}x{side}", "32x32"):
            status, _, png = generate_png(shapes, {"prompt": PROMPT, "seed": 0, "steps": 2, "size": size})
            assert status == 200, png
            assert Image.open(io.BytesIO(png)).size == tuple(map(int, size.split("x")))
        assert request(shapes.url + "/health")[0] == 200
    finally:
        shapes.stop()


# -- SD3 and Flux ------------------------------------------------------------------------------------

# A request with each family's own fields, and the same arguments as the Python API takes them
TRANSFORMER_REQUESTS = {
    "sd3": (
        "sd3_32",
        {
            "prompt_2": "a green field",
            "prompt_3": "under a grey sky",
            "negative_prompt": "blurry",
            "negative_prompt_3": "dark",
            "max_sequence_length": 32,
            "guidance": 4,
        },
    ),
    "flux": (
        "flux32",
        {
            "prompt_2": "a green field",
            "negative_prompt": "blurry",
            "negative_prompt_2": "dark",
            "true_cfg_scale": 2,
            "max_sequence_length": 32,
            "sigmas": [1.0, 0.6],
        },
    ),
}


def api_arguments(body: dict) -> dict:
    """A request body's fields as the Python API's arguments."""
    names = {"guidance": "guidance_scale", "steps": "num_inference_steps"}
    size = (
        {"height": int(body["size"].split("x")[1]), "width": int(body["size"].split("x")[0])} if "size" in body else {}
    )
    rest = {names.get(k, k): v for k, v in body.items() if k not in ("prompt", "size", "n", "response_format")}
    return {**rest, **size}


@pytest.fixture(scope="module", params=list(TRANSFORMER_REQUESTS))
def transformer_case(request):
    """(family, its pipeline, its facts, its request fields)."""
    export, fields = TRANSFORMER_REQUESTS[request.param]
    pipe = StableDiffusionPipeline.load(request.getfixturevalue(export))
    return request.param, pipe, model_facts(pipe), fields


def test_models_report_the_family_defaults_of_diffusers(transformer_case):
    """Steps and text-to-image guidance as StableDiffusion3Pipeline and FluxPipeline default them; a request
    without them runs those steps on the export's flow-matching scheduler."""
    import inspect

    diffusers = pytest.importorskip("diffusers")
    family, _, facts, _ = transformer_case
    pipeline = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[family]
    defaults = inspect.signature(pipeline.__call__).parameters
    card = facts.card()
    assert card["default_guidance"] == defaults["guidance_scale"].default
    assert card["default_steps"] == defaults["num_inference_steps"].default
    assert card["schedulers"] == ["flow-match-euler"] and card["default_scheduler"] == "flow-match-euler"
    request = parse_request({"prompt": PROMPT}, facts)
    assert request.steps == card["default_steps"] and request.scheduler == "flow-match-euler"
    assert request.guidance is None  # the plan's default, which differs by mode for Flux


def test_transformer_fields_draw_the_python_api_picture(transformer_case):
    """Each field reaches the pipeline: the served PNG is the Python API's picture and parameters for the same
    arguments, and two such requests share a batch and keep their pictures."""
    family, pipe, facts, fields = transformer_case
    bodies = [
        {"prompt": PROMPT, "seed": 4, "steps": 2, "size": "32x32", **fields},
        {"prompt": "a green star", "seed": 9, "steps": 2, "size": "32x32", **fields},
    ]
    if "sigmas" in fields:  # the sigmas set the steps
        bodies = [{k: v for k, v in body.items() if k != "steps"} for body in bodies]
    requests = [parse_request(body, facts) for body in bodies]
    results = draw_batch(pipe, requests, max_images=4)
    assert [[i.batch_images for i in r.images] for r in results] == [[2], [2]]
    for body, result in zip(bodies, results):
        alone = pipe(body["prompt"], **api_arguments(body))
        served = Image.open(io.BytesIO(result.images[0].png))
        assert np.array_equal(np.asarray(served), np.asarray(alone.images[0]))
        assert served.text["parameters"] == alone.parameters[0] and "Prompt 2: a green field" in alone.parameters[0]


@pytest.mark.parametrize("inpaint", [False, True], ids=["image-to-image", "inpainting"])
def test_transformer_image_inputs_draw_the_png_of_sdruntime_generate(
    transformer_case, inpaint_files, tmp_path, inpaint
):
    """SD3 and Flux image-to-image and inpainting through the server: the PNG `sdruntime generate` writes for the
    same files, seed, steps and strength, byte for byte; SD3 at its default size (not the image's), Flux at a
    given one (flux-tiny's default 256x256 gives its factor-2 VAE 16,384-token attention: gigabytes)."""
    family, pipe, facts, _ = transformer_case
    init, mask = inpaint_files[0], inpaint_files[1] if inpaint else None
    size = {"size": "48x32"} if family == "flux" else {}
    body = image_body(init, mask, seed=4, steps=2, strength=0.75, **size)
    [result] = draw_batch(pipe, [parse_request(body, facts)], 4)
    assert result.error is None
    assert Image.open(io.BytesIO(result.images[0].png)).size == ((48, 32) if size else (64, 64))
    out = tmp_path / "cli.png"
    masks = ["--mask", str(mask)] if inpaint else []
    sizes = ["--width", "48", "--height", "32"] if size else []
    options = [
        "--seed",
        "4",
        "--steps",
        "2",
        "--strength",
        "0.75",
        "--image",
        str(init),
        *masks,
        *sizes,
        "-o",
        str(out),
    ]
    assert sdruntime_main(["generate", str(pipe.folder), PROMPT, *options]) == 0
    assert result.images[0].png == out.read_bytes()
    assert ("Mask hash: " in result.images[0].parameters) == inpaint


UNET_REFUSED = {
    "prompt_2": "a cat",
    "prompt_3": "a cat",
    "negative_prompt_2": "a dog",
    "negative_prompt_3": "a dog",
    "max_sequence_length": 77,
    "true_cfg_scale": 2,
    "sigmas": [1.0, 0.5],
}


@pytest.mark.parametrize("field", list(UNET_REFUSED))
def test_transformer_fields_are_refused_on_a_unet_export(facts, field):
    takes = {"prompt_3": "SD3", "negative_prompt_3": "SD3", "true_cfg_scale": "Flux"}.get(field, "SD3 and Flux")
    with pytest.raises(InvalidArgument) as caught:
        parse_request({"prompt": PROMPT, field: UNET_REFUSED[field]}, facts)
    assert str(caught.value) == (
        f"'{field}' applies to {takes} exports; this {facts.family} export does not take it: leave it out"
    )


# Each family's bad requests: (body fields, the message's pattern)
BAD_TRANSFORMER_REQUESTS = {
    "sd3": [
        ({"true_cfg_scale": 2}, "'true_cfg_scale' applies to Flux exports; this sd3 export does not take it"),
        ({"sigmas": [1, 0.5], "steps": 3}, "'steps' 3 with 2 'sigmas': the sigmas set the steps"),
        ({"sigmas": []}, "'sigmas' must be a list of 1 to 150 numbers from 0 to 1, one per step"),
        ({"sigmas": [1, 2]}, "'sigmas' must be a list of 1 to 150 numbers from 0 to 1"),
        ({"sigmas": "1 0.5"}, "'sigmas' must be a list of 1 to 150 numbers"),
        ({"sigmas": [1, True]}, "'sigmas' must be a list of 1 to 150 numbers"),
        ({"scheduler": "ddim"}, "ddim serves epsilon/v-prediction .* models, not this flow-matching"),
    ],
    "flux": [
        ({"prompt_3": "a cat"}, "'prompt_3' applies to SD3 exports; this flux export does not take it"),
        ({"max_sequence_length": 0}, "'max_sequence_length' must be an integer from 1 to 512, got 0"),
        ({"max_sequence_length": 513}, "'max_sequence_length' must be an integer from 1 to 512, got 513"),
        ({"true_cfg_scale": -1}, "'true_cfg_scale' must be a number from 0 to 50, got -1"),
        ({"prompt_2": 3}, "'prompt_2' must be a string, got 3"),
        ({"scheduler_options": {"clip_sample": False}}, "flow-match-euler has no setting 'clip_sample'"),
    ],
}


def test_bad_transformer_requests_are_refused_in_one_line(transformer_case):
    family, _, facts, _ = transformer_case
    for body, message in BAD_TRANSFORMER_REQUESTS[family]:
        with pytest.raises(InvalidArgument, match=message) as caught:
            parse_request({"prompt": PROMPT, **body}, facts)
        assert "\n" not in str(caught.value)


def test_http_refuses_transformer_fields_on_a_unet_export(server):
    status, _, body = generate(server, {"prompt": PROMPT, "prompt_2": "a cat"})
    assert status == 400 and json.loads(body) == {
        "error": {
            "message": "'prompt_2' applies to SD3 and Flux exports; this sd1 export does not take it: leave it out",
            "type": "invalid_request_error",
            "param": "prompt_2",
            "code": "invalid_value",
        }
    }


@pytest.mark.slow  # a second server: 30-40 s
def test_http_draws_flux_as_the_python_api(flux32, tmp_path):
    """A Flux server: its card's defaults, and a request with Flux's fields answered with the Python API's PNG."""
    flux = Server(flux32, tmp_path / "serve.log")
    try:
        flux.wait_healthy()
        card = json.loads(request(flux.url + "/v1/models")[2])["data"][0]
        assert (card["family"], card["default_guidance"], card["default_steps"]) == ("flux", 3.5, 28)
        body = {"prompt": PROMPT, "seed": 2, "size": "32x32", **TRANSFORMER_REQUESTS["flux"][1]}
        status, headers, png = generate_png(flux, body)
        assert status == 200 and headers["x-seed"] == "2"
        alone = StableDiffusionPipeline.load(flux32)(PROMPT, **api_arguments(body))
        served = Image.open(io.BytesIO(png))
        assert np.array_equal(np.asarray(served), np.asarray(alone.images[0]))
        assert served.text["parameters"] == alone.parameters[0]
    finally:
        flux.stop()
