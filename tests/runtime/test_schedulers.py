"""sdruntime.schedulers against diffusers' schedulers (torch and diffusers are the oracle here only).

Both sides are built from the same config dict (diffusers via `Cls.from_config(config)`), driven by the
same fake model, each fed its own previous sample, with identical noise where a scheduler draws noise.
Ours is built for its step count and stepped by index; diffusers' is stepped by timestep, as its pipelines do.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers calls np.array(tensor), which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

from sdruntime.schedulers import SCHEDULERS, make_scheduler, scheduler_name_for_class  # noqa: E402

# Stable Diffusion 1.x's scheduler_config.json.
SD1_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

DIFFUSERS_CLASS = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler-a": diffusers.EulerAncestralDiscreteScheduler,
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    "dpm++2m-karras": diffusers.DPMSolverMultistepScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
    "lcm": diffusers.LCMScheduler,
}
NAMES = list(DIFFUSERS_CLASS)
SPACINGS = ["leading", "trailing", "linspace"]
SHAPE = (1, 4, 8, 8)

_rng = np.random.default_rng(1234)
INIT_NOISE = _rng.standard_normal(SHAPE).astype(np.float32)
IMAGE_LATENTS = _rng.standard_normal(SHAPE).astype(np.float32)
FIXED = _rng.standard_normal(SHAPE).astype(np.float32)


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: f(x, t) = x t / (t + 1) + a fixed t-dependent component."""
    t = float(t)
    return (sample * (t / (t + 1)) + 0.1 * np.cos(t / 150.0) * FIXED).astype(np.float32)


def ours_from(name: str, config: dict, overrides: dict | None = None):
    """Our scheduler `name` from `config`, built for a step count (eta for DDIM)."""

    def make(steps: int, eta: float = 0.0):
        return make_scheduler(name, config, steps, overrides, **({"eta": eta} if eta else {}))

    return make


def build(name: str, config: dict) -> tuple:
    ours = ours_from(name, config)
    forced = {"use_karras_sigmas": True} if name == "dpm++2m-karras" else {}
    theirs = DIFFUSERS_CLASS[name].from_config({**config, **forced})
    return ours, theirs


def config_with(**overrides) -> dict:
    return {**SD1_CONFIG, **overrides}


def assert_close(ours: np.ndarray, theirs, what: str, rtol: float = 1e-5) -> None:
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, what
    assert ours.dtype == np.float32, what
    err = float(np.abs(ours.astype(np.float64) - theirs).max())
    scale = float(np.abs(theirs).max())
    assert err <= rtol * scale + 1e-6, f"{what}: max abs err {err:.3g} vs max |theirs| {scale:.3g}"


def assert_same_timesteps(ours, theirs) -> None:
    theirs = theirs.numpy()
    assert len(ours) == len(theirs)
    if np.issubdtype(theirs.dtype, np.integer):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    else:  # fractional (karras etc.) timesteps: equal up to float32 rounding of the schedule
        np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), theirs, rtol=1e-6, atol=2e-4)


