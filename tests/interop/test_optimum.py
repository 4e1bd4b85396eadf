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
