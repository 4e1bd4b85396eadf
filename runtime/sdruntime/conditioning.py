"""The U-Net's conditioning beyond the text embeddings, in NumPy, as diffusers' pipelines compute it:
SDXL's micro-conditioning (`time_ids`, arXiv:2307.01952 section 2.2) and the guidance-scale embedding
of LCM-distilled U-Nets (`timestep_cond`, arXiv:2310.04378)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]  # (height, width), as diffusers takes original_size and target_size


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (the `StableDiffusionXLPipeline` arguments of the same names).

    None for a size means the generated size; refiners (requires_aesthetics_score) take the aesthetic
    scores in place of the target size.
    """

    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def txt2img_time_ids(cond: MicroConditioning, size: Size, batch: int, guided: bool) -> np.ndarray:
    """`time_ids` for StableDiffusionXLPipeline: (batch, 6), or (2 * batch, 6) when guided.

    The negative row differs only when both negative sizes are given. Guided, diffusers tiles the pair
    [negative, positive] `batch` times (`torch.cat([neg, pos]).repeat(batch, 1)`), so for batch > 1 the
    rows interleave while the embeddings are [negatives..., positives...]; this keeps that order, so the
    pictures stay diffusers' own.
    """
    original = cond.original_size or size
    target = cond.target_size or size
    positive = [*original, *cond.crops_coords_top_left, *target]
    if cond.negative_original_size is not None and cond.negative_target_size is not None:
        negative = [*cond.negative_original_size, *cond.negative_crops_coords_top_left, *cond.negative_target_size]
    else:
        negative = positive
    rows = np.asarray([negative, positive] if guided else [positive], dtype=np.float32)
    return np.tile(rows, (batch, 1))


def img2img_time_ids(cond: MicroConditioning, size: Size, batch: int, guided: bool, aesthetic: bool) -> np.ndarray:
    """`time_ids` for StableDiffusionXLImg2ImgPipeline: [negatives..., positives...] when guided.

    With `aesthetic` (a refiner's requires_aesthetics_score) the rows end with the aesthetic score
    instead of the target size. Without it the negative row takes the positive crop, as diffusers does.
    """
    original = cond.original_size or size
    target = cond.target_size or size
    negative_original = cond.negative_original_size or original
    negative_target = cond.negative_target_size or target
    if aesthetic:
        positive = [*original, *cond.crops_coords_top_left, cond.aesthetic_score]
        negative = [*negative_original, *cond.negative_crops_coords_top_left, cond.negative_aesthetic_score]
    else:
        positive = [*original, *cond.crops_coords_top_left, *target]
        negative = [*negative_original, *cond.crops_coords_top_left, *negative_target]
    positives = np.tile(np.asarray([positive], dtype=np.float32), (batch, 1))
    if not guided:
        return positives
    return np.concatenate([np.tile(np.asarray([negative], dtype=np.float32), (batch, 1)), positives])


def guidance_scale_embedding(w: Sequence[float] | np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of guidance scales w (diffusers' `get_guidance_scale_embedding`), (len(w), dim),
    float32; LCM pipelines pass w = guidance_scale - 1."""
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half = dim // 2
    scale = np.float32(np.log(np.float32(10000.0)) / np.float32(half - 1))
    freqs = np.exp(np.arange(half, dtype=np.float32) * -scale)
    args = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