def peek_randn(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor diffusers' randn_tensor would draw next from `generator`, without consuming it."""
    state = generator.get_state()
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    generator.set_state(state)
    return noise


def step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict:
    """What StableDiffusionPipeline.prepare_extra_step_kwargs passes."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in params else {}
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def run_and_compare(
    name: str,
    config: dict,
    steps: int,
    *,
    eta: float = 0.0,
    strength: float | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
) -> int:
    """Denoise with both schedulers as the (img2img if `strength`) pipeline does; returns the step count."""
    ours, theirs = build(name, config)
    return compare_schedulers(name, ours, theirs, steps, eta=eta, strength=strength, seed=seed, rtol=rtol)


def compare_schedulers(
    name: str,
    make_ours,
    theirs,
    steps: int,
    *,
    eta: float = 0.0,
    strength: float | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
    theirs_from_index_0: bool = False,
) -> int:
    """run_and_compare on schedulers made by the caller (ours: `make_ours(steps, eta)`, see ours_from).
    `theirs_from_index_0` sets diffusers' begin index to 0 instead of its lookup of the first timestep."""
    ours = make_ours(steps, eta)
    assert ours.order == theirs.order
    theirs.set_timesteps(steps)
    if theirs_from_index_0:
        theirs.set_begin_index(0)
    assert_same_timesteps(ours.timesteps, theirs.timesteps)
    ts_theirs = theirs.timesteps

    if strength is None:
        assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
        x_ours = INIT_NOISE * np.float32(ours.init_noise_sigma)
        x_theirs = torch.from_numpy(INIT_NOISE) * theirs.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0) * theirs.order
        ts_theirs = ts_theirs[t_start:]
        ours = ours.starting_at(t_start)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(t_start)
        x_ours = ours.add_noise(IMAGE_LATENTS, INIT_NOISE, t_start)
        x_theirs = theirs.add_noise(torch.from_numpy(IMAGE_LATENTS), torch.from_numpy(INIT_NOISE), ts_theirs[:1])
        assert_close(x_ours, x_theirs, f"{name} add_noise", rtol)

    generator = torch.Generator().manual_seed(seed)
    kwargs = step_kwargs(theirs, generator, eta)
    assert len(ours.step_indices) == len(ts_theirs)
    for i, t_theirs in zip(ours.step_indices, ts_theirs):
        t_ours = ours.timesteps[i]
        in_ours = ours.scale_model_input(x_ours, i)
        in_theirs = theirs.scale_model_input(x_theirs, t_theirs)
        assert_close(in_ours, in_theirs, f"{name} scale_model_input at step {i}", rtol)
        noise = peek_randn(generator, SHAPE).numpy() if ours.needs_noise(i) else None
        x_ours = ours.step(i, fake_model(in_ours, t_ours), x_ours, noise)
        model_output = torch.from_numpy(fake_model(in_theirs.numpy(), float(t_theirs)))
        x_theirs = theirs.step(model_output, t_theirs, x_theirs, **kwargs).prev_sample
        assert_close(x_ours, x_theirs, f"{name} step {i} (t={t_theirs})", rtol)
    return len(ours.step_indices)


# --- the main matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name: str, spacing: str, prediction_type: str, steps: int) -> None:
    config = config_with(timestep_spacing=spacing, prediction_type=prediction_type)
    assert run_and_compare(name, config, steps) >= 1


@pytest.mark.parametrize("name", NAMES)
def test_sd1_config_without_spacing_uses_class_default(name: str) -> None:
    # The real SD 1.x config has no timestep_spacing: each class falls back to its own default.
    run_and_compare(name, SD1_CONFIG, 10)


# scheduler_config.json of other well-known checkpoints (SD 2.1 v-prediction, SDXL base, LCM Dreamshaper v7).
REAL_CONFIGS = {
    "sd21": {
        **SD1_CONFIG,
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "prediction_type": "v_prediction",
    },
    "sdxl": {
        **SD1_CONFIG,
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
    "lcm": {
        **SD1_CONFIG,
        "_class_name": "LCMScheduler",
        "_diffusers_version": "0.22.0.dev0",
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
    },
}


@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("checkpoint", list(REAL_CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_real_checkpoint_configs(name: str, checkpoint: str, steps: int) -> None:
    run_and_compare(name, REAL_CONFIGS[checkpoint], steps)


@pytest.mark.parametrize("name", NAMES)
def test_empty_config_uses_class_defaults(name: str) -> None:
    run_and_compare(name, {}, 10)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "lms", "lcm"])
def test_sample_prediction(name: str) -> None:
    run_and_compare(name, config_with(prediction_type="sample", timestep_spacing="trailing"), 10)


@pytest.mark.parametrize("name", ["pndm", "euler-a"])
def test_sample_prediction_unsupported_like_diffusers(name: str) -> None:
    config = config_with(prediction_type="sample")
    theirs = DIFFUSERS_CLASS[name].from_config(config)
    theirs.set_timesteps(2)
    t = theirs.timesteps[0]
    x = torch.from_numpy(INIT_NOISE)
    with pytest.raises((ValueError, NotImplementedError)):
        theirs.step(x, t, theirs.scale_model_input(x, t))
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler(name, config, 2)


# --- beta schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", NAMES)
def test_beta_schedules(name: str, beta_schedule: str) -> None:
    config = config_with(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
    if name == "dpm++2m-karras" and beta_schedule == "squaredcos_cap_v2":
        # Unrounded karras timesteps start 998, 998, ...: diffusers' first lookup takes the second 998, so
        # it runs off the end of its sigmas at the last step. Stepping by index, ours runs the schedule from
        # its start, as diffusers does when told to begin at index 0.
        theirs = DIFFUSERS_CLASS[name].from_config({**config, "use_karras_sigmas": True})
        theirs.set_timesteps(10)
        x = torch.from_numpy(INIT_NOISE)
        with pytest.raises(IndexError):
            for t in theirs.timesteps:
                x = theirs.step(x, t, x).prev_sample
        theirs = DIFFUSERS_CLASS[name].from_config({**config, "use_karras_sigmas": True})
        compare_schedulers(name, ours_from(name, config), theirs, 10, theirs_from_index_0=True)
        return
    run_and_compare(name, config, 10)


@pytest.mark.parametrize("name", NAMES)
def test_trained_betas(name: str) -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 500) ** 2
    run_and_compare(name, config_with(trained_betas=betas.tolist(), num_train_timesteps=500), 10)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-a", "dpm++2m", "lcm"])
def test_rescale_betas_zero_snr(name: str) -> None:
    config = config_with(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    # The first sigma is sqrt((1 - 2**-24) / 2**-24) ~ 4096, where torch's float32 sqrt rounds up to 4096.0
    # and NumPy's correctly rounded one gives 4095.9998. The Euler step then cancels x ~ 1e4 down to ~50,
    # so that one ulp shows as a ~2e-5 relative difference; later steps are back at float32 noise.
    run_and_compare(name, config, 10, rtol=5e-5 if name in ("euler", "euler-a") else 1e-5)


# --- scheduler-specific options -----------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 25])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_pndm_with_runge_kutta_steps(spacing: str, steps: int) -> None:
    config = config_with(skip_prk_steps=False, timestep_spacing=spacing)
    if steps < 4:  # F-PNDM's Runge-Kutta warm-up needs 4 timesteps; diffusers fails in numpy
        with pytest.raises(ValueError):
            DIFFUSERS_CLASS["pndm"].from_config(config).set_timesteps(steps)
        with pytest.raises(ValueError, match="skip_prk_steps"):
            make_scheduler("pndm", config, steps)
        return
    run_and_compare("pndm", config, steps)


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_alpha_to_one_and_clipping(set_alpha_to_one: bool, clip_sample: bool) -> None:
    config = config_with(set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample, clip_sample_range=0.5)
    run_and_compare("ddim", config, 10)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "lcm"])
