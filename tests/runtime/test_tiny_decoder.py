"""Tiny decoders (decoders.py): `decoder="tiny"`, an export whose VAE is an AutoencoderTiny, per-step previews, the
CLI's --decoder and the server's `decoder` and `stream` fields, against diffusers with `pipe.vae = AutoencoderTiny`."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sdruntime.cli import main as sdruntime_main
from sdruntime.decoders import StepPreview, decode, decoder_component, encode_tiny
from sdruntime.errors import InvalidArgument
from sdruntime.image import to_pil
from sdruntime.manifest import TINY_DECODER, PipelineFacts, read_manifest
from sdruntime.pipeline import StableDiffusionPipeline
from sdruntime.request import GenerationError
from sdruntime.serving import draw_batch, draw_stream, model_facts, parse_request

PROMPT = "a red circle on a blue background"
DRAW = {"num_inference_steps": 4, "scheduler": "euler", "seed": 3}


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def diffusers_pipe(tiny_pipe, vae, img2img: bool = False):
    """tiny-sd's diffusers pipeline (the session's, unchanged) with `vae` in place of its VAE, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from diffusers import StableDiffusionPipeline as Reference

    scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    parts = {**tiny_pipe.components, "vae": vae, "scheduler": scheduler}
    pipe = (StableDiffusionImg2ImgPipeline if img2img else Reference)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_draw(pipe, seed: int = 3, **kwargs) -> Image.Image:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=4, generator=generator, **kwargs).images[0]


@pytest.fixture(scope="module")
def taesd():
    """The AutoencoderTiny tiny_taesd32 was exported with (the tiny-taesd preset)."""
    from sdexport.presets import build_tiny_vae_from_recipe, tiny_vae_presets

    return build_tiny_vae_from_recipe(tiny_vae_presets()["tiny-taesd"])


@pytest.fixture(scope="module")
def pipe(tiny_taesd32) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.load(tiny_taesd32)


def test_the_tiny_decoder_draws_diffusers_picture_with_that_tiny_vae(pipe, tiny_pipe, taesd):
    tiny = pipe(PROMPT, decoder="tiny", **DRAW)
    theirs = diffusers_draw(diffusers_pipe(tiny_pipe, taesd))
    assert psnr(tiny.images[0], theirs) >= 45.0, psnr(tiny.images[0], theirs)
    full = pipe(PROMPT, **DRAW)
    assert psnr(full.images[0], tiny.images[0]) < 20.0  # the option changes the picture
    assert np.array_equal(full.latents, tiny.latents)  # and only its decoding
    assert "Decoder: tiny" in tiny.parameters[0] and "Decoder" not in full.parameters[0]
    # a decoder reading the VAE's scaling factor (0.18215) instead of its own (1.0) would not pass
    wrong = to_pil(decode(pipe.component(TINY_DECODER), tiny.latents, pipe.manifest.pipeline.vae_scaling_factor))
    assert psnr(wrong[0], theirs) < 30.0


def test_previews_come_one_per_step_as_diffusers_decodes_them(pipe, taesd):
    previews: list[StepPreview] = []
    steps: list[tuple] = []
    result = pipe(
        PROMPT,
        decoder="tiny",
        num_images=2,
        callback=lambda step, t, latents: steps.append((step, t, latents.copy())),
        preview_callback=previews.append,
        **DRAW,
    )
    assert [p.step for p in previews] == [s for s, _, _ in steps] == [0, 1, 2, 3]
    assert {p.steps for p in previews} == {4} and all(len(p.images) == 2 for p in previews)
    assert [p.timestep for p in previews] == [t for _, t, _ in steps]
    for got, wanted in zip(previews[-1].images, result.images):  # the last preview is the tiny-decoded image
        assert np.array_equal(np.asarray(got), np.asarray(wanted))
    with torch.no_grad():  # each preview is the step's latents through diffusers' AutoencoderTiny
        decoded = taesd.decode(torch.from_numpy(steps[1][2]) / taesd.config.scaling_factor).sample.numpy()
    assert psnr(previews[1].images[1], to_pil(decoded)[1]) >= 45.0
    assert psnr(previews[0].images[0], previews[-1].images[0]) < 30.0  # the previews follow the denoising
    sparse: list[StepPreview] = []
    pipe(PROMPT, preview_callback=sparse.append, preview_every=3, **DRAW)
    assert [p.step for p in sparse] == [2, 3]  # every third step, and the last
    assert np.array_equal(np.asarray(sparse[-1].images[0]), np.asarray(previews[-1].images[0]))


def test_previews_of_an_export_without_a_tiny_decoder_have_no_images(tiny32):
    previews: list[StepPreview] = []
    StableDiffusionPipeline.load(tiny32)(PROMPT, preview_callback=previews.append, **DRAW)
    assert [(p.step, p.steps, p.images) for p in previews] == [(i, 4, None) for i in range(4)]


