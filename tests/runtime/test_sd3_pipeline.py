"""The runtime on SD3 exports against diffusers' StableDiffusion3(Img2Img|Inpaint)Pipeline (fp32, CPU): same prompts,
same seeds, same picture. The exports and the reference pipeline are session fixtures in tests/conftest.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdruntime import StableDiffusionPipeline  # noqa: E402
from sdruntime.errors import InvalidArgument  # noqa: E402
from sdruntime.request import GenerationError, GenerationRequest  # noqa: E402
from sdruntime.transformer_pipeline import TransformerPipeline  # noqa: E402

from .test_pipeline import psnr  # noqa: E402

PROMPT = "a red circle on a blue background"
SIZE = {"height": 32, "width": 32}
STEPS = 3


LATENT_ATOL = 1e-4  # ours vs diffusers' final latents differ by < 5e-6 here; every option tested moves them > 1e-2


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@dataclass
class Drawn:
    latents: np.ndarray  # [B, C, h, w], before the VAE's scaling and shift
    images: list[Image.Image]


def draw(pipe, cls=None, **kwargs) -> Drawn:
    """diffusers' final latents from `pipe`'s modules, drawn by `cls` (default: the pipeline itself), and their
    pictures: the VAE decodes latents / scaling + shift, as every SD3 and Flux pipeline of diffusers does but SD3's
    inpainting one (issue 13611). Flux's packed latents are unpacked with diffusers' own `_unpack_latents`."""
    ref = pipe if cls is None else cls(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    latents = ref(output_type="latent", **kwargs).images
    if latents.ndim == 3:
        latents = ref._unpack_latents(latents, kwargs["height"], kwargs["width"], ref.vae_scale_factor)
    vae = ref.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return Drawn(latents.numpy(), ref.image_processor.postprocess(decoded))


def assert_matches(theirs: Drawn, mine) -> None:
    """Same latents to float32 rounding, same pictures to 45 dB and more."""
    np.testing.assert_allclose(mine.latents, theirs.latents, rtol=0, atol=LATENT_ATOL)
    assert len(mine.images) == len(theirs.images)
    for a, b in zip(theirs.images, mine.images):
        assert psnr(a, b) >= 45.0


def differ(a, b) -> bool:
    """Whether two results' latents differ by far more than ours and diffusers' do."""
    return float(np.abs(a.latents - b.latents).max()) > 100 * LATENT_ATOL


@pytest.fixture(scope="module")
def ours(sd3_32) -> TransformerPipeline:
    return StableDiffusionPipeline.load(sd3_32)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 8, 255 - (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def mask_image() -> Image.Image:
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 12:40] = 255
    return Image.fromarray(mask)


def test_text_to_image_with_guidance_matches_diffusers(sd3_pipe, ours):
    assert isinstance(ours, TransformerPipeline)  # StableDiffusionPipeline.load chose it from the manifest
    args = {"prompt": PROMPT, "num_inference_steps": STEPS, **SIZE}
    own = sd3_pipe(generator=seeded(3), **args).images[0]  # the pipeline's own decoding: draw() decodes the same
    theirs = draw(sd3_pipe, generator=seeded(3), **args)
    mine = ours(seed=3, **args)
    assert_matches(theirs, mine)
    assert psnr(own, mine.images[0]) >= 45.0
    assert mine.latents.shape == (1, 16, 16, 16)
    assert "CFG scale: 7," in mine.parameters[0]  # diffusers' default guidance
    assert differ(ours(**{**args, "prompt": "a green square"}, seed=3), mine)
    assert differ(ours(seed=4, **args), mine)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"negative_prompt": "blurry, green"},
        {
            "prompt_2": "a blue dog",
            "prompt_3": "a green bird in a tree",
            "negative_prompt": "blurry",
            "negative_prompt_2": "dark",
            "negative_prompt_3": "grainy",
        },
        {"height": 24, "width": 48},
        {"clip_skip": 2},
        {"max_sequence_length": 77},
        {"guidance_scale": 1.0},
        {"sigmas": [1.0, 0.7, 0.4]},
    ],
    ids=["negative", "prompts-per-encoder", "non-square", "clip-skip", "t5-77", "no-cfg", "sigmas"],
)
def test_options_match_diffusers(sd3_pipe, ours, kwargs):
    args = {"prompt": PROMPT, "num_inference_steps": STEPS, **SIZE, **kwargs}
    theirs = draw(sd3_pipe, generator=seeded(5), **args)
    mine = ours(seed=5, **args)
    assert mine.images[0].size == (args["width"], args["height"])
    assert_matches(theirs, mine)
    if "height" not in kwargs:
        assert differ(ours(PROMPT, num_inference_steps=STEPS, seed=5, **SIZE), mine)  # the option counts


def test_without_t5_matches_diffusers_zeros(sd3_pipe, ours, sd3_no_t5_32):
    """An export without text_encoder_3 draws as diffusers does with text_encoder_3=None: zeros for T5's states."""
    no_t5 = StableDiffusionPipeline.load(sd3_no_t5_32)
    assert no_t5.encoders == ("text_encoder", "text_encoder_2")
    cls = diffusers.StableDiffusion3Pipeline
    parts = {**sd3_pipe.components, "text_encoder_3": None, "tokenizer_3": None}
    args = {"prompt": PROMPT, "num_inference_steps": STEPS, "negative_prompt": "blurry", **SIZE}
    theirs = draw(cls(**parts), generator=seeded(6), **args)
    mine = no_t5(seed=6, **args)
    assert_matches(theirs, mine)
    assert differ(ours(seed=6, **args), mine)  # T5's states do count where they exist


