"""Scheduler swaps on an export of a hub-format model, against the swap users write in diffusers.

The source holds SD 1.5's scheduler_config.json as the hub has it (no `timestep_spacing`, no
`prediction_type`); diffusers' reference is `Cls.from_config(PNDMScheduler.from_pretrained(folder).config)`.
Ours goes through the exporter's writer (`write_configs`) and the runtime's loader (`read_scheduler_config`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

from sdruntime import StableDiffusionPipeline  # noqa: E402
from sdruntime.cli import main  # noqa: E402
from sdruntime.pipeline import GenerationError, read_scheduler_config  # noqa: E402
from sdruntime.schedulers import SCHEDULERS, make_scheduler  # noqa: E402

from .test_schedulers import (  # noqa: E402
    DIFFUSERS_CLASS,
    NAMES,
    SPACINGS,
    assert_same_timesteps,
    compare_schedulers,
    ours_from,
)

# stable-diffusion-v1-5's scheduler/scheduler_config.json, key for key.
HUB_SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def write_source(folder: Path, config: dict) -> Path:
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def export_configs(tiny_pipe, scheduler, out: Path) -> Path:
    """The exporter's config writer on a pipeline whose scheduler is `scheduler`."""
    from sdexport.artifacts import write_configs

    pipe = diffusers.StableDiffusionPipeline(
        **{**tiny_pipe.components, "scheduler": scheduler}, requires_safety_checker=False
    )
    out.mkdir()
    write_configs(pipe, SimpleNamespace(folder=None), out, [])
    return out


def swapped(name: str, config, **kwargs):
    """What a diffusers user gets from `Cls.from_config(pipe.scheduler.config)` for our `name`."""
    return DIFFUSERS_CLASS[name].from_config(config, **SCHEDULERS[name].OVERRIDES, **kwargs)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = write_source(tmp_path_factory.mktemp("hub-sd15"), HUB_SD15)
    return diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler")


@pytest.fixture(scope="module")
def exported(tiny_pipe, source, tmp_path_factory) -> Path:
    return export_configs(tiny_pipe, source, tmp_path_factory.mktemp("export") / "out")


def assert_same_sigmas(ours, theirs) -> None:
    if hasattr(theirs, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-5, atol=1e-6)


# --- every scheduler, through the exported folder -------------------------------------------------


@pytest.mark.parametrize("steps", [3, 4, 25])
@pytest.mark.parametrize("name", NAMES)
def test_swap_on_hub_config_matches_diffusers(name, steps, source, exported):
    ours = make_scheduler(name, read_scheduler_config(exported), steps)
    theirs = swapped(name, source.config)
    theirs.set_timesteps(steps)
    assert_same_timesteps(ours.timesteps, theirs.timesteps)
    assert_same_sigmas(ours, theirs)
    compare_schedulers(
        name, ours_from(name, read_scheduler_config(exported)), theirs, steps
    )  # timesteps again, then every step's input and output


@pytest.mark.parametrize("name", NAMES)
def test_in_memory_config_with_use_default_values(name, source):
    # A config dict as diffusers holds it, `_use_default_values` and all.
    assert set(source.config["_use_default_values"]) == {"timestep_spacing", "prediction_type"}
    compare_schedulers(name, ours_from(name, dict(source.config)), swapped(name, source.config), 4)


def test_spacing_follows_the_class_as_in_diffusers(exported):
    config = read_scheduler_config(exported)
    first = {}
    for name in NAMES:
        scheduler = make_scheduler(name, config, 4)
        first[name] = float(scheduler.timesteps[0])
    # PNDM and DDIM keep `leading` (+ steps_offset 1), the sigma schedulers take `linspace`.
    assert first == {
        "pndm": 751,
        "ddim": 751,
        "euler": 999,
        "euler-a": 999,
        "dpm++2m": 999,
        "dpm++2m-karras": 999,
        "lms": 999,
        "lcm": 999,
    }


# --- the written folder ---------------------------------------------------------------------------


def test_written_config_is_the_source_form(exported):
    written = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert written == {**HUB_SD15, "_diffusers_version": diffusers.__version__}


def test_written_folder_loads_as_the_source(source, exported):
    loaded = diffusers.PNDMScheduler.from_pretrained(exported, subfolder="scheduler")
    mine, theirs = dict(loaded.config), dict(source.config)
    assert set(mine.pop("_use_default_values")) == set(theirs.pop("_use_default_values"))
    assert mine.pop("_diffusers_version") == diffusers.__version__  # the writer's, as save_config's
    theirs.pop("_diffusers_version")
    assert mine == theirs
    for name in NAMES:
        a, b = swapped(name, loaded.config), swapped(name, source.config)
        a.set_timesteps(4)
        b.set_timesteps(4)
        assert_same_timesteps(a.timesteps.numpy(), b.timesteps)


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")
def test_changed_after_loading_is_written(tiny_pipe, tmp_path):
    # An old DDIM config without clip_sample: StableDiffusionPipeline turns diffusers' default True off.
    config = {k: v for k, v in HUB_SD15.items() if k not in ("clip_sample", "skip_prk_steps")}
    folder = write_source(tmp_path / "src", {**config, "_class_name": "DDIMScheduler"})
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert "clip_sample" in scheduler.config["_use_default_values"]
    out = export_configs(tiny_pipe, scheduler, tmp_path / "out")
    written = read_scheduler_config(out)
    assert written["clip_sample"] is False and "timestep_spacing" not in written
    assert diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler").config["clip_sample"] is False
    assert make_scheduler("ddim", written, 4).config["clip_sample"] is False


