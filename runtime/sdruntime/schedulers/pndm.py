"""PNDM matching diffusers' `PNDMScheduler` in all its options, PLMS (`skip_prk_steps`) and F-PNDM's
Runge-Kutta warm-up alike; it differs only in rejecting prediction_type `sample` when built (diffusers fails
at the first step). PNDM keeps no step index: a run entered at a begin_index counts its steps from 0.

Pseudo numerical methods for diffusion models, arXiv:2202.09778.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument
from ._common import BETA_DEFAULTS, DiscreteScheduler, check_choice, spaced_timesteps

# Adams-Bashforth weights for 1..4 remembered model outputs, newest first.
_PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMScheduler(DiscreteScheduler):
    NAME: ClassVar[str] = "pndm"
    DIFFUSERS_CLASS: ClassVar[str] = "PNDMScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def _setup(self) -> None:
        check_choice(self.config, "prediction_type", ("epsilon", "v_prediction"), "pndm")
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _reset_history(self) -> None:
        self.counter = 0  # steps taken in this run: PNDM's phases follow it, not the step index
        self.ets: list[np.ndarray] = []  # past model outputs, oldest first
        self.cur_model_output: np.ndarray | float = 0.0
        self.cur_sample: np.ndarray | None = None

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        n_train = self.num_train_timesteps
        cfg = self.config
        if not cfg["skip_prk_steps"] and num_inference_steps < 4:  # diffusers fails too (numpy broadcasting)
            raise InvalidArgument("pndm with skip_prk_steps false needs num_inference_steps >= 4")
        ascending = spaced_timesteps(
            cfg["timestep_spacing"], num_inference_steps, n_train, cfg["steps_offset"], round_linspace=True
        )[::-1].astype(np.int64)
        if cfg["skip_prk_steps"]:
            # PLMS: the second timestep is repeated for the pseudo-improved-Euler warm-up step.
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # Four RK4 steps over the last 4 timesteps, each evaluated at t, t - half, t - half, t - step.
            half = n_train // num_inference_steps // 2
            prk = ascending[-4:].repeat(2) + np.tile([0, half], 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ascending[:-3][::-1]
        return np.concatenate([self.prk_timesteps, plms]).astype(np.int64)

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """Runge-Kutta then PLMS steps by the run's own step count, as diffusers' PNDM counts them."""
        timestep = self.timesteps[i]
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        phase = self.counter % 4
        half = self.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        if phase == 0:
            self.cur_model_output = self.cur_model_output + model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = 0.0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise InvalidArgument("pndm can only run PLMS steps after 12 Runge-Kutta steps (skip_prk_steps is false)")
        step = self.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - step
        if self.counter == 1:
            # Second half of the warm-up: redo the first step from its start with the averaged slope.
            prev_timestep, timestep = timestep, timestep + step
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            self.ets = self.ets[-3:] + [model_output]
            if self.counter == 0:
                self.cur_sample = sample
            elif len(self.ets) > 1:
                weights = _PLMS_WEIGHTS[len(self.ets)]
                model_output = sum(w * e for w, e in zip(weights, reversed(self.ets)))
        self.counter += 1
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(self, sample: np.ndarray, t: int, t_prev: int, model_output: np.ndarray) -> np.ndarray:
        """x_{t-delta} from x_t and the (combined) model output: eq. (9) of the PNDM paper."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = a_t**0.5 * model_output + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        eps_denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (sample_coeff * sample - (a_prev - a_t) * model_output / eps_denom).astype(np.float32)
