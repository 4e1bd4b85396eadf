"""Which decoder turns latents into pixels, and the previews of a run.

An export decodes with its VAE's decoder (`decoder="full"`) or, where `sdexport convert --tiny-vae FOLDER` put one
beside it, with a tiny decoder (`decoder="tiny"`: vae_decoder_tiny, a diffusers AutoencoderTiny of TAESD's family,
about 40 times fewer parameters than SD's VAE decoder). Each reads latents divided by its own config's
scaling_factor (1.0 for TAESD and TAESDXL, which decode the U-Net's latents as they are) and gives pixels in
[-1, 1], unclamped: diffusers' AutoencoderTiny.decode maps TAESD's [0, 1] output to [-1, 1] itself, and
StableDiffusion(XL)Pipeline treats a tiny VAE as it treats its own (`latents / vae.config.scaling_factor`, then
the image processor's `(x / 2 + 0.5).clamp(0, 1)`, which image.to_pil repeats). TAESD's latent_magnitude and
latent_shift only serve AutoencoderTiny.forward's 8-bit round trip, which no pipeline calls.

A VAE that is itself an AutoencoderTiny (`--vae` with a tiny VAE, PipelineFacts.vae_tiny) also encodes: its
encoder gives the latents themselves (diffusers' retrieve_latents reads `.latents`), with no distribution to
sample and so nothing drawn from the generator (`encode_tiny`).

Previews: with a tiny decoder, each step's latents are decoded into PIL images for a `preview_callback`
(`StepPreview`), at a few milliseconds a step where the full decoder would take seconds; the last step's
preview is the image `decoder="tiny"` gives. SD3's and Flux's 16-channel latents have no tiny decoder here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .image import to_pil
from .manifest import TINY_DECODER, PipelineFacts
from .request import GenerationError
from .result import StepCallback

if TYPE_CHECKING:
    from .session import Component

FULL, TINY = "full", "tiny"
DECODERS = (FULL, TINY)
FULL_DECODER = "vae_decoder"
TINY_VAE_HINT = "export one with `sdexport convert SOURCE -o OUT --tiny-vae FOLDER` (a diffusers AutoencoderTiny)"


def decoder_component(decoder: str, facts: PipelineFacts) -> str:
    """The component that decodes for `decoder` ("full" or "tiny"), checked against the export: GenerationError in
    one line for an unknown name, an export without a tiny decoder, or SD3's and Flux's 16-channel latents."""
    if decoder not in DECODERS:
        raise GenerationError(f"unknown decoder {decoder!r}: choose {' or '.join(DECODERS)}")
    if decoder == FULL:
        return FULL_DECODER
    if facts.transformer_family:
        raise GenerationError(
            f"decoder 'tiny' decodes SD 1.x/2.x and SDXL latents; this {facts.family} export's have "
            f"{facts.latent_channels} channels and no tiny decoder: draw with decoder 'full'"
        )
    if facts.tiny_vae_scaling_factor is None:
        raise GenerationError(f"this export has no tiny decoder (vae_decoder_tiny): {TINY_VAE_HINT}")
    return TINY_DECODER


def has_tiny_decoder(facts: PipelineFacts) -> bool:
    """Whether the export carries a tiny decoder (the manifest records its scaling factor with it)."""
    return facts.tiny_vae_scaling_factor is not None and not facts.transformer_family


def scaling_factor(component: str, facts: PipelineFacts) -> float:
    """What the decoder `component` divides latents by: the tiny decoder's own scaling factor, else the VAE's."""
    return float(facts.tiny_vae_scaling_factor if component == TINY_DECODER else facts.vae_scaling_factor)


def decode(decoder: Component, latents: np.ndarray, scaling: float, rows: int | None = None) -> np.ndarray:
    """Latents -> pixels in [-1, 1] (unclamped) through `decoder`, reading latents / scaling, `rows` images per
    run (all by default)."""
    scaled = (latents / np.float32(scaling)).astype(np.float32)
    rows = rows or len(scaled)
    pieces = [decoder(latent_sample=scaled[s : s + rows])["sample"] for s in range(0, len(scaled), rows)]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def encode_tiny(encoder: Component, image: np.ndarray, scaling: float) -> np.ndarray:
    """An AutoencoderTiny's latents of pixels in [-1, 1], times the scaling factor, as diffusers' img2img
    `prepare_latents` scales what retrieve_latents gives: nothing is sampled, no noise drawn."""
    return (encoder(sample=image)["latents"] * np.float32(scaling)).astype(np.float32)


@dataclass(frozen=True)
class StepPreview:
    """What a `preview_callback` gets after a denoising step."""

    step: int  # 0 for the first step run
    steps: int  # the steps this run takes (image-to-image runs the last ones of num_inference_steps)
    timestep: float
    latents: np.ndarray  # [images, channels, h, w], as `callback` gets them
    images: list[Image.Image] | None  # the latents through the tiny decoder; None: the export has no tiny decoder


PreviewCallback = Callable[[StepPreview], None]


class Previewer:
    """Each step's latents decoded by the tiny decoder into PIL images (None without one)."""

    def __init__(self, decoder: Component | None, scaling: float):
        self.decoder = decoder
        self.scaling = scaling

    @classmethod
    def of(cls, facts: PipelineFacts, component: Callable[[str], Component]) -> Previewer:
        """The export's previewer; `component` gives a session by name (the tiny decoder's is made on first use)."""
        if not has_tiny_decoder(facts):
            return cls(None, 1.0)
        return cls(component(TINY_DECODER), scaling_factor(TINY_DECODER, facts))

    def images(self, latents: np.ndarray) -> list[Image.Image] | None:
        if self.decoder is None:
            return None
        return to_pil(decode(self.decoder, latents, self.scaling))


def step_callback(
    callback: StepCallback | None,
    preview_callback: PreviewCallback | None,
    previewer: Callable[[], Previewer],
    steps: int,
    every: int = 1,
) -> StepCallback | None:
    """One `callback(step, timestep, latents)` for the denoising loop: the caller's, then every `every` steps and
    at the last one the preview callback with a StepPreview (`previewer` is asked for once, when first needed)."""
    if preview_callback is None:
        return callback
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise GenerationError(f"preview_every must be a positive integer, got {every!r}")
    made: list[Previewer] = []

    def on_step(step: int, timestep: float, latents: np.ndarray) -> None:
        if callback is not None:
            callback(step, timestep, latents)
        if (step + 1) % every and step != steps - 1:
            return
        if not made:
            made.append(previewer())
        preview_callback(StepPreview(step, steps, timestep, latents, made[0].images(latents)))

    return on_step
