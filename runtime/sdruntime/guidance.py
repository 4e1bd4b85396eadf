"""How the guidance scale steers the U-Net, decided once per request (`choose_guidance`).

- `NoGuidance`: the prompt alone (a scale of 1 or less, as diffusers turns classifier-free guidance off).
- `ClassifierFreeGuidance`: the U-Net sees each image twice, with the negative prompt and with the prompt,
  and the two predictions combine as uncond + scale * (cond - uncond).
- `EmbeddedGuidance`: an LCM-distilled U-Net takes the scale as an input (`timestep_cond`) instead.

Each one says which negative prompts to encode, how large the U-Net's batch is, SDXL's `time_ids` rows,
its fixed extra inputs, and how a U-Net output becomes one noise prediction per image.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .conditioning import MicroConditioning, Size, guidance_scale_embedding, img2img_time_ids, txt2img_time_ids


@dataclass(frozen=True)
class Guidance:
    """A guidance mode; what it does not override is what no guidance does."""

    scale: float  # the guidance_scale asked for (recorded as "CFG scale" whatever the mode)
    doubles_batch: ClassVar[bool] = False  # whether the U-Net sees [negatives..., prompts...]

    def negative_prompts(self, given: Sequence[str] | None, count: int) -> list[str] | None:
        """The negative prompts to encode, one per prompt, or None when none is encoded."""
        return None

    def unet_batch_size(self, images: int) -> int:
        return 2 * images if self.doubles_batch else images

    def unet_sample(self, latents: np.ndarray) -> np.ndarray:
        """The U-Net's `sample` for the current latents."""
        return np.concatenate([latents] * 2) if self.doubles_batch else latents

    def time_ids(
        self, micro: MicroConditioning, size: Size, images: int, *, image_to_image: bool, aesthetic: bool
    ) -> np.ndarray:
        """SDXL's time_ids: a row per image, and the negative rows too when the batch doubles."""
        if image_to_image:
            return img2img_time_ids(micro, size, images, self.doubles_batch, aesthetic)
        return txt2img_time_ids(micro, size, images, self.doubles_batch)

    def fixed_inputs(self, images: int) -> dict[str, np.ndarray]:
        """U-Net inputs of its own that stay the same at every step."""
        return {}

    def combine(self, noise_pred: np.ndarray) -> np.ndarray:
        """One noise prediction per image from the U-Net's output."""
        return noise_pred


@dataclass(frozen=True)
class NoGuidance(Guidance):
    """The prompt alone steers: one U-Net batch, no negative prompts."""


@dataclass(frozen=True)
class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance (arXiv:2207.12598): unconditional and conditional halves in one batch."""

    doubles_batch: ClassVar[bool] = True

    def negative_prompts(self, given: Sequence[str] | None, count: int) -> list[str] | None:
        return list(given) if given is not None else [""] * count

    def combine(self, noise_pred: np.ndarray) -> np.ndarray:
        uncond, cond = np.split(noise_pred, 2)
        return uncond + np.float32(self.scale) * (cond - uncond)


@dataclass(frozen=True)
class EmbeddedGuidance(Guidance):
    """An LCM-distilled U-Net's guidance: w - 1 embedded as `timestep_cond` (arXiv:2310.04378), one batch."""

    embedding_dim: int = 0

    def fixed_inputs(self, images: int) -> dict[str, np.ndarray]:
        return {"timestep_cond": guidance_scale_embedding([self.scale - 1.0] * images, self.embedding_dim)}


def choose_guidance(scale: float, embedding_dim: int | None, negative_prompt_given: bool) -> Guidance:
    """The mode for a guidance scale: embedded for an LCM U-Net (`embedding_dim`, its time_cond_proj_dim),
    else classifier-free above 1, else none (with a warning where the caller may expect guidance)."""
    if embedding_dim is not None:
        return EmbeddedGuidance(scale, embedding_dim)
    if scale < 1.0 or (scale == 1.0 and negative_prompt_given):
        warnings.warn(
            f"guidance_scale {scale:g} <= 1 turns classifier-free guidance off, as in diffusers: the "
            "prompt alone steers and the negative prompt is unused; use a value above 1 to guide",
            stacklevel=4,
        )
    return ClassifierFreeGuidance(scale) if scale > 1.0 else NoGuidance(scale)
