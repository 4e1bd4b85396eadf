"""LCM matching diffusers' `LCMScheduler` (step returns prev_sample, which is the denoised sample on the
last step); it differs in offering no custom timesteps and no `strength` argument to set_timesteps (img2img
starts at a begin_index, as StableDiffusionImg2ImgPipeline's set_begin_index does).

Latent consistency models, arXiv:2310.04378: each step jumps to the consistency-model estimate of x_0,
then re-noises it to the next timestep. Like diffusers, `timestep_spacing` and `steps_offset` are ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument
from ._common import (
    BETA_DEFAULTS,
    DiscreteScheduler,
    check_choice,
    threshold_sample,
)
from .ddim import predict_x0_eps

SIGMA_DATA = 0.5


def boundary_condition_scalings(timestep: int, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """(c_skip, c_out) of the consistency-model parameterisation, so that f(x, t) -> x as t -> 0."""
    scaled = np.float32(timestep) * np.float32(timestep_scaling)
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


class LCMScheduler(DiscreteScheduler):
    NAME: ClassVar[str] = "lcm"
    DIFFUSERS_CLASS: ClassVar[str] = "LCMScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    def _setup(self) -> None:
        check_choice(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"), "lcm")
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        n_train, original_steps = self.num_train_timesteps, self.config["original_inference_steps"]
        if original_steps > n_train:
            raise InvalidArgument(
                f"original_inference_steps ({original_steps}) cannot be larger than num_train_timesteps ({n_train})"
            )
        if num_inference_steps > original_steps:
            raise InvalidArgument(
                f"num_inference_steps ({num_inference_steps}) cannot be larger than original_inference_steps "
                f"({original_steps}): LCM picks its timesteps from that distillation schedule"
            )
        # The distillation schedule (every k-th training timestep, ending at k - 1), evenly subsampled.
        k = n_train // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return origin[indices].astype(np.int64)

    def needs_noise(self, i: int) -> bool:
        return i < len(self.timesteps) - 1  # every step but the last re-noises, as diffusers draws

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod

        x0, _ = predict_x0_eps(cfg["prediction_type"], model_output, sample, a_t)
        if cfg["thresholding"]:
            x0 = threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        elif cfg["clip_sample"]:
            x0 = np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])
        c_skip, c_out = boundary_condition_scalings(t, cfg["timestep_scaling"])
        denoised = c_out * x0 + c_skip * sample

        if noise is None:  # the last step
            return denoised.astype(np.float32, copy=False)
        return (a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise).astype(np.float32, copy=False)