@pytest.fixture(scope="module")
def init_image(tmp_path_factory):
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(pixels).save(path)
    return path


def test_a_vae_replaced_by_a_tiny_vae_draws_diffusers_pictures(
    tiny_vae_replaced32, tiny_vae_folder, tiny_pipe, init_image
):
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(tiny_vae_folder)
    manifest = read_manifest(tiny_vae_replaced32)
    assert manifest.pipeline.vae_tiny and manifest.pipeline.vae_scaling_factor == 0.5
    ours = StableDiffusionPipeline.load(tiny_vae_replaced32)
    mine = ours(PROMPT, **DRAW).images[0]
    theirs = diffusers_draw(diffusers_pipe(tiny_pipe, vae))
    assert psnr(mine, theirs) >= 45.0, psnr(mine, theirs)
    # image-to-image through the tiny encoder: its latents, scaled, and no sample drawn from the generator
    mine = ours(PROMPT, image=str(init_image), strength=0.6, **DRAW).images[0]
    theirs = diffusers_draw(diffusers_pipe(tiny_pipe, vae, img2img=True), image=Image.open(init_image), strength=0.6)
    assert psnr(mine, theirs) >= 45.0, psnr(mine, theirs)


def test_the_tiny_encoder_gives_diffusers_latents_times_the_scaling_factor(tiny_vae_replaced32, tiny_vae_folder):
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(tiny_vae_folder)
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(image)).latents.numpy() * vae.config.scaling_factor
    encoder = StableDiffusionPipeline.load(tiny_vae_replaced32).component("vae_encoder")
    assert np.max(np.abs(encode_tiny(encoder, image, 0.5) - expected)) <= 1e-4
    assert np.max(np.abs(encode_tiny(encoder, image, 1.0) - expected)) > 0.1  # an unscaled encode would show


FACTS = PipelineFacts("sd1", "epsilon", 0.18215, 8, 4, 512, 512, 77, 49407, "PNDMScheduler")


@pytest.mark.parametrize(
    "decoder, facts, message",
    [
        ("tiny", FACTS, "this export has no tiny decoder (vae_decoder_tiny): export one with `sdexport convert"),
        ("small", FACTS, "unknown decoder 'small': choose full or tiny"),
        (
            "tiny",
            PipelineFacts("sd3", "flow", 1.5, 8, 16, 1024, 1024, 77, 49407, "X", tiny_vae_scaling_factor=1.0),
            "this sd3 export's have 16 channels and no tiny decoder: draw with decoder 'full'",
        ),
    ],
)
def test_decoders_an_export_lacks_are_refused_in_one_line(decoder, facts, message):
    with pytest.raises(GenerationError, match=re.escape(message)) as info:
        decoder_component(decoder, facts)
    assert "\n" not in str(info.value)


def test_the_python_api_refuses_tiny_without_a_tiny_decoder_and_bad_preview_steps(tiny32, pipe):
    with pytest.raises(GenerationError, match="--tiny-vae FOLDER"):
        StableDiffusionPipeline.load(tiny32)(PROMPT, decoder="tiny", **DRAW)
    with pytest.raises(GenerationError, match="preview_every must be a positive integer, got 0"):
        pipe(PROMPT, preview_callback=print, preview_every=0, **DRAW)


