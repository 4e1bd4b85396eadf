"""ControlNet, as diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline runs it: each exported
ControlNet (the component "controlnet/NAME") reads the scaled latents, the timestep, the text embeddings and
its control image, and returns residuals that the U-Net adds to its down blocks' outputs and its mid block's;
several ControlNets sum their residuals, as diffusers' MultiControlNetModel does.

`resolve_control` turns a request's ControlNet arguments into a `ControlPlan` once; `ControlRun` is what the
denoising loop calls at each step for the residuals to feed the U-Net.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image import open_image
from .manifest import CONTROLNET_OUTPUTS, Manifest, component_kind, controlnet_component, residual_names
from .request import GenerationError, GenerationRequest


def exported_controlnets(manifest: Manifest) -> dict[str, bool]:
    """The export's ControlNets by name, in the manifest's order, each with its config's global_pool_conditions
    (such ControlNets run in guess mode, as diffusers makes them)."""
    found = {}
    for component, entry in manifest.components.items():
        if component_kind(component) != "controlnet":
            continue
        config = manifest.folder / Path(entry.path).parent / "config.json"
        pooled = json.loads(config.read_text()).get("global_pool_conditions", False) if config.is_file() else False
        found[component.split("/", 1)[1]] = bool(pooled)
    return found


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a run: its name, its control image (as given), scale and active span of the steps."""

    name: str
    image: object
    scale: float
    start: float  # control_guidance_start: the fraction of the steps before which it is off
    end: float  # control_guidance_end: the fraction after which it is off
    global_pool: bool  # its config's global_pool_conditions: no guess-mode ramp on its residuals

    @property
    def component(self) -> str:
        return controlnet_component(self.name)


@dataclass(frozen=True)
class ControlPlan:
    """The ControlNets a request runs, and guess mode (the ControlNets see the prompts' half of the batch only)."""

    units: tuple[ControlUnit, ...]
    guess_mode: bool

    def scales(self, i: int, steps: int) -> list[float]:
        """Each ControlNet's conditioning scale at loop step i of `steps`, diffusers' `controlnet_keep` times
        its scale: 0 outside [start, end]."""
        return [u.scale * (1.0 - float(i / steps < u.start or (i + 1) / steps > u.end)) for u in self.units]


def _per_unit(value, count: int, what: str) -> list:
    """A value for every ControlNet: one given for all, or one each."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise GenerationError(f"{len(value)} values of {what} for {count} ControlNets: give one, or one each")
        return list(value)
    return [value] * count


def _number(value, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
    ):
        raise GenerationError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def resolve_control(
    request: GenerationRequest, exported: Mapping[str, bool], default_scale: float
) -> ControlPlan | None:
    """The request's ControlNets, images, scales (`default_scale` where none is given: the family's and mode's,
    plan.FamilyDefaults.with_control) and spans, checked against the export's ControlNets."""
    if request.control_image is None:
        if request.controlnet is not None or request.guess_mode:
            raise GenerationError("controlnet and guess_mode need control_image: pass one image per ControlNet")
        return None
    if not exported:
        raise GenerationError(
            "this export has no ControlNet: add one with `sdexport add-controlnet OUT [NAME=]PATH` "
            "(or `sdexport convert ... --controlnet`)"
        )
    names = request.controlnet if request.controlnet is not None else list(exported)
    names = [names] if isinstance(names, str) else list(names)
    unknown = next((n for n in names if n not in exported), None)
    if unknown is not None or not names:
        raise GenerationError(f"unknown ControlNet '{unknown}': this export has {', '.join(exported)}")
    images = request.control_image if isinstance(request.control_image, (list, tuple)) else [request.control_image]
    if len(images) != len(names):
        raise GenerationError(
            f"{len(images)} control images for {len(names)} ControlNets ({', '.join(names)}): "
            "give one image per ControlNet, or name the ControlNets to use"
        )
    scale = default_scale if request.controlnet_conditioning_scale is None else request.controlnet_conditioning_scale
    scales = _per_unit(scale, len(names), "controlnet_conditioning_scale")
    starts = _per_unit(request.control_guidance_start, len(names), "control_guidance_start")
    ends = _per_unit(request.control_guidance_end, len(names), "control_guidance_end")
    units = []
    for name, image, scale, start, end in zip(names, images, scales, starts, ends):
        start, end = _number(start, "control_guidance_start"), _number(end, "control_guidance_end")
        if not 0.0 <= start < end <= 1.0:
            raise GenerationError(
                f"ControlNet '{name}': control_guidance_start {start:g} and end {end:g} must satisfy 0 <= start < end <= 1"
            )
        scale = default_scale if scale is None else scale  # None in a list: that one's default (the server's)
        units.append(
            ControlUnit(name, image, _number(scale, "controlnet_conditioning_scale"), start, end, exported[name])
        )
    # diffusers reads global_pool_conditions from the (first) ControlNet's config
    return ControlPlan(tuple(units), bool(request.guess_mode) or units[0].global_pool)


def load_control_image(image, width: int, height: int) -> np.ndarray:
    """A path or PIL image -> [1, 3, H, W] float32 in [0, 1], as diffusers' control image processor makes it
    (RGB, resized with Lanczos, not normalized)."""
    resized = open_image(image, "control image").convert("RGB").resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(resized).astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def guess_ramp(count: int) -> np.ndarray:
    """Guess mode's factors per residual, 0.1 for the first to 1.0 for the mid block's (torch.logspace(-1, 0, n))."""
    return np.logspace(-1.0, 0.0, count).astype(np.float32)


class ControlRun:
    """The ControlNets of one generation, bound once: each step feeds them the U-Net's scaled latents and
    timestep and returns the summed residuals by U-Net input name (None when every scale is 0 at that step)."""

    def __init__(self, plan: ControlPlan, components: Sequence, images: Sequence[np.ndarray], fixed: dict, steps: int):
        self.plan, self.components, self.steps = plan, list(components), steps
        self.count = len(components[0].outputs)
        self.ramps = [guess_ramp(self.count) if plan.guess_mode and not u.global_pool else None for u in plan.units]
        self.feeds = [{**fixed, "controlnet_cond": image} for image in images]
        self.bindings: list = [None] * len(self.components)

    def scale_vector(self, unit: int, scale: float) -> np.ndarray:
        ramp = self.ramps[unit]
        return np.full(self.count, scale, np.float32) if ramp is None else (ramp * np.float32(scale)).astype(np.float32)

    def residuals(self, i: int, sample: np.ndarray, timestep: np.ndarray, zeros_first: int) -> dict | None:
        """The residuals at loop step i for `sample` (the ControlNets' batch); `zeros_first` rows of zeros go
        in front (guess mode's unconditional half, which no ControlNet sees)."""
        total = None
        for unit, scale in enumerate(self.plan.scales(i, self.steps)):
            if scale == 0.0:  # adds exact zeros in diffusers; skipped here
                continue
            feeds = {"sample": sample, "timestep": timestep, "conditioning_scale": self.scale_vector(unit, scale)}
            if self.bindings[unit] is None:
                self.bindings[unit] = self.components[unit].bind({**self.feeds[unit], **feeds})
            else:
                for name, value in feeds.items():
                    self.bindings[unit].update(name, value)
            outputs = self.bindings[unit].run()
            out = [outputs[name] for name in residual_names(self.count, CONTROLNET_OUTPUTS)]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        if total is None:
            return None
        if zeros_first:
            total = [np.concatenate([np.zeros((zeros_first, *r.shape[1:]), np.float32), r]) for r in total]
        return dict(zip(residual_names(self.count), total))
