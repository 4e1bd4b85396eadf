"""sdruntime's flow-match-euler against diffusers' FlowMatchEulerDiscreteScheduler (the oracle here only).

Both are built from the same config dict and given the schedule arguments SD3's and Flux's pipelines give
(Flux: sigmas linspace(1, 1/n, n) and mu from the image's token count), driven by the same fake velocity
model, each fed its own previous sample; every step agrees to 1e-5 relative.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift  # noqa: E402
from sdruntime.errors import InvalidArgument  # noqa: E402
from sdruntime.schedulers import (  # noqa: E402
    FLOW_SCHEDULERS,
    SCHEDULERS,
    exported_scheduler_name,
    flow_img2img_begin_index,
    image_mu,
    make_scheduler,
    scheduler_class,
)

# The scheduler_config.json of each model on the hub (stabilityai/stable-diffusion-3-medium-diffusers,
# black-forest-labs/FLUX.1-schnell, black-forest-labs/FLUX.1-dev).
SD3_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
FLUX_SCHNELL_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX_DEV_CONFIG = {**FLUX_SCHNELL_CONFIG, "shift": 3.0, "use_dynamic_shifting": True}
SD1_CONFIG = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1}

SHAPE = (2, 16, 8, 8)
_rng = np.random.default_rng(4321)
INIT_NOISE = _rng.standard_normal(SHAPE).astype(np.float32)
IMAGE_LATENTS = _rng.standard_normal(SHAPE).astype(np.float32)
FIXED = _rng.standard_normal(SHAPE).astype(np.float32)


def fake_velocity(sample: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the transformer: v = x t / (t + 1) + a fixed t-dependent component."""
    t = float(t)
    return (sample * (t / (t + 1)) + 0.1 * np.cos(t / 150.0) * FIXED).astype(np.float32)


def flux_sigmas(steps: int) -> np.ndarray:
    """What FluxPipeline passes as sigmas."""
    return np.linspace(1.0, 1 / steps, steps)


def tokens(size: int) -> int:
    """Flux's image sequence length: 2x2 patches of the 1/8-size latents."""
    return (size // 16) ** 2


def assert_close(ours: np.ndarray, theirs, what: str, rtol: float = 1e-5) -> None:
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == np.float32, what
    err = float(np.abs(ours.astype(np.float64) - theirs).max())
    scale = float(np.abs(theirs).max())
    assert err <= rtol * scale + 1e-7, f"{what}: max abs err {err:.3g} vs max |theirs| {scale:.3g}"


def both(config: dict, steps: int, *, sigmas=None, mu: float | None = None):
    """(ours, diffusers') built for the same schedule."""
    ours = make_scheduler("flow-match-euler", config, steps, sigmas=sigmas, mu=mu)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    theirs.set_timesteps(steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=0)
    return ours, theirs


def peek_randn(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor diffusers' randn_tensor draws next from `generator`, without consuming it."""
    state = generator.get_state()
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    generator.set_state(state)
    return noise


def denoise_both(ours, theirs, x_ours: np.ndarray, x_theirs: torch.Tensor, timesteps) -> int:
    """Step both from their current samples over `timesteps` (diffusers', stepped by timestep as its
    pipelines do); each step is compared."""
    generator = torch.Generator().manual_seed(0)
    assert len(ours.step_indices) == len(timesteps)
    for i, t in zip(ours.step_indices, timesteps):
        assert ours.scale_model_input(x_ours, i) is x_ours and float(ours.timesteps[i]) == float(t)
        noise = peek_randn(generator, SHAPE).numpy() if ours.needs_noise(i) else None
        x_ours = ours.step(i, fake_velocity(x_ours, ours.timesteps[i]), x_ours, noise)
        velocity = torch.from_numpy(fake_velocity(x_theirs.numpy(), float(t)))
        x_theirs = theirs.step(velocity, t, x_theirs, generator=generator).prev_sample
        assert_close(x_ours, x_theirs, f"step {i} (t={float(t)})")
    return len(timesteps)


def run_text_to_image(config: dict, steps: int, *, sigmas=None, mu: float | None = None) -> int:
    ours, theirs = both(config, steps, sigmas=sigmas, mu=mu)
    assert ours.init_noise_sigma == 1.0  # the flow pipelines start from the plain noise
    return denoise_both(ours, theirs, INIT_NOISE, torch.from_numpy(INIT_NOISE), theirs.timesteps)


# --- the models' configs ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 28])
def test_sd3(steps):
    assert run_text_to_image(SD3_CONFIG, steps) == steps


def test_flux_schnell():
    assert run_text_to_image(FLUX_SCHNELL_CONFIG, 4, sigmas=flux_sigmas(4), mu=image_mu(FLUX_SCHNELL_CONFIG, 4096)) == 4


@pytest.mark.parametrize("size", [1024, 512])
def test_flux_dev(size):
    mu = image_mu(FLUX_DEV_CONFIG, tokens(size))
    theirs_config = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_CONFIG).config
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    assert mu == flux_calculate_shift(tokens(size), *(theirs_config.get(k) for k in keys))  # FluxPipeline's call
    assert run_text_to_image(FLUX_DEV_CONFIG, 28, sigmas=flux_sigmas(28), mu=mu) == 28


def test_flux_dev_default_sigmas():
    """Dynamic shifting of diffusers' own (unshifted) linspace, as SD3.5-style configs run it."""
    assert run_text_to_image(FLUX_DEV_CONFIG, 20, mu=image_mu(FLUX_DEV_CONFIG, tokens(768))) == 20


@pytest.mark.parametrize(
    "config, steps, sigmas",
    [
        (SD3_CONFIG, 6, [1.0, 0.9, 0.75, 0.5, 0.3, 0.1]),
        (SD3_CONFIG, 10, flux_sigmas(10)),
        (FLUX_SCHNELL_CONFIG, 3, [1.0, 0.6, 0.2]),
    ],
)
def test_custom_sigmas(config, steps, sigmas):
    assert run_text_to_image(config, steps, sigmas=sigmas) == len(sigmas)


@pytest.mark.parametrize(
    "options",
    [
        {"use_dynamic_shifting": True, "time_shift_type": "linear"},
        {"shift_terminal": 0.1},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"invert_sigmas": True},
        {"stochastic_sampling": True},
    ],
    ids=lambda options: next(iter(options)) if len(options) == 1 else "linear",
)
def test_options(options):
    config = {**SD3_CONFIG, **options}
    mu = image_mu(config, tokens(1024)) if options.get("use_dynamic_shifting") else None
    assert run_text_to_image(config, 12, mu=mu) == 12