def test_dynamic_thresholding(name: str) -> None:
    config = config_with(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    run_and_compare(name, config, 10)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta(spacing: str, eta: float) -> None:
    run_and_compare("ddim", config_with(timestep_spacing=spacing), 10, eta=eta)


@pytest.mark.parametrize(
    "options",
    [
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        {"interpolation_type": "log_linear"},
        {"final_sigmas_type": "sigma_min"},
        {"timestep_type": "continuous", "prediction_type": "v_prediction"},
    ],
)
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_euler_sigma_options(options: dict, steps: int) -> None:
    run_and_compare("euler", config_with(**options), steps)


@pytest.mark.parametrize(
    "options", [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_lms_sigma_options(options: dict, spacing: str) -> None:
    run_and_compare("lms", config_with(timestep_spacing=spacing, **options), 10)


@pytest.mark.parametrize(
    "options",
    [
        {"solver_order": 1},
        {"solver_order": 3},
        {"solver_order": 3, "lower_order_final": False},
        {"solver_type": "heun"},
        {"lower_order_final": False},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"use_lu_lambdas": True},
        {"lambda_min_clipped": -5.1},
        {"algorithm_type": "sde-dpmsolver++"},
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"},
    ],
)
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2m-karras"])
def test_dpm_solver_options(name: str, options: dict, steps: int) -> None:
    if name == "dpm++2m-karras" and any(k in options for k in ("use_exponential_sigmas", "use_beta_sigmas")):
        with pytest.raises(ValueError, match="Only one of"):
            make_scheduler(name, config_with(**options), steps)
        return
    run_and_compare(name, config_with(timestep_spacing="trailing", **options), steps, seed=steps)


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm_type": "deis"},  # diffusers: final_sigmas_type zero is not supported for deis
        {"algorithm_type": "dpmsolver"},  # deprecated in diffusers, not ported
        {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
        {"use_flow_sigmas": True},
        {"solver_order": 4},
    ],
)
def test_dpm_solver_rejected_options(options: dict) -> None:
    with pytest.raises(ValueError):
        make_scheduler("dpm++2m", config_with(**options), 10)


@pytest.mark.parametrize("options", [{"original_inference_steps": 20}, {"timestep_scaling": 5.0}])
def test_lcm_options(options: dict) -> None:
    run_and_compare("lcm", config_with(**options), 4)


def test_lcm_step_limit_like_diffusers() -> None:
    config = config_with(original_inference_steps=20)
    with pytest.raises(ValueError):
        DIFFUSERS_CLASS["lcm"].from_config(config).set_timesteps(21)
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_scheduler("lcm", config, 21)


def test_dpm_karras_duplicate_timesteps_use_second_match() -> None:
    # Rounded karras timesteps repeat at the low-noise end; entering the schedule at a repeated
    # timestep without set_begin_index, diffusers picks the second index: ours, entered at that index, steps the same.
    config = config_with(use_karras_sigmas=True)
    make_ours, theirs = build("dpm++2m", config)
    ours = make_ours(200)
    theirs.set_timesteps(200)
    assert_same_timesteps(ours.timesteps, theirs.timesteps)
    values, counts = np.unique(ours.timesteps, return_counts=True)
    repeated = values[counts > 1]
    assert len(repeated), "expected repeated timesteps in this schedule"
    t = repeated[-1]
    i = theirs.index_for_timestep(torch.tensor(t))
    assert i == int(np.flatnonzero(ours.timesteps == t)[1])
    x = INIT_NOISE
    theirs_out = theirs.step(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(x))[0]
    assert_close(ours.starting_at(i).step(i, x, x), theirs_out, "dup")


# --- img2img ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_img2img_partial_schedule(name: str, spacing: str, strength: float) -> None:
    run_and_compare(name, config_with(timestep_spacing=spacing), 10, strength=strength)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_per_sample_timesteps(name: str) -> None:
    make_ours, theirs = build(name, SD1_CONFIG)
    ours = make_ours(10)
    theirs.set_timesteps(10)
    x0 = np.concatenate([IMAGE_LATENTS, -IMAGE_LATENTS])
    noise = np.concatenate([INIT_NOISE, FIXED])
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[[1, 4]])
    assert_close(ours.add_noise(x0, noise, np.array([1, 4])), expected, f"{name} add_noise")


