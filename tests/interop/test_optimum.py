"""optimum's ORTStableDiffusionPipeline loads our exported folder and draws the same picture."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sdruntime import StableDiffusionPipeline


def test_optimum_runs_our_export(tiny32):
    optimum = pytest.importorskip("optimum.onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = optimum.ORTStableDiffusionPipeline.from_pretrained(str(tiny32))
        theirs = pipe(
            "a red circle on a blue background",
            num_inference_steps=5,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(8),
        ).images[0]
    ours = StableDiffusionPipeline.load(tiny32)(
        "a red circle on a blue background", num_inference_steps=5, guidance_scale=7.5, seed=8
    ).images[0]
    a, b = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    assert a.shape == b.shape == (64, 64, 3)
    mse = np.mean((a - b) ** 2)
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 45.0


def test_optimum_inpaints_with_our_inpainting_export(tiny_inpaint32):
    """The export's model_index names ORTStableDiffusionInpaintPipeline, which optimum's generic loader picks."""
    import json

    from PIL import Image

    optimum = pytest.importorskip("optimum.onnxruntime")
    index = json.loads((tiny_inpaint32 / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionInpaintPipeline"
    y, x = np.mgrid[0:64, 0:64]
    image = Image.fromarray(np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8))
    mask = Image.fromarray((((x > 16) & (y > 20)) * 255).astype(np.uint8))
    args = {"num_inference_steps": 5, "guidance_scale": 7.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = optimum.ORTStableDiffusionInpaintPipeline.from_pretrained(str(tiny_inpaint32))
        theirs = pipe(
            "a red circle", image=image, mask_image=mask, generator=torch.Generator("cpu").manual_seed(3), **args
        ).images[0]
    ours = StableDiffusionPipeline.load(tiny_inpaint32)("a red circle", image=image, mask_image=mask, seed=3, **args)
    a, b = np.asarray(theirs, np.float64), np.asarray(ours.images[0], np.float64)
    mse = np.mean((a - b) ** 2)
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 45.0


@pytest.mark.parametrize(
    ("export", "source", "pipeline_class", "options"),
    [
        ("sd3_32", "sd3_pipe", "ORTStableDiffusion3Pipeline", {"guidance_scale": 5.0, "negative_prompt": "blurry"}),
        ("flux32", "flux_pipe", "ORTFluxPipeline", {"guidance_scale": 3.5, "max_sequence_length": 64}),
    ],
)
def test_optimum_runs_our_transformer_exports(export, source, pipeline_class, options, request):
    """optimum's SD3 and Flux pipelines load our export and draw what diffusers draws from the source."""
    optimum = pytest.importorskip("optimum.onnxruntime")
    out, source = request.getfixturevalue(export), request.getfixturevalue(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(optimum, pipeline_class).from_pretrained(str(out))
        args = {"prompt": "a red circle", "num_inference_steps": 3, "height": 32, "width": 48, **options}
        theirs = pipe(generator=torch.Generator("cpu").manual_seed(4), **args).images[0]
        reference = source(generator=torch.Generator("cpu").manual_seed(4), **args).images[0]
        other = source(generator=torch.Generator("cpu").manual_seed(5), **args).images[0]
    a, b, c = (np.asarray(x, np.float64) for x in (theirs, reference, other))
    assert a.shape == (32, 48, 3)

    def psnr(x, y):
        mse = np.mean((x - y) ** 2)
        return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    assert psnr(a, b) >= 45.0
    assert psnr(c, b) < 45.0  # another seed draws another picture: the comparison can fail


@pytest.mark.parametrize("mode", ["Img2Img", "Inpaint"])
def test_optimum_sd3_image_pipelines_run_our_export(mode, sd3_32, sd3_pipe):
    """optimum's SD3 image-to-image and inpainting pipelines load the same export and draw what diffusers'
    do from the source (both decode as diffusers 0.39 does, SD3 inpainting without the VAE's shift)."""
    import diffusers
    from PIL import Image

    optimum = pytest.importorskip("optimum.onnxruntime")
    y, x = np.mgrid[0:32, 0:48]
    image = Image.fromarray(np.stack([x * 5, y * 7, 255 - (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8))
    args = {"prompt": "a red circle", "image": image, "num_inference_steps": 4, "height": 32, "width": 48}
    if mode == "Inpaint":
        args["mask_image"] = Image.fromarray((((x > 12) & (y > 8)) * 255).astype(np.uint8))
    reference_class = getattr(diffusers, f"StableDiffusion3{mode}Pipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(optimum, f"ORTStableDiffusion3{mode}Pipeline").from_pretrained(str(sd3_32))
        source = reference_class(**sd3_pipe.components)
        theirs = pipe(generator=torch.Generator("cpu").manual_seed(6), **args).images[0]
        reference = source(generator=torch.Generator("cpu").manual_seed(6), **args).images[0]
        other = source(generator=torch.Generator("cpu").manual_seed(7), **args).images[0]
    a, b, c = (np.asarray(x, np.float64) for x in (theirs, reference, other))
    assert a.shape == (32, 48, 3)
    assert 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)) >= 45.0
    assert 10 * np.log10(255.0**2 / max(np.mean((c - b) ** 2), 1e-12)) < 45.0
