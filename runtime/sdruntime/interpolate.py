"""Walks between prompts: spherical interpolation of the starting noise, linear of the text embeddings.

Pairwise (A to B in N frames) and bilinear (a grid whose four corners are four prompts).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .manifest import TRANSFORMER_FAMILIES, latent_shape
from .noise import TorchGenerator
from .request import GenerationError, GenerationRequest


def slerp(t: float, a: np.ndarray, b: np.ndarray, dot_threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation of two noise tensors; linear when they are almost parallel."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = float(np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64)))
    if abs(cos) > dot_threshold:
        out = (1 - t) * a64 + t * b64
    else:
        theta = np.arccos(cos)
        out = (np.sin((1 - t) * theta) * a64 + np.sin(t * theta) * b64) / np.sin(theta)
    return out.reshape(a.shape).astype(np.float32)


def _noise(pipe, seed: int, height: int, width: int) -> np.ndarray:
    return TorchGenerator(seed).randn(latent_shape(pipe.manifest.pipeline, 1, height, width))


def _size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The frames' (height, width): as asked, else the export's default size."""
    default_height, default_width = pipe.export.sizes.default
    return height or default_height, width or default_width


def check_walkable(family: str) -> None:
    """A walk hands the pipeline its own prompt embeddings, which only SD 1.x/2.x exports take: SDXL's need pooled
    ones too, SD3's and Flux's pipelines take prompts alone."""
    if family == "sdxl":
        raise GenerationError("interpolate walks SD 1.x/2.x text embeddings; SDXL's pooled ones are not handled yet")
    if family in TRANSFORMER_FAMILIES:
        raise GenerationError(
            f"interpolate walks SD 1.x/2.x text embeddings; this {family} export's (CLIP and T5 states) are not "
            "handled: draw single images with `sdruntime generate`"
        )


def _cond(pipe, prompt: str) -> np.ndarray:
    return pipe.encode_prompt([prompt], None, 1)


def _frame(pipe, noise: np.ndarray, embeds: np.ndarray, label: str, seed: int, walk: str, **kwargs) -> Image.Image:
    """One image from given starting noise and prompt embeddings (noise is scaled by init_noise_sigma inside);
    `seed` draws the noise the steps add (ancestral schedulers). The image's info["parameters"] says how it was
    made: `label` (which prompts, at which weights) stands where a prompt would."""
    result = pipe.generate(GenerationRequest(None, latents=noise, prompt_embeds=embeds, seed=seed, **kwargs))
    image = result.images[0]
    image.info["parameters"] = f"{label}{result.parameters[0]}, Interpolation: {walk}"
    return image


def pairwise(
    pipe,
    prompt_a: str,
    prompt_b: str,
    frames: int,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    **kwargs,
) -> list[Image.Image]:
    """N frames from A to B; starting noise from `seed` (A) and `seed + 1` (B), the steps' noise from `seed`."""
    check_walkable(pipe.manifest.pipeline.family)
    height, width = _size(pipe, height, width)
    noise_a, noise_b = _noise(pipe, seed, height, width), _noise(pipe, seed + 1, height, width)
    cond_a, cond_b = _cond(pipe, prompt_a), _cond(pipe, prompt_b)
    images = []
    for t in np.linspace(0.0, 1.0, frames):
        embeds = (1 - t) * cond_a + t * cond_b
        label = f"{prompt_a} -> {prompt_b} ({t:.2f})"
        walk = f"pairwise t={t:.2f} of noise seeds {seed} and {seed + 1}"
        images.append(
            _frame(pipe, slerp(t, noise_a, noise_b), embeds, label, seed, walk, height=height, width=width, **kwargs)
        )
    return images


def bilinear(
    pipe, corners: list[str], size: int, seed: int = 0, height: int | None = None, width: int | None = None, **kwargs
) -> list[Image.Image]:
    """A size x size grid, row by row; corners are top-left, top-right, bottom-left, bottom-right.

    Corner k starts from the noise of `seed + k`; inner noise is slerped along rows, then columns. The steps'
    noise comes from `seed`.
    """
    check_walkable(pipe.manifest.pipeline.family)
    height, width = _size(pipe, height, width)
    noises = [_noise(pipe, seed + k, height, width) for k in range(4)]
    conds = [_cond(pipe, p) for p in corners]
    images = []
    for v in np.linspace(0.0, 1.0, size):
        for u in np.linspace(0.0, 1.0, size):
            top, bottom = slerp(u, noises[0], noises[1]), slerp(u, noises[2], noises[3])
            noise = slerp(v, top, bottom)
            embeds = (1 - u) * (1 - v) * conds[0] + u * (1 - v) * conds[1] + (1 - u) * v * conds[2] + u * v * conds[3]
            label = f"bilinear({u:.2f}, {v:.2f}) of {' | '.join(corners)}"
            walk = f"bilinear u={u:.2f} v={v:.2f} of noise seeds {seed} to {seed + 3}"
            images.append(_frame(pipe, noise, embeds, label, seed, walk, height=height, width=width, **kwargs))
    return images
