"""Every scheduler draws the shipped shapes model's pictures: its scheduler config says what training used.

The model was trained on v prediction with nothing clipped (scripts/train_demo.py). A config that leaves
`clip_sample` out gives DDIM its class default, True, which clips each step's predicted picture to
[-1, 1] in latent space: a v-prediction run then draws mud (11.3 dB against PNDM's picture here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sdruntime import StableDiffusionPipeline
from sdruntime.schedulers import SCHEDULERS

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a blue background, center"
# measured at 20 steps, seed 0, against PNDM's picture: the deterministic schedulers 39.7-45.1 dB, euler-a
# 22.8, lcm 19.5 (both add noise of their own each step); DDIM with clip_sample 11.3
MIN_PSNR_DB = 17.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def draw(pipe, scheduler: str, **options) -> np.ndarray:
    image = pipe(PROMPT, scheduler=scheduler, seed=0, num_inference_steps=20, scheduler_options=options or None)
    return np.asarray(image.images[0])


@pytest.fixture(scope="module")
def shapes_pipe(shapes32):
    return StableDiffusionPipeline.load(shapes32)


@pytest.fixture(scope="module")
def pndm_picture(shapes_pipe) -> np.ndarray:
    return draw(shapes_pipe, "pndm")


def test_shipped_config_says_what_training_used():
    config = json.loads((REPO / "models" / "shapes" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and config["prediction_type"] == "v_prediction"
    assert config["clip_sample"] is False and config["thresholding"] is False


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_draws_the_prompt(shapes_pipe, pndm_picture, scheduler):
    picture = draw(shapes_pipe, scheduler)
    h, w, _ = picture.shape
    centre = picture[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].reshape(-1, 3).mean(axis=0)
    corner = picture[:4, :4].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 150 and centre[1] < 100 and centre[2] < 100, f"centre {centre}: not red"
    assert corner[2] > 150 and corner[0] < 100, f"corner {corner}: not blue"
    assert psnr(picture, pndm_picture) > MIN_PSNR_DB


def test_a_scheduler_option_reaches_the_scheduler(shapes_pipe, pndm_picture):
    """clip_sample=true brings back what DDIM's class default drew: the option is not ignored."""
    assert psnr(draw(shapes_pipe, "ddim", clip_sample=True), pndm_picture) < 15.0
