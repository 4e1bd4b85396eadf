"""LMS matching diffusers' `LMSDiscreteScheduler` (step's `order` fixed at diffusers' default 4); where
diffusers integrates the Lagrange basis polynomials numerically (scipy.integrate.quad) this integrates them
exactly with numpy.polynomial, which agrees to rounding error.

Linear multistep in sigma space of up to 4th order (k-diffusion's `sample_lms`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.polynomial import Polynomial

from ._common import (
    BETA_DEFAULTS,
    SigmaScheduler,
    check_choice,
    convert_sigmas,
    sigma_kind,
    sigma_to_t,
)


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial that is 1 at sigmas[i - j]
    and 0 at the other sigmas[i - k], k < order."""
    basis = Polynomial([1.0])
    s_j = float(sigmas[i - j])
    for k in range(order):
        if k != j:
            s_k = float(sigmas[i - k])
            basis = basis * Polynomial([-s_k, 1.0]) / (s_j - s_k)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


class LMSDiscreteScheduler(SigmaScheduler):
    NAME: ClassVar[str] = "lms"
    DIFFUSERS_CLASS: ClassVar[str] = "LMSDiscreteScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        # Not LMS arguments, but diffusers' exponential/beta sigmas read them when the config carries them.
        "sigma_min": None,
        "sigma_max": None,
    }
    max_order = 4  # diffusers' `step(order=4)` default, which the pipelines use

    def _setup(self) -> None:
        super()._setup()
        check_choice(self.config, "prediction_type", ("epsilon", "v_prediction", "sample"), "lms")
        self.sigma_kind = sigma_kind(self.config)

    def _reset_history(self) -> None:
        self.derivatives: list[np.ndarray] = []

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        timesteps, train_sigmas, sigmas = self._spaced_sigmas(num_inference_steps)
        if self.sigma_kind is not None:
            sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
            if self.sigma_kind != "karras":  # diffusers' LMS karras ignores the config's sigma_min/max
                sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigma_min
                sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigma_max
            sigmas = convert_sigmas(self.sigma_kind, sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        return timesteps.astype(np.float32)

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        x0 = self._denoised(i, model_output, sample)
        self.derivatives = [*self.derivatives[-(self.max_order - 1) :], (sample - x0) / self.sigmas[i]]
        # Order follows the step index, as in diffusers; after a begin_index > 0 the first steps
        # then use the leading coefficients of a higher order formula.
        order = min(i + 1, self.max_order)
        coeffs = [lms_coefficient(self.sigmas, order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        return prev_sample.astype(np.float32, copy=False)
