"""Building blocks shared by the schedulers: config resolution, noise schedules, timestep spacing,
the step loop's contract and the two `add_noise` flavours.

Schedules are float32 where diffusers keeps them in float32 (betas, alphas_cumprod, sigmas), so the per-step
arithmetic rounds the way diffusers' does. Their values agree with diffusers' to a few float32 ulps, not bit
for bit: torch's float32 linspace and sqrt round differently from NumPy's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgument

# The keys every diffusers discrete scheduler reads to build its betas.
BETA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


def resolve_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Fill a scheduler's arguments from `config` as diffusers' `from_config` does.

    Keys outside `defaults` are ignored (a config written by another scheduler class is fine), missing
    keys and keys listed in `_use_default_values` take the default.
    """
    use_default = set(config.get("_use_default_values") or ())
    return {k: config[k] if k in config and k not in use_default else v for k, v in defaults.items()}


def check_choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...], scheduler: str) -> None:
    if cfg[key] not in choices:
        raise InvalidArgument(f"{key} {cfg[key]!r} is not supported by {scheduler}: choose one of {', '.join(choices)}")


# --- noise schedule -----------------------------------------------------------------------------


def make_betas(cfg: Mapping[str, Any]) -> np.ndarray:
    """float32 betas for `trained_betas` or `beta_schedule`, rescaled to zero terminal SNR if asked."""
    n = cfg["num_train_timesteps"]
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n).astype(np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n).astype(np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise NotImplementedError(
            f"beta_schedule {schedule!r} is not supported: choose linear, scaled_linear or squaredcos_cap_v2"
        )
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (diffusers' `betas_for_alpha_bar`)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def cumprod(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double and rounds each partial product.
    return np.cumprod(x.astype(np.float64)).astype(x.dtype)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (arXiv:2305.08891, Algorithm 1)."""
    sqrt_ac = np.sqrt(cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    return 1 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    return cumprod(1.0 - betas)


def sigmas_of(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras-style noise levels sqrt((1 - a) / a) per training timestep, ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# --- timesteps ----------------------------------------------------------------------------------


def check_num_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise InvalidArgument(
            f"num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), "
            f"got {num_inference_steps}"
        )


def spaced_timesteps(
    spacing: str, num_steps: int, num_train: int, steps_offset: int, *, round_linspace: bool
) -> np.ndarray:
    """Descending float64 timesteps for the spacings of arXiv:2305.08891, Table 2.

    DDIM/PNDM round the linspace values to integers; the sigma schedulers (Euler, LMS) keep them fractional.
    """
    if spacing == "linspace":
        t = np.linspace(0, num_train - 1, num_steps)
        return (t.round() if round_linspace else t)[::-1].copy()
    if spacing == "leading":
        return (np.arange(num_steps) * (num_train // num_steps))[::-1] + float(steps_offset)
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1.0
    raise InvalidArgument(f"timestep_spacing {spacing!r} is not supported: choose linspace, leading or trailing")


# --- sigma schedules (Euler, LMS, DPM-Solver) ---------------------------------------------------


def sigma_kind(cfg: Mapping[str, Any]) -> str | None:
    """Which of the karras / exponential / beta sigma schedules the config asks for, if any."""
    kinds = [k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")]
    if len(kinds) > 1:
        raise InvalidArgument("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
    return kinds[0] if kinds else None


def convert_sigmas(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """`n` float64 sigmas from `sigma_max` down to `sigma_min`."""
    if kind == "karras":  # arXiv:2206.00364, eq. 5, rho = 7
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** 7.0
    if kind == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    if kind == "beta":  # arXiv:2407.12173, alpha = beta = 0.6
        ppf = np.array([beta_ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, n)])
        return sigma_min + ppf * (sigma_max - sigma_min)
    raise InvalidArgument(f"unknown sigma schedule {kind!r}")


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigmas))


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution (scipy.stats.beta.ppf) by bisection on `betainc`."""
    lo, hi = 0.0, 1.0
    if q <= 0.0 or q >= 1.0:
        return lo if q <= 0.0 else hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-16:
            break
    return 0.5 * (lo + hi)


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) by Lentz's continued fraction."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return math.exp(log_front) / a * (f - 1.0)


# --- per-step helpers ---------------------------------------------------------------------------


def as_f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def threshold_sample(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, arXiv:2205.11487): clip x0 to its `ratio` quantile s and divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1, max_value).astype(x0.dtype)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def expand(values: np.ndarray, ndim: int) -> np.ndarray:
    """Per-batch scalars shaped to broadcast against a (batch, ...) array of rank `ndim`."""
    values = values.reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


# --- base classes -------------------------------------------------------------------------------


