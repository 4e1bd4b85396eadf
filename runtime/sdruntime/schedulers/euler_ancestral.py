"""Euler ancestral matching diffusers' `EulerAncestralDiscreteScheduler` in all its options; it differs only
in rejecting the unsupported `sample` prediction type when built, where diffusers fails at the first step.

Each step takes an Euler step down to sigma_down, then adds fresh noise of std sigma_up, with
sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's `sample_euler_ancestral` with eta = 1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ._common import (
    BETA_DEFAULTS,
    SigmaScheduler,
    check_choice,
)


def ancestral_sigmas(sigma_from: np.floating, sigma_to: np.floating) -> tuple[np.floating, np.floating]:
    """(sigma_down, sigma_up): the deterministic target and the std of the noise re-added."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    NAME: ClassVar[str] = "euler-a"
    DIFFUSERS_CLASS: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def _setup(self) -> None:
        super()._setup()
        check_choice(self.config, "prediction_type", ("epsilon", "v_prediction"), "euler-a")

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        timesteps, _, sigmas = self._spaced_sigmas(num_inference_steps)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        return timesteps

    def needs_noise(self, i: int) -> bool:
        return True  # every step, the last one included (sigma_up = 0 there), as diffusers draws

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        x0 = self._denoised(i, model_output, sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
        prev_sample = sample + (sample - x0) / sigma * (sigma_down - sigma)
        return prev_sample + noise * sigma_up
