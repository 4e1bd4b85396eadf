"""Flow-matching Euler matching diffusers' `FlowMatchEulerDiscreteScheduler` (SD3, Flux): static and dynamic
(resolution-dependent, exponential or linear) shifting, `shift_terminal`, karras/exponential/beta sigmas,
`invert_sigmas`, custom sigmas and `stochastic_sampling` (its noise drawn by the loop, like every scheduler
here). It differs in keeping the sample float32 between steps where diffusers casts it back to the model's
dtype, and in offering no custom `timesteps` and no `per_token_timesteps` (no SD3 or Flux pipeline passes them).

Rectified flow (arXiv:2209.03003, SD3: arXiv:2403.03206): x_sigma = sigma noise + (1 - sigma) x_0, the model
predicts the velocity v = noise - x_0, and each step is x += (sigma_next - sigma) v. The schedule runs in
diffusers' precision, step by step: its training sigmas in float32, the inference sigmas in float64 (float32
for custom ones), shifted, then float32, with timesteps = sigmas * num_train_timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument
from ._common import DiscreteScheduler, as_f32, check_choice, convert_sigmas, expand, resolve_config, sigma_kind


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Dynamic shifting's mu for an image of `image_seq_len` latent tokens ((H/16) * (W/16) for Flux and SD3):
    linear from `base_shift` at `base_seq_len` tokens to `max_shift` at `max_seq_len` (diffusers' pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_mu(config: Mapping[str, Any], image_seq_len: int) -> float:
    """`calculate_shift` with the scheduler config's sequence lengths and shifts, as Flux's and SD3's pipelines
    call it (keys the config lacks take FlowMatchEulerDiscreteScheduler's defaults)."""
    cfg = resolve_config(config, FlowMatchEulerDiscreteScheduler.DEFAULTS)
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    return calculate_shift(image_seq_len, *(cfg[k] for k in keys))


def flow_img2img_begin_index(num_inference_steps: int, strength: float) -> int:
    """Where an image-to-image run enters the schedule: SD3's and Flux's img2img `get_timesteps` t_start.

    It rounds differently from Stable Diffusion's (`img2img_begin_index`): 28 steps at strength 0.6 start at
    index 11 here, 12 there."""
    init_steps = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_steps, 0))


def time_shift(kind: str, mu: float, t: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Resolution-dependent shift of sigmas `t` by `mu` (diffusers' `time_shift`, in `t`'s precision)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


def stretch_to_terminal(t: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Stretch the shifted schedule so that it ends at `shift_terminal` (LTX-Video's rf.py)."""
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


class FlowMatchEulerDiscreteScheduler(DiscreteScheduler):
    NAME: ClassVar[str] = "flow-match-euler"
    DIFFUSERS_CLASS: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"
    FLOW_MATCHING: ClassVar[bool] = True
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }

    def __init__(
        self,
        config: Mapping[str, Any],
        num_inference_steps: int | None,
        *,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
    ):
        """The schedule of `num_inference_steps` steps, or of custom `sigmas` (Flux's pipelines pass
        linspace(1, 1/n, n)); `mu` is dynamic shifting's (`image_mu`), required when the config asks for it."""
        self.config = resolve_config(config, self.DEFAULTS)
        self.num_train_timesteps: int = self.config["num_train_timesteps"]
        check_choice(self.config, "time_shift_type", ("exponential", "linear"), self.NAME)
        self.sigma_kind = sigma_kind(self.config)
        if self.config["use_dynamic_shifting"] and mu is None:
            raise InvalidArgument(
                "use_dynamic_shifting needs mu: pass image_mu(config, image_seq_len) for the image's latent tokens"
            )
        if sigmas is not None and num_inference_steps is not None and len(sigmas) != num_inference_steps:
            raise InvalidArgument(
                f"{len(sigmas)} custom sigmas for {num_inference_steps} steps: give one sigma per step"
            )
        steps = len(sigmas) if sigmas is not None else num_inference_steps
        if steps is None or steps < 1:
            raise InvalidArgument(f"num_inference_steps must be at least 1, got {steps}")
        self.mu = mu
        self.num_inference_steps = steps
        self.sigmas, self.timesteps = self._flow_schedule(steps, sigmas, mu)
        self._start(0)

    def _training_sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the training schedule, in float32 and statically shifted as diffusers'
        `__init__` leaves them (its default schedule then shifts again: SD3's first sigma is 1, its last
        is shifted twice)."""
        n, shift = self.num_train_timesteps, self.config["shift"]
        sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not self.config["use_dynamic_shifting"]:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        return float(sigmas[-1]), float(sigmas[0])

    def _flow_schedule(
        self, steps: int, sigmas: Sequence[float] | np.ndarray | None, mu: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 sigmas with the terminal one appended, float32 timesteps): diffusers' `set_timesteps`."""
        cfg, n = self.config, self.num_train_timesteps
        if sigmas is None:
            sigma_min, sigma_max = self._training_sigma_range()
            sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
        else:
            sigmas = np.array(sigmas).astype(np.float32)
        if cfg["use_dynamic_shifting"]:
            sigmas = time_shift(cfg["time_shift_type"], mu, sigmas)
        else:
            shift = cfg["shift"]
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        if cfg["shift_terminal"]:
            sigmas = stretch_to_terminal(sigmas, cfg["shift_terminal"])
        if self.sigma_kind is not None:
            sigmas = convert_sigmas(self.sigma_kind, sigmas[-1].item(), sigmas[0].item(), steps)
        sigmas = sigmas.astype(np.float32)
        terminal = np.float32(0.0)
        if cfg["invert_sigmas"]:  # Mochi's: sigmas run from 0 up to 1
            sigmas, terminal = 1.0 - sigmas, np.float32(1.0)
        timesteps = sigmas * np.float32(n)
        return np.append(sigmas, terminal).astype(np.float32), timesteps.astype(np.float32)

    def needs_noise(self, i: int) -> bool:
        return bool(self.config["stochastic_sampling"])  # diffusers draws at every step, the last one too

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """The forward process at the sigma of step `i` (one index, or one per sample): diffusers'
        `scale_noise`, x = sigma noise + (1 - sigma) x_0, the image-to-image start."""
        x0 = as_f32(original_samples)
        sigma = expand(self.sigmas[np.asarray(i)], x0.ndim)
        return sigma * as_f32(noise) + (1.0 - sigma) * x0

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if noise is not None:  # stochastic sampling: re-noise the denoised sample to sigma_next
            x0 = sample - sigma * model_output
            return (1.0 - sigma_next) * x0 + sigma_next * noise
        return sample + (sigma_next - sigma) * model_output