# --- noise drawing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "eta", "options"),
    [
        ("euler-a", 0.0, {}),
        ("lcm", 0.0, {}),
        ("ddim", 0.7, {}),
        ("dpm++2m", 0.0, {"algorithm_type": "sde-dpmsolver++"}),
    ],
)
def test_generator_noise_matches_torch(name: str, eta: float, options: dict) -> None:
    """The loop's draws from sdruntime.noise, where needs_noise says so, are diffusers' torch draws."""
    noise_module = pytest.importorskip("sdruntime.noise")
    make_ours, theirs = build(name, config_with(**options))
    ours = make_ours(6, eta)
    theirs.set_timesteps(6)
    gen_ours, gen_theirs = noise_module.TorchGenerator(7), torch.Generator().manual_seed(7)
    x_ours = INIT_NOISE * np.float32(ours.init_noise_sigma)
    x_theirs = torch.from_numpy(INIT_NOISE) * theirs.init_noise_sigma
    for i, t_theirs in zip(ours.step_indices, theirs.timesteps):
        t_ours = ours.timesteps[i]
        m_ours = fake_model(ours.scale_model_input(x_ours, i), t_ours)
        m_theirs = torch.from_numpy(fake_model(theirs.scale_model_input(x_theirs, t_theirs).numpy(), float(t_theirs)))
        noise = noise_module.randn_tensor(x_ours.shape, gen_ours) if ours.needs_noise(i) else None
        x_ours = ours.step(i, m_ours, x_ours, noise)
        x_theirs = theirs.step(m_theirs, t_theirs, x_theirs, **step_kwargs(theirs, gen_theirs, eta)).prev_sample
        assert_close(x_ours, x_theirs, f"{name} with generator")


NOISE_CASES = [(name, 0.0, {}) for name in NAMES] + [
    ("ddim", 0.5, {}),
    ("dpm++2m", 0.0, {"algorithm_type": "sde-dpmsolver++"}),
]


@pytest.mark.parametrize(("name", "eta", "options"), NOISE_CASES)
def test_noise_is_drawn_only_when_needed(name: str, eta: float, options: dict) -> None:
    """needs_noise(i) is true exactly at the steps where diffusers' step draws from its generator."""
    make_ours, theirs = build(name, config_with(**options))
    ours = make_ours(3, eta)
    theirs.set_timesteps(3)
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(INIT_NOISE)
    drew = []
    for t in theirs.timesteps:
        before = generator.get_state()
        theirs.step(x, t, theirs.scale_model_input(x, t), **step_kwargs(theirs, generator, eta))
        drew.append(not torch.equal(before, generator.get_state()))
    assert [ours.needs_noise(i) for i in ours.step_indices] == drew
    expected_draws = {"lcm": 2, "euler-a": 3, "ddim": 3 if eta else 0}.get(name, 3 if options else 0)
    assert sum(drew) == expected_draws