def test_per_image_seeds_match_diffusers_generators(sd3_pipe, ours):
    args = {"prompt": PROMPT, "num_inference_steps": STEPS, **SIZE}
    theirs = draw(sd3_pipe, num_images_per_prompt=2, generator=[seeded(11), seeded(12)], **args)
    mine = ours(num_images=2, seed=[11, 12], **args)
    assert_matches(theirs, mine)
    assert mine.seeds == [11, 12] and "Seed: 12" in mine.parameters[1]
    assert psnr(mine.images[0], mine.images[1]) < 35.0
    np.testing.assert_allclose(ours(seed=12, **args).latents[0], mine.latents[1], rtol=0, atol=LATENT_ATOL)


def test_image_to_image_matches_diffusers(sd3_pipe, ours, init_image):
    """Default strength 0.6 as StableDiffusion3Img2ImgPipeline: 4 steps enter at index 1."""
    cls = diffusers.StableDiffusion3Img2ImgPipeline
    args = {"prompt": PROMPT, "image": init_image, "num_inference_steps": 4, "height": 32, "width": 48}
    theirs = draw(sd3_pipe, cls, generator=seeded(7), **args)
    mine = ours(seed=7, **args)
    assert_matches(theirs, mine)
    assert "Denoising strength: 0.6" in mine.parameters[0]
    assert differ(ours(seed=7, strength=0.9, **args), mine)


def test_image_to_image_per_image_seeds_encode_each_copy(sd3_pipe, ours, init_image):
    """diffusers fails on one image with a generator per image; given the image once per image, it encodes each
    copy with its own generator, which is what the runtime does."""
    cls = diffusers.StableDiffusion3Img2ImgPipeline
    args = {"num_inference_steps": 4, "height": 32, "width": 48}
    generators = [seeded(11), seeded(12)]
    theirs = draw(sd3_pipe, cls, prompt=[PROMPT] * 2, image=[init_image] * 2, generator=generators, **args)
    assert_matches(theirs, ours(PROMPT, image=init_image, num_images=2, seed=[11, 12], **args))


@pytest.mark.parametrize("strength", [None, 1.0], ids=["default-strength", "from-noise"])
def test_inpainting_matches_diffusers(sd3_pipe, ours, init_image, mask_image, strength):
    """StableDiffusion3InpaintPipeline's latents and their pictures, decoded with the VAE's shift as its other
    pipelines decode (its own decoding leaves the shift out, diffusers issue 13611)."""
    cls = diffusers.StableDiffusion3InpaintPipeline
    args = {"prompt": PROMPT, "image": init_image, "num_inference_steps": 4, "height": 32, "width": 48}
    if strength is not None:
        args["strength"] = strength
    theirs = draw(sd3_pipe, cls, mask_image=mask_image, generator=seeded(8), **args)
    mine = ours(mask_image=mask_image, seed=8, **args)
    assert_matches(theirs, mine)
    assert differ(ours(seed=8, **args), mine)  # the mask changed the picture


def test_given_latents_match_diffusers(sd3_pipe, ours):
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32)
    args = {"prompt": PROMPT, "num_inference_steps": STEPS, **SIZE}
    assert_matches(draw(sd3_pipe, latents=torch.from_numpy(noise), **args), ours(latents=noise, **args))


def test_callback_sees_diffusers_timesteps(sd3_pipe, ours):
    seen, theirs = [], []

    def record(pipe, i, t, kwargs):
        theirs.append(float(t))
        return kwargs

    sd3_pipe(PROMPT, num_inference_steps=STEPS, callback_on_step_end=record, output_type="latent", **SIZE)
    result = ours(PROMPT, num_inference_steps=STEPS, seed=1, callback=lambda *a: seen.append(a), **SIZE)
    assert [step for step, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == pytest.approx(theirs, rel=1e-6)
    np.testing.assert_array_equal(seen[-1][2], result.latents)


@pytest.mark.parametrize(
    ("request_args", "error", "match"),
    [
        ({"height": 30}, GenerationError, "multiple of 4"),
        ({"max_sequence_length": 600}, GenerationError, "max_sequence_length must be an integer from 1 to 512"),
        ({"true_cfg_scale": 2.0}, GenerationError, "sd3 export does not take true_cfg_scale"),
        ({"guess_mode": True}, GenerationError, "does not take ControlNets"),
        ({"eta": 0.5}, GenerationError, "does not take eta"),
        ({"scheduler": "euler"}, InvalidArgument, "euler serves epsilon"),
        ({"image": Image.new("RGB", (8, 8)), "strength": 1.5}, GenerationError, "strength must be in"),
    ],
    ids=["size", "t5-length", "true-cfg", "controlnet", "eta", "scheduler", "strength"],
)
def test_bad_requests_are_refused_in_one_line(ours, request_args, error, match):
    with pytest.raises(error, match=match) as caught:
        ours.generate(GenerationRequest(PROMPT, **{"num_inference_steps": STEPS, **request_args}))
    assert "\n" not in str(caught.value)


def test_each_images_parameters_name_its_own_other_prompts(ours):
    """With a list of prompts and one prompt_2 per prompt, each image's parameters text names its own prompt_2
    (what draws it again alone), not the list."""
    result = ours(
        ["a red circle", "a blue square"],
        prompt_2=["green", "yellow"],
        negative_prompt_3=["dark", "blurry"],
        num_inference_steps=2,
        height=32,
        width=32,
        seed=[1, 2],
    )
    first, second = result.parameters
    assert "Prompt 2: green" in first and "Negative prompt 3: dark" in first and "yellow" not in first
    assert "Prompt 2: yellow" in second and "Negative prompt 3: blurry" in second and "[" not in second
