"""DDIM matching diffusers' `DDIMScheduler`, including eta > 0, clipping, dynamic thresholding and zero
terminal SNR; it differs in not offering `use_clipped_model_output` (the Stable Diffusion pipelines never
pass it) and in taking `eta` when built rather than at each step.

Denoising diffusion implicit models, arXiv:2010.02502, eq. (12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument
from ._common import (
    BETA_DEFAULTS,
    DiscreteScheduler,
    check_choice,
    spaced_timesteps,
    threshold_sample,
)


def predict_x0_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t: np.floating
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted x_0, predicted noise) from a model output of the given prediction type."""
    a, b = alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    raise InvalidArgument(
        f"prediction_type {prediction_type!r} is not supported: choose epsilon, sample or v_prediction"
    )


class DDIMScheduler(DiscreteScheduler):
    NAME: ClassVar[str] = "ddim"
    DIFFUSERS_CLASS: ClassVar[str] = "DDIMScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int, eta: float = 0.0):
        """`eta` (DDIM only, as in diffusers): 0 is deterministic DDIM, 1 DDPM's posterior variance."""
        if eta < 0:
            raise InvalidArgument(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        super().__init__(config, num_inference_steps)

    def _setup(self) -> None:
        check_choice(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"), "ddim")
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        return spaced_timesteps(
            cfg["timestep_spacing"],
            num_inference_steps,
            self.num_train_timesteps,
            cfg["steps_offset"],
            round_linspace=True,
        ).astype(np.int64)

    def needs_noise(self, i: int) -> bool:
        return self.eta > 0

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """The previous timestep is one stride down from this one, as diffusers takes it."""
        cfg = self.config
        t = int(self.timesteps[i])
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod

        x0, eps = predict_x0_eps(cfg["prediction_type"], model_output, sample, a_t)
        if cfg["thresholding"]:
            x0 = threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        elif cfg["clip_sample"]:
            x0 = np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])

        # sigma_t of eq. (16): eta = 0 is deterministic DDIM, eta = 1 is DDPM's posterior variance.
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std_dev = self.eta * variance**0.5
        prev_sample = a_prev**0.5 * x0 + (1 - a_prev - std_dev**2) ** 0.5 * eps
        if noise is not None:
            prev_sample = prev_sample + std_dev * noise
        return prev_sample.astype(np.float32, copy=False)
