"""Inpainting, as diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline do it: the mask,
binarized and resized to the latents, and what the denoising loop does with it (a 9-channel U-Net's extra input
channels, or a 4-channel U-Net's blend of the kept region back after each step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image import open_image
from .schedulers import Scheduler


def load_mask(mask: str | Path | Image.Image, width: int, height: int) -> np.ndarray:
    """A path or PIL image -> [1, 1, H, W] float32 of 0 (keep) and 1 (repaint), as diffusers' mask processor
    makes it: resized (Lanczos) before it turns grayscale, then binarized at 0.5."""
    gray = open_image(mask, "mask image").resize((width, height), resample=Image.LANCZOS).convert("L")
    values = np.asarray(gray).astype(np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)[None, None]


def mask_to_latents(mask: np.ndarray, factor: int) -> np.ndarray:
    """The mask at the latents' size, as torch's F.interpolate in its default "nearest" mode picks pixels."""
    height, width = mask.shape[-2] // factor, mask.shape[-1] // factor
    rows = np.floor(np.arange(height, dtype=np.float32) * np.float32(mask.shape[-2] / height)).astype(np.int64)
    cols = np.floor(np.arange(width, dtype=np.float32) * np.float32(mask.shape[-1] / width)).astype(np.int64)
    return mask[:, :, rows][:, :, :, cols]


@dataclass(frozen=True, eq=False)
class Inpainting:
    """What the denoising loop reads to inpaint: per image, the latent-size mask and the masked image's latents;
    for a U-Net that takes them as input channels (`concatenated`) or, for a plain U-Net, the init image's
    latents and the starting noise that the kept region is noised back to after each step."""

    mask: np.ndarray  # [batch, 1, h, w], 1 where the picture is repainted
    masked_image_latents: np.ndarray  # [batch, latent channels, h, w], scaled
    concatenated: bool  # a 9-channel U-Net: cat([latents, mask, masked image latents]) is its sample
    image_latents: np.ndarray | None = None  # a plain U-Net's: the init image's latents, scaled
    noise: np.ndarray | None = None  # a plain U-Net's: the noise the run started from

    def unet_sample(self, model_input: np.ndarray) -> np.ndarray:
        """The U-Net's sample from the scaled latents (already doubled when the guidance doubles the batch)."""
        if not self.concatenated:
            return model_input
        copies = len(model_input) // len(self.mask)
        mask = np.concatenate([self.mask] * copies)
        masked = np.concatenate([self.masked_image_latents] * copies)
        return np.concatenate([model_input, mask, masked], axis=1).astype(np.float32)

    def after_step(self, latents: np.ndarray, scheduler: Scheduler, i: int) -> np.ndarray:
        """A plain U-Net's latents after step i: the kept region replaced by the init image's latents, noised to
        the next step's level (none after the last step)."""
        if self.concatenated:
            return latents
        kept = self.image_latents
        if i + 1 < len(scheduler.timesteps):
            kept = scheduler.add_noise(kept, self.noise, i + 1)
        return ((1 - self.mask) * kept + self.mask * latents).astype(np.float32)