def test_export_of_every_key_keeps_todays_behaviour():
    # Exports written before keep every key: `leading` carries over to Euler, as from_config of that file.
    full = {**HUB_SD15, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    for name in ("euler", "dpm++2m", "lms"):
        compare_schedulers(name, ours_from(name, full), swapped(name, full), 4)
    euler = make_scheduler("euler", full, 4)
    assert float(euler.timesteps[0]) == 751


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_defaults_are_the_diffusers_class_defaults(name):
    cls = DIFFUSERS_CLASS[name]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    ours = SCHEDULERS[name].DEFAULTS
    assert {k: ours.get(k, "missing") for k in defaults} == defaults
    # Beyond their arguments, diffusers' sigma conversions read sigma_min/max from a carried config.
    assert set(ours) - set(defaults) <= {"sigma_min", "sigma_max"}


# --- overrides ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_spacing_override_matches_from_config_kwargs(name, spacing, source, exported):
    ours = ours_from(name, read_scheduler_config(exported), {"timestep_spacing": spacing})
    compare_schedulers(name, ours, swapped(name, source.config, timestep_spacing=spacing), 4)


def test_override_of_a_defaulted_key(source):
    overrides = {"timestep_spacing": "leading", "steps_offset": 0}
    theirs = swapped("euler", source.config, timestep_spacing="leading", steps_offset=0)
    compare_schedulers("euler", ours_from("euler", dict(source.config), overrides), theirs, 4)
    assert float(make_scheduler("euler", dict(source.config), 4, overrides).timesteps[0]) == 750


def test_unknown_override_is_refused(exported):
    with pytest.raises(ValueError, match="euler has no setting 'timestep_spacng'"):
        make_scheduler("euler", read_scheduler_config(exported), 4, {"timestep_spacng": "trailing"})


# --- through a real export and the pipeline ----------------------------------------------------------


@pytest.fixture(scope="module")
def ours(tiny32):
    return StableDiffusionPipeline.load(tiny32)


def pipeline_timesteps(pipe, **kwargs) -> list[float]:
    seen: list[float] = []
    pipe("a blue square", num_inference_steps=4, seed=0, callback=lambda i, t, x: seen.append(t), **kwargs)
    return seen


@pytest.mark.parametrize("name", ["euler", "dpm++2m", "pndm"])
def test_pipeline_follows_the_source_swap(tiny_pipe, ours, name):
    theirs = swapped(name, tiny_pipe.scheduler.config)
    theirs.set_timesteps(4)
    np.testing.assert_allclose(pipeline_timesteps(ours, scheduler=name), theirs.timesteps.numpy(), atol=2e-4)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_pipeline_timestep_spacing(tiny_pipe, ours, spacing):
    theirs = swapped("euler", tiny_pipe.scheduler.config, timestep_spacing=spacing)
    theirs.set_timesteps(4)
    got = pipeline_timesteps(ours, scheduler="euler", timestep_spacing=spacing)
    np.testing.assert_allclose(got, theirs.timesteps.numpy(), atol=2e-4)
    options = pipeline_timesteps(ours, scheduler="euler", scheduler_options={"timestep_spacing": spacing})
    assert options == got


def test_pipeline_refuses_an_unknown_spacing(ours):
    with pytest.raises(GenerationError, match="unknown timestep_spacing 'even'"):
        ours("x", num_inference_steps=2, timestep_spacing="even")


def test_cli_timestep_spacing(tiny32, tmp_path, monkeypatch, capsys):
    import sdruntime.plan

    made = []

    def recording(name, config, steps, overrides=None, **kwargs):
        made.append((name, dict(overrides or {})))
        return make_scheduler(name, config, steps, overrides, **kwargs)

    monkeypatch.setattr(sdruntime.plan, "make_scheduler", recording)
    args = ["generate", str(tiny32), "x", "--steps", "2", "--scheduler", "euler", "-o", str(tmp_path / "a.png")]
    assert main([*args, "--timestep-spacing", "trailing"]) == 0
    assert made == [("euler", {"timestep_spacing": "trailing"})]
    assert main([*args, "--timestep-spacing", "even"]) == 2
    assert "--timestep-spacing" in capsys.readouterr().err
