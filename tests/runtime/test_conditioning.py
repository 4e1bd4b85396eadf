"""sdruntime.conditioning against the diffusers code it ports (torch and diffusers are the oracle here only)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdruntime.conditioning import (  # noqa: E402
    MicroConditioning,
    guidance_scale_embedding,
    img2img_time_ids,
    txt2img_time_ids,
)


@pytest.mark.parametrize("dim", [256, 64, 7])
def test_guidance_scale_embedding_matches_diffusers(dim):
    w = torch.tensor([6.5, 0.0, 2.0, 0.25])
    theirs = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_scale_embedding(w.numpy(), dim)
    assert ours.dtype == np.float32 and ours.shape == tuple(theirs.shape)
    # sin/cos of arguments up to 6500 rad: one float32 ulp of the argument (~5e-4) is the whole difference
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-3)


def fake_xl(pipeline_cls, time_ids: int, requires_aesthetics_score: bool = False):
    """Just enough of an SDXL pipeline for diffusers' own `_get_add_time_ids`."""
    embed_dim = 8
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=embed_dim),
        add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=32 + time_ids * embed_dim)),
    )
    config = SimpleNamespace(requires_aesthetics_score=requires_aesthetics_score)
    fake = SimpleNamespace(unet=unet, config=config)
    return lambda *args, **kwargs: pipeline_cls._get_add_time_ids(fake, *args, **kwargs)


TXT2IMG_CASES = [
    MicroConditioning(),
    MicroConditioning(original_size=(4096, 2048), crops_coords_top_left=(16, 8), target_size=(512, 768)),
    MicroConditioning(negative_original_size=(256, 256), negative_target_size=(1024, 1024)),
    MicroConditioning(negative_original_size=(256, 256)),  # only one of the two: the negative row is the positive
]


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", range(len(TXT2IMG_CASES)))
def test_txt2img_time_ids_match_diffusers(case, batch, guided):
    cond, size = TXT2IMG_CASES[case], (640, 832)
    get = fake_xl(diffusers.StableDiffusionXLPipeline, 6)
    original, target = cond.original_size or size, cond.target_size or size
    add = get(original, cond.crops_coords_top_left, target, dtype=torch.float32, text_encoder_projection_dim=32)
    if cond.negative_original_size is not None and cond.negative_target_size is not None:
        neg = get(
            cond.negative_original_size,
            cond.negative_crops_coords_top_left,
            cond.negative_target_size,
            dtype=torch.float32,
            text_encoder_projection_dim=32,
        )
    else:
        neg = add
    if guided:  # StableDiffusionXLPipeline.__call__, step 7
        add = torch.cat([neg, add], dim=0)
    theirs = add.repeat(batch, 1)
    np.testing.assert_array_equal(txt2img_time_ids(cond, size, batch, guided), theirs.numpy())


IMG2IMG_CASES = [
    MicroConditioning(),
    MicroConditioning(
        original_size=(2048, 2048),
        crops_coords_top_left=(4, 2),
        target_size=(512, 512),
        negative_crops_coords_top_left=(9, 9),
    ),
    MicroConditioning(
        negative_original_size=(128, 128),
        negative_target_size=(256, 192),
        aesthetic_score=7.0,
        negative_aesthetic_score=1.5,
    ),
]


@pytest.mark.parametrize("aesthetic", [False, True])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("case", range(len(IMG2IMG_CASES)))
def test_img2img_time_ids_match_diffusers(case, guided, aesthetic):
    cond, size, batch = IMG2IMG_CASES[case], (512, 384), 2
    get = fake_xl(diffusers.StableDiffusionXLImg2ImgPipeline, 5 if aesthetic else 6, aesthetic)
    original, target = cond.original_size or size, cond.target_size or size
    add, neg = get(
        original,
        cond.crops_coords_top_left,
        target,
        cond.aesthetic_score,
        cond.negative_aesthetic_score,
        cond.negative_original_size or original,
        cond.negative_crops_coords_top_left,
        cond.negative_target_size or target,
        dtype=torch.float32,
        text_encoder_projection_dim=32,
    )
    add = add.repeat(batch, 1)  # StableDiffusionXLImg2ImgPipeline.__call__, step 8
    if guided:
        add = torch.cat([neg.repeat(batch, 1), add], dim=0)
    np.testing.assert_array_equal(img2img_time_ids(cond, size, batch, guided, aesthetic), add.numpy())