class DiscreteScheduler:
    """A diffusers discrete-time scheduler with its schedule fixed when built (as k-diffusion's samplers take
    their sigmas, and Apple's Core ML schedulers their step count), stepped by index from the loop::

        scheduler = make_scheduler("euler", config, num_inference_steps)
        latents = noise * scheduler.init_noise_sigma
        for i in scheduler.step_indices:
            t = scheduler.timesteps[i]
            eps = unet(scheduler.scale_model_input(latents, i), t)
            noise = randn_tensor(latents.shape, generator) if scheduler.needs_noise(i) else None
            latents = scheduler.step(i, eps, latents, noise)

    `starting_at(begin_index)` starts the loop part-way into the schedule (img2img, diffusers' `set_begin_index`).
    Subclasses set `DEFAULTS` (their diffusers `__init__` defaults), check their config in `_setup`, build
    the schedule in `_make_schedule` and implement `_update`; the multistep ones keep the past model outputs
    of the current run, which `_reset_history` clears when a run starts at `begin_index`.
    """

    NAME: ClassVar[str]  # what users call it: `--scheduler NAME`, `scheduler=NAME`
    DIFFUSERS_CLASS: ClassVar[str]  # the diffusers class it ports, as a config's `_class_name` writes it
    DEFAULTS: ClassVar[dict[str, Any]] = BETA_DEFAULTS
    OVERRIDES: ClassVar[dict[str, Any]] = {}  # config values a variant forces, e.g. karras sigmas
    FLOW_MATCHING: ClassVar[bool] = False  # True: serves flow-matching models (velocity), not epsilon/v ones
    order: int = 1
    init_noise_sigma: float = 1.0
    timesteps: np.ndarray

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int):
        self.config = {**resolve_config(config, self.DEFAULTS), **self.OVERRIDES}
        self.num_train_timesteps: int = self.config["num_train_timesteps"]
        self.betas = make_betas(self.config)
        self.alphas_cumprod = alphas_cumprod_of(self.betas)
        self.sigmas = np.zeros(0, dtype=np.float32)  # filled by the sigma-based schedulers
        self._setup()
        check_num_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._make_schedule(num_inference_steps)
        self._start(0)

    def starting_at(self, begin_index: int) -> DiscreteScheduler:
        """The same scheduler, its loop starting at step `begin_index` (img2img; diffusers' `set_begin_index`)."""
        other = copy.copy(self)
        other._start(begin_index)
        return other

    def _start(self, begin_index: int) -> None:
        if not 0 <= begin_index < len(self.timesteps):
            raise InvalidArgument(
                f"begin_index {begin_index} is outside the {len(self.timesteps)}-step schedule: choose 0 to "
                f"{len(self.timesteps) - 1}"
            )
        self.begin_index = begin_index
        self._next_index = begin_index
        self._reset_history()

    def _setup(self) -> None:
        """Check the config and derive what the schedule needs; runs before `_make_schedule`."""

    def _make_schedule(self, num_inference_steps: int) -> np.ndarray:
        """The timesteps of `num_inference_steps` steps (and `self.sigmas` where the scheduler has them)."""
        raise NotImplementedError

    def _reset_history(self) -> None:
        """Forget the past steps of a run (multistep schedulers)."""

    @property
    def step_indices(self) -> range:
        """The indices the loop steps through: `begin_index` to the end of the schedule."""
        return range(self.begin_index, len(self.timesteps))

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The U-Net's input at step `i`."""
        return sample

    def needs_noise(self, i: int) -> bool:
        """Whether step `i` adds fresh noise, which the loop then draws and passes to `step`."""
        return False

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """Forward diffusion to the noise level of step `i` (one index, or one per sample):
        q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, a_t = alphas_cumprod[timesteps[i]]."""
        x0 = as_f32(original_samples)
        ac = self.alphas_cumprod[self.timesteps[np.asarray(i)].astype(np.int64)]
        return expand(ac**0.5, x0.ndim) * x0 + expand((1 - ac) ** 0.5, x0.ndim) * as_f32(noise)

    def step(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Step `i`: the previous (less noisy) sample as float32, from the model's output at `timesteps[i]`.

        Steps run in order from `begin_index`; calling `begin_index` again starts a new run. `noise` is
        required where `needs_noise(i)`, and ignored elsewhere.
        """
        if not self.begin_index <= i < len(self.timesteps):
            raise IndexError(f"step index {i} is outside steps {self.begin_index} to {len(self.timesteps) - 1}")
        if i == self.begin_index:
            self._reset_history()
        elif i != self._next_index:
            raise ValueError(f"steps run in order: expected step index {self._next_index}, got {i}")
        if self.needs_noise(i):
            if noise is None:
                raise ValueError(f"step {i} of {type(self).__name__} adds noise: pass the loop's draw as noise")
            noise = as_f32(noise)
        else:
            noise = None
        prev_sample = self._update(i, as_f32(model_output), as_f32(sample), noise)
        self._next_index = i + 1
        return prev_sample

    def _update(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def predict_x0(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: np.floating) -> np.ndarray:
    """Denoised sample from a model output, for the sigma (VE) parameterisation x_t = x_0 + sigma eps."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise InvalidArgument(
        f"prediction_type {prediction_type!r} is not supported: choose epsilon, v_prediction or sample"
    )


class SigmaScheduler(DiscreteScheduler):
    """A scheduler stepping in sigma space (x_t = x_0 + sigma noise): Euler, Euler ancestral, LMS.

    Subclasses fill `self.sigmas` (float32, one more than timesteps, last one the final sigma).
    """

    def _setup(self) -> None:
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # keeps the terminal sigma finite

    def _spaced_sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start of every sigma scheduler's schedule: (float32 timesteps, the training sigmas, the sigmas
        interpolated at those timesteps)."""
        cfg = self.config
        timesteps = spaced_timesteps(
            cfg["timestep_spacing"],
            num_inference_steps,
            self.num_train_timesteps,
            cfg["steps_offset"],
            round_linspace=False,
        ).astype(np.float32)
        train_sigmas = sigmas_of(self.alphas_cumprod)
        return timesteps, train_sigmas, np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)

    def _denoised(self, i: int, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The denoised sample at step `i`, for the prediction type."""
        return predict_x0(self.config["prediction_type"], model_output, sample, self.sigmas[i])

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float((sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1), the std of x_t, so the model sees unit-variance input."""
        sigma = self.sigmas[i]
        return as_f32(sample) / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """x_t = x_0 + sigma noise at the sigma of step `i` (one index, or one per sample)."""
        x0 = as_f32(original_samples)
        return x0 + as_f32(noise) * expand(self.sigmas[np.asarray(i)], x0.ndim)
