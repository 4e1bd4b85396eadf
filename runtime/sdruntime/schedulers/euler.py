"""Euler matching diffusers' `EulerDiscreteScheduler` (karras/exponential/beta sigmas, linear and log_linear
interpolation, both final_sigmas_type and timestep_type values); it differs only in offering no `s_churn`
(the Stable Diffusion pipelines leave it 0, which never draws noise).

Algorithm 2 of Karras et al., arXiv:2206.00364, with the churn switched off.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ._common import (
    BETA_DEFAULTS,
    SigmaScheduler,
    check_choice,
    convert_sigmas,
    sigma_kind,
    sigma_to_t,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")


class EulerDiscreteScheduler(SigmaScheduler):
    NAME: ClassVar[str] = "euler"
    DIFFUSERS_CLASS: ClassVar[str] = "EulerDiscreteScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def _setup(self) -> None:
        super()._setup()
        check_choice(self.config, "prediction_type", PREDICTION_TYPES, "euler")
        check_choice(self.config, "interpolation_type", ("linear", "log_linear"), "euler")
        check_choice(self.config, "final_sigmas_type", ("zero", "sigma_min"), "euler")
        self.sigma_kind = sigma_kind(self.config)

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        timesteps, train_sigmas, sigmas = self._spaced_sigmas(num_inference_steps)
        log_sigmas = np.log(train_sigmas)
        if (
            cfg["interpolation_type"] != "linear"
        ):  # log_linear, as diffusers: num_inference_steps + 1 log-spaced sigmas, then the final one
            sigmas = np.exp(np.linspace(log_sigmas[-1], log_sigmas[0], num_inference_steps + 1).astype(np.float32))
        if self.sigma_kind is not None:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = convert_sigmas(self.sigma_kind, sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        final_sigma = 0.0 if cfg["final_sigmas_type"] == "zero" else train_sigmas[0]
        self.sigmas = np.append(sigmas, final_sigma).astype(np.float32)
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            return (0.25 * np.log(self.sigmas[:-1])).astype(np.float32)
        return timesteps.astype(np.float32)

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        x0 = self._denoised(i, model_output, sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        derivative = (sample - x0) / sigma
        return sample + derivative * (sigma_next - sigma)