# --- image to image -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline, config, sigmas, mu",
    [
        ("StableDiffusion3Img2ImgPipeline", SD3_CONFIG, None, None),
        ("FluxImg2ImgPipeline", FLUX_DEV_CONFIG, flux_sigmas(28), image_mu(FLUX_DEV_CONFIG, tokens(1024))),
    ],
)
def test_image_to_image_start(pipeline, config, sigmas, mu):
    """The pipeline's get_timesteps (begin index) and prepare_latents (scale_noise), then the steps left."""
    ours, theirs = both(config, 28, sigmas=sigmas, mu=mu)
    timesteps, steps_left = getattr(diffusers, pipeline).get_timesteps(
        SimpleNamespace(scheduler=theirs), 28, 0.6, "cpu"
    )
    begin = flow_img2img_begin_index(28, 0.6)
    assert begin == theirs.begin_index and steps_left == 28 - begin
    ours = ours.starting_at(begin)
    x_ours = ours.add_noise(IMAGE_LATENTS, INIT_NOISE, begin)
    latent_timestep = timesteps[:1].repeat(SHAPE[0])
    x_theirs = theirs.scale_noise(torch.from_numpy(IMAGE_LATENTS), latent_timestep, torch.from_numpy(INIT_NOISE))
    assert_close(x_ours, x_theirs, "scale_noise")
    assert denoise_both(ours, theirs, x_ours, x_theirs, timesteps) == steps_left


# --- the registry and refusals ----------------------------------------------------------------------


def test_defaults_are_the_diffusers_class_defaults():
    signature = inspect.signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k != "self"}
    assert FLOW_SCHEDULERS["flow-match-euler"].DEFAULTS == defaults


def test_registry_and_kind():
    assert list(FLOW_SCHEDULERS) == ["flow-match-euler"] and "flow-match-euler" not in SCHEDULERS
    assert exported_scheduler_name(SD3_CONFIG) == "flow-match-euler"
    assert (
        exported_scheduler_name({**SD3_CONFIG, "_class_name": "FlowMatchHeunDiscreteScheduler"}) == "flow-match-euler"
    )
    assert scheduler_class("flow-match-euler", flow_matching=True).FLOW_MATCHING


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_scheduler("flow-match-euler", SD1_CONFIG, 10), "flow-match-euler serves flow-matching"),
        (lambda: scheduler_class("flow-match-euler"), "flow-match-euler serves flow-matching"),
        (lambda: make_scheduler("euler", SD3_CONFIG, 10), "euler serves epsilon/v-prediction .* flow-match-euler$"),
        (lambda: make_scheduler("x", SD3_CONFIG, 10), "unknown scheduler 'x': choose one of flow-match-euler$"),
        (lambda: make_scheduler("flow-match-euler", FLUX_DEV_CONFIG, 28), "use_dynamic_shifting needs mu"),
        (lambda: make_scheduler("flow-match-euler", SD3_CONFIG, 4, sigmas=[1.0, 0.5]), "2 custom sigmas for 4"),
        (lambda: make_scheduler("flow-match-euler", SD3_CONFIG, 0), "at least 1"),
        (lambda: make_scheduler("euler", SD1_CONFIG, 4, mu=1.0), "only to flow-matching schedulers"),
        (lambda: make_scheduler("flow-match-euler", {**SD3_CONFIG, "time_shift_type": "cubic"}, 4), "cubic"),
    ],
)
def test_refusals_are_one_line(build, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        build()
    assert "\n" not in str(refused.value)