def test_generate_decoder_tiny_writes_the_python_api_png(tiny_taesd32, tiny32, pipe, tmp_path, capsys):
    out = tmp_path / "tiny.png"
    args = ["generate", str(tiny_taesd32), PROMPT, "--steps", "4", "--scheduler", "euler", "--seed", "3"]
    assert sdruntime_main([*args, "--decoder", "tiny", "-o", str(out)]) == 0
    expected = pipe(PROMPT, decoder="tiny", **DRAW)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))
    assert Image.open(out).text["parameters"] == expected.parameters[0]
    capsys.readouterr()
    code = sdruntime_main(["generate", str(tiny32), PROMPT, "--decoder", "tiny", "-o", str(tmp_path / "no.png")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "--tiny-vae FOLDER" in errors[0], errors
    assert not (tmp_path / "no.png").exists()


# -- the server's fields, without Ray ----------------------------------------------------------------------


def parse_events(text: str) -> list[tuple[str, dict]]:
    """Server-sent events as a client reads them: (event name, JSON data) per blank-line-separated block."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_served_decoder_tiny_draws_the_python_api_png(pipe, tiny32):
    facts = model_facts(pipe)
    assert facts.card()["decoders"] == ["full", "tiny"]
    body = {"prompt": PROMPT, "steps": 4, "scheduler": "euler", "seed": 3, "decoder": "tiny"}
    request = parse_request(body, facts)
    drawn = draw_batch(pipe, [request], 4)[0].images[0]
    expected = pipe(PROMPT, decoder="tiny", **DRAW)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(drawn.png))), np.asarray(expected.images[0]))
    assert request.batch_key != parse_request({**body, "decoder": "full"}, facts).batch_key
    plain = model_facts(StableDiffusionPipeline.load(tiny32))
    assert plain.card()["decoders"] == ["full"]
    with pytest.raises(InvalidArgument, match="this export has no tiny decoder: leave out 'decoder', or export one"):
        parse_request(body, plain)
    with pytest.raises(InvalidArgument, match="unknown decoder 'huge': choose full or tiny"):
        parse_request({**body, "decoder": "huge"}, facts)


def test_a_streamed_request_sends_a_preview_per_step_then_the_b64_json_answer(pipe):
    facts = model_facts(pipe)
    body = {"prompt": PROMPT, "steps": 4, "scheduler": "euler", "seed": 3, "n": 2, "stream": True}
    request = parse_request(body, facts)
    assert request.stream and request.response_format == "b64_json" and request.batch_key is None
    sent: list = []
    draw_stream(pipe, request, sent.append)
    assert sent[-1] is None
    events = parse_events("".join(sent[:-1]))
    assert [name for name, _ in events] == ["progress"] * 4 + ["result"]
    assert [(data["step"], data["steps"], len(data["previews"])) for _, data in events[:4]] == [
        (i, 4, 2) for i in (1, 2, 3, 4)
    ]
    plain = draw_batch(pipe, [parse_request({**body, "stream": False}, facts)], 4)[0]
    result = events[-1][1]["data"]
    assert [base64.b64decode(d["b64_json"]) for d in result] == [i.png for i in plain.images]
    assert [d["seed"] for d in result] == [3, 4]
    tiny = pipe(PROMPT, decoder="tiny", seed=[3, 4], num_inference_steps=4, scheduler="euler", num_images=2)
    last = [Image.open(io.BytesIO(base64.b64decode(p))) for p in events[3][1]["previews"]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(last, tiny.images))
    with pytest.raises(InvalidArgument, match="a streamed response carries its images as b64_json"):
        parse_request({**body, "n": 1, "response_format": "png"}, facts)
    with pytest.raises(InvalidArgument, match="'stream' must be true or false"):
        parse_request({**body, "stream": "yes"}, facts)


def test_a_streamed_request_the_runtime_refuses_ends_with_an_error_event(pipe):
    request = parse_request({"prompt": PROMPT, "steps": 2, "stream": True, "scheduler": "ddim"}, model_facts(pipe))
    sent: list = []
    draw_stream(pipe, dataclasses.replace(request, decoder="small"), sent.append)
    ((name, data),) = parse_events("".join(sent[:-1]))
    assert name == "error" and data["error"]["type"] == "invalid_request_error"
    assert "unknown decoder 'small'" in data["error"]["message"]


def test_sd3_takes_preview_callbacks_and_refuses_the_tiny_decoder(sd3_32):
    pipe = StableDiffusionPipeline.load(sd3_32)
    previews: list[StepPreview] = []
    pipe(PROMPT, num_inference_steps=2, seed=0, height=32, width=32, preview_callback=previews.append)
    assert [(p.step, p.steps, p.images) for p in previews] == [(0, 2, None), (1, 2, None)]
    with pytest.raises(GenerationError, match="this sd3 export's have 16 channels and no tiny decoder"):
        pipe(PROMPT, num_inference_steps=2, height=32, width=32, decoder="tiny")


def test_the_decoder_benchmark_times_both_decoders(tiny_taesd32):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_decoders import run

    result = run(tiny_taesd32, size=64, batch=1, rounds=2, provider="cpu", threads=1)
    assert set(result["median_seconds"]) == {"vae_decoder", "vae_decoder_tiny"}
    assert all(len(times) == 2 and min(times) > 0 for times in result["seconds"].values())
    assert result["provider"] == "CPUExecutionProvider" and result["dtype"] == "fp32"


def test_served_sd3_and_flux_refuse_the_tiny_decoder_in_one_line():
    from sdruntime.serving import ModelFacts

    for family, name in (("sd3", "SD3"), ("flux", "Flux")):
        facts = ModelFacts("m", family, "fp32", "generic", (64, 64), 16, None, "flow-match-euler", 7.0, 28, "h", "s")
        with pytest.raises(InvalidArgument, match=f"^{name} exports have no tiny decoder: leave out 'decoder'$"):
            parse_request({"prompt": PROMPT, "decoder": "tiny"}, facts)