def test_noise_is_required_where_a_step_adds_it() -> None:
    scheduler = make_scheduler("euler-a", SD1_CONFIG, 3)
    with pytest.raises(ValueError, match="adds noise"):
        scheduler.step(0, INIT_NOISE, INIT_NOISE)


# --- the step loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_steps_run_in_order_and_a_run_restarts_at_its_begin(name: str) -> None:
    scheduler = make_scheduler(name, SD1_CONFIG, 6)

    def run() -> np.ndarray:
        x = INIT_NOISE * np.float32(scheduler.init_noise_sigma)
        for i in scheduler.step_indices:
            eps = fake_model(scheduler.scale_model_input(x, i), scheduler.timesteps[i])
            x = scheduler.step(i, eps, x, FIXED if scheduler.needs_noise(i) else None)
        return x

    first = run()
    np.testing.assert_array_equal(run(), first)  # the multistep history starts afresh
    scheduler.step(0, INIT_NOISE, INIT_NOISE, FIXED)
    with pytest.raises(ValueError, match="expected step index 1, got 2"):
        scheduler.step(2, INIT_NOISE, INIT_NOISE, FIXED)
    with pytest.raises(IndexError):
        scheduler.step(len(scheduler.timesteps), INIT_NOISE, INIT_NOISE, FIXED)


def test_starting_at_leaves_the_full_run_alone() -> None:
    full = make_scheduler("dpm++2m", SD1_CONFIG, 10)
    later = full.starting_at(4)
    assert (full.begin_index, later.begin_index) == (0, 4)
    assert list(later.step_indices) == list(range(4, 10))
    with pytest.raises(ValueError, match="begin_index 10 is outside the 10-step schedule"):
        full.starting_at(10)


def test_eta_is_ddim_only() -> None:
    assert make_scheduler("ddim", SD1_CONFIG, 4, eta=0.5).needs_noise(0)
    with pytest.raises(ValueError, match="eta applies only to ddim, not euler"):
        make_scheduler("euler", SD1_CONFIG, 4, eta=0.5)


# --- interface ----------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert list(SCHEDULERS) == ["pndm", "ddim", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "lms", "lcm"]


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown scheduler 'x': choose one of pndm, ddim, euler, euler-a"):
        make_scheduler("x", SD1_CONFIG, 10)


@pytest.mark.parametrize("steps", [0, -1, 1001])
@pytest.mark.parametrize("name", NAMES)
def test_bad_step_count(name: str, steps: int) -> None:
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler(name, SD1_CONFIG, steps)


def test_scheduler_name_for_class() -> None:
    assert scheduler_name_for_class("PNDMScheduler") == "pndm"
    assert scheduler_name_for_class("DDIMScheduler") == "ddim"
    assert scheduler_name_for_class("EulerDiscreteScheduler") == "euler"
    assert scheduler_name_for_class("EulerAncestralDiscreteScheduler") == "euler-a"
    assert scheduler_name_for_class("DPMSolverMultistepScheduler") == "dpm++2m"
    assert scheduler_name_for_class("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}) == "dpm++2m"
    assert scheduler_name_for_class("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}) == "dpm++2m-karras"
    assert scheduler_name_for_class("LMSDiscreteScheduler") == "lms"
    assert scheduler_name_for_class("LCMScheduler") == "lcm"
    assert scheduler_name_for_class("HeunDiscreteScheduler") is None


def test_config_from_another_class_and_use_default_values() -> None:
    # An Euler config read as DDIM: Euler-only keys are ignored, and keys listed in _use_default_values
    # take DDIM's own defaults (clip_sample=True, timestep_spacing="leading").
    config = {
        **diffusers.EulerDiscreteScheduler.from_config(SD1_CONFIG).config,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "_use_default_values": ["clip_sample", "timestep_spacing"],
    }
    ours = make_scheduler("ddim", config, 10)
    assert ours.config["clip_sample"] is True and ours.config["timestep_spacing"] == "leading"
    run_and_compare("ddim", config, 10)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs_give_float32(name: str) -> None:
    scheduler = make_scheduler(name, SD1_CONFIG, 4)
    x = INIT_NOISE.astype(np.float16)
    out = scheduler.step(0, x, scheduler.scale_model_input(x, 0), INIT_NOISE)
    assert out.dtype == np.float32 and out.shape == SHAPE
