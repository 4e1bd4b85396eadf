"""DPM-Solver++ matching diffusers' `DPMSolverMultistepScheduler` for algorithm_type dpmsolver++ and
sde-dpmsolver++ (solver_order 1-3, midpoint/heun, karras/exponential/beta/lu sigmas, thresholding); it
differs in rejecting the deprecated dpmsolver/sde-dpmsolver algorithms and the flow-matching options
(use_flow_sigmas, flow_prediction, use_dynamic_shifting), which Stable Diffusion exports never use.

DPM-Solver++, arXiv:2211.01095: multistep updates in lambda = log(alpha_t / sigma_t) on data predictions.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument
from ._common import (
    BETA_DEFAULTS,
    DiscreteScheduler,
    as_f32,
    check_choice,
    convert_sigmas,
    expand,
    sigma_kind,
    sigma_to_t,
    sigmas_of,
    spaced_timesteps,
    threshold_sample,
)


def alpha_sigma_lambda(sigma: np.floating) -> tuple[np.floating, np.floating, np.floating]:
    """VP (alpha_t, sigma_t) of a VE sigma, and the log-SNR lambda_t = log(alpha_t / sigma_t)."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = inf, as in torch
        return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)


class DPMSolverMultistepScheduler(DiscreteScheduler):
    NAME: ClassVar[str] = "dpm++2m"
    DIFFUSERS_CLASS: ClassVar[str] = "DPMSolverMultistepScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",  # this and flow_shift only matter with use_flow_sigmas (rejected)
        "flow_shift": 1.0,
        # Not DPM-Solver arguments, but diffusers' sigma conversions read them when the config carries them.
        "sigma_min": None,
        "sigma_max": None,
    }

    def _setup(self) -> None:
        cfg = self.config
        if cfg["algorithm_type"] == "deis":  # diffusers' own substitutions
            if cfg["final_sigmas_type"] == "zero":
                raise InvalidArgument("final_sigmas_type 'zero' is not supported for algorithm_type 'deis'")
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        check_choice(cfg, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"), "dpm++2m")
        check_choice(cfg, "solver_type", ("midpoint", "heun"), "dpm++2m")
        check_choice(cfg, "prediction_type", ("epsilon", "sample", "v_prediction"), "dpm++2m")
        check_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"), "dpm++2m")
        if cfg["use_flow_sigmas"] or cfg["use_dynamic_shifting"]:
            raise InvalidArgument(
                "dpm++2m does not support use_flow_sigmas / use_dynamic_shifting (flow-matching models)"
            )
        if cfg["solver_order"] not in (1, 2, 3):
            raise InvalidArgument(f"solver_order must be 1, 2 or 3, got {cfg['solver_order']}")
        self.sigma_kind = sigma_kind(cfg)
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # keeps the terminal sigma finite

    def _reset_history(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        n, n_train = num_inference_steps, self.num_train_timesteps
        train_sigmas = sigmas_of(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        # lambda_min_clipped cuts off the noisiest timesteps (the ones with lambda below it).
        lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))
        last_timestep = n_train - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
        if cfg["timestep_spacing"] == "trailing":
            timesteps = np.arange(last_timestep, 0, -n_train / n).round() - 1
        else:  # n + 1 points, dropping the last, so the schedule never reaches t = 0
            timesteps = spaced_timesteps(cfg["timestep_spacing"], n + 1, last_timestep, 0, round_linspace=True)[:-1]
            if cfg["timestep_spacing"] == "leading":
                timesteps = timesteps + cfg["steps_offset"]

        # diffusers' precedence: karras, then lu lambdas, then exponential / beta.
        kind = "lu" if cfg["use_lu_lambdas"] and self.sigma_kind != "karras" else self.sigma_kind
        if kind == "lu":  # uniform in log sigma (arXiv:2301.12935)
            lo, hi = float(log_sigmas[0]), float(log_sigmas[-1])
            sigmas = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
        elif kind is not None:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(train_sigmas[0])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(train_sigmas[-1])
            sigmas = convert_sigmas(kind, sigma_min, sigma_max, n)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if kind is not None:
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if kind in ("karras", "lu") and cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()

        final_sigma = 0.0 if cfg["final_sigmas_type"] == "zero" else train_sigmas[0]
        self.sigmas = np.append(sigmas, final_sigma).astype(np.float32)
        return timesteps.astype(np.int64)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """x_t = alpha_t x_0 + sigma_t noise at the noise level of step `i` (one index, or one per sample)."""
        x0 = as_f32(original_samples)
        alpha_t, sigma_t, _ = alpha_sigma_lambda(expand(self.sigmas[np.asarray(i)], x0.ndim))
        return alpha_t * x0 + sigma_t * as_f32(noise)

    def needs_noise(self, i: int) -> bool:
        return self.config["algorithm_type"] == "sde-dpmsolver++"

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        n = len(self.timesteps)
        few_steps = cfg["lower_order_final"] and n < 15  # lower orders at the end stabilise short schedules
        final_first_order = i == n - 1 and (few_steps or cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero")
        final_second_order = i == n - 2 and few_steps

        self.model_outputs = [*self.model_outputs[1:], self._data_prediction(model_output, sample, i)]

        order = cfg["solver_order"]
        with np.errstate(divide="ignore"):  # h = 0 between repeated sigmas: r = inf, D1 = 0, as in torch
            if order == 1 or self.lower_order_nums < 1 or final_first_order:
                prev_sample = self._first_order_update(sample, i, noise)
            elif order == 2 or self.lower_order_nums < 2 or final_second_order:
                prev_sample = self._second_order_update(sample, i, noise)
            else:
                prev_sample = self._third_order_update(sample, i, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        return prev_sample.astype(np.float32, copy=False)

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, i: int) -> np.ndarray:
        """The model's estimate of x_0, which DPM-Solver++ extrapolates."""
        cfg = self.config
        alpha_t, sigma_t, _ = alpha_sigma_lambda(self.sigmas[i])
        if cfg["prediction_type"] == "epsilon":
            if cfg["variance_type"] in ("learned", "learned_range"):
                model_output = model_output[:, :3]
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif cfg["prediction_type"] == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha_t * sample - sigma_t * model_output
        if cfg["thresholding"]:
            x0 = threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        return x0

    def _first_order_update(self, x: np.ndarray, i: int, noise: np.ndarray | None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        x0 = self.model_outputs[-1]
        if noise is None:
            return (sigma_t / sigma_s) * x - (alpha_t * (np.exp(-h) - 1.0)) * x0
        return (
            (sigma_t / sigma_s * np.exp(-h)) * x
            + (alpha_t * (1 - np.exp(-2.0 * h))) * x0
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )

    def _second_order_update(self, x: np.ndarray, i: int, noise: np.ndarray | None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = alpha_sigma_lambda(self.sigmas[i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        heun = self.config["solver_type"] == "heun"
        if noise is None:
            phi = alpha_t * (np.exp(-h) - 1.0)
            d1_coeff = alpha_t * ((np.exp(-h) - 1.0) / h + 1.0) if heun else -0.5 * phi
            return (sigma_t / sigma_s0) * x - phi * d0 + d1_coeff * d1
        phi = alpha_t * (1 - np.exp(-2.0 * h))
        d1_coeff = alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) if heun else 0.5 * phi
        return (
            (sigma_t / sigma_s0 * np.exp(-h)) * x
            + phi * d0
            + d1_coeff * d1
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )

    def _third_order_update(self, x: np.ndarray, i: int, noise: np.ndarray | None) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = alpha_sigma_lambda(self.sigmas[i - 1])
        _, _, lambda_s2 = alpha_sigma_lambda(self.sigmas[i - 2])
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if noise is None:
            return (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (np.exp(-h) - 1.0)) * m0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
        return (
            (sigma_t / sigma_s0 * np.exp(-h)) * x
            + (alpha_t * (1.0 - np.exp(-2.0 * h))) * m0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )


class DPMSolverMultistepKarrasScheduler(DPMSolverMultistepScheduler):
    """`dpm++2m-karras`: DPMSolverMultistepScheduler with `use_karras_sigmas` forced on."""

    NAME: ClassVar[str] = "dpm++2m-karras"
    DIFFUSERS_CLASS: ClassVar[str] = "DPMSolverMultistepScheduler"
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
