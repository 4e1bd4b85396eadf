"""Flux's latent layout: 2x2 patches packed into channels, and the rotary positions of the packed tokens, as
diffusers' FluxPipeline builds them (`_pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids`).

The transformer reads latents [B, C, h, w] as (h/2)(w/2) tokens of 4C numbers, each token holding one 2x2 patch
channel by channel (c, row, column); `img_ids` gives each token its (0, patch row, patch column) position.
"""

from __future__ import annotations

import numpy as np


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C] (`_pack_latents`)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(batch, (height // 2) * (width // 2), channels * 4))


def unpack_latents(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] for latents of h x w (`_unpack_latents`, sizes in latents)."""
    batch, _, packed_channels = packed.shape
    patches = packed.reshape(batch, height // 2, width // 2, packed_channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches.reshape(batch, packed_channels // 4, height, width))


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """[(h/2)(w/2), 3] float32: (0, patch row, patch column) per token of h x w latents, row by row."""
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1)
    return ids.reshape(-1, 3).astype(np.float32)
