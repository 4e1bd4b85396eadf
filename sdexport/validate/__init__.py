"""`sdexport validate`: an export against its PyTorch source, per component and end to end (ControlNets too,
given their PyTorch models as `--controlnet NAME=PATH`; SD3 and Flux with their transformer, T5 and
flow-matching scheduler, against diffusers' SD3 and Flux pipelines).

The reference is always diffusers/PyTorch in fp32; the tolerances are metrics.py's constants (overridable).
Modules: options (what is asked), cases (the inputs), components (each component against PyTorch),
divergence (the first fp16 node to blame), schedulers and end_to_end (diffusers against the runtime),
report (the typed report and its JSON, `validate_report.schema.json` beside this package), table (the summary).
Validate only checks and reports; what convert does about a failure lives in `sdexport.fp32_fallback`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import sdruntime
from sdruntime.manifest import Manifest, read_manifest
from sdruntime.session import check_cpu_layout, first_provider, resolve_providers

from ..artifacts import versions as export_versions
from ..load import Source
from ..specs import controlnet_models, denoiser
from ..staging import REPORT_NAME  # what `convert --validate` leaves in the export
from .cases import component_cases
from .components import check_component
from .divergence import locate_fp16_failure
from .end_to_end import Generation, end_to_end, planned_draws, skipped_generations
from .metrics import FP16_RELATIVE_L2, FULL_SIZE_UNET_PARAMETERS, NO_NUMBERS, Limits, component_limits, min_psnr, psnr
from .options import (
    ValidateOptions,
    check_controlnets,
    check_options,
    end_to_end_size,
    exported_controlnets,
    guidance_scale,
)
from .reference import reference_for
from .report import (
    ComponentResult,
    Problem,
    Settings,
    ValidationReport,
    check_report,
    load_report_schema,
    write_report,
)
from .schedulers import chosen_scheduler, reference_timesteps
from .table import format_table

__all__ = [
    "REPORT_NAME",
    "Problem",
    "ValidateOptions",
    "ValidationReport",
    "check_report",
    "format_table",
    "load_report_schema",
    "psnr",
    "validate",
    "write_report",
]


def versions() -> dict[str, str]:
    """The versions doing the check."""
    return {**export_versions(), "sdexport-runtime": sdruntime.__version__, "numpy": np.__version__}


def not_checked(component: str, dtype: str, limits: Limits) -> ComponentResult:
    """An exported ControlNet whose PyTorch model was not given: reported, not failed."""
    name = component.split("/", 1)[1]
    why = f"not checked: no PyTorch ControlNet given (--controlnet {name}=PATH)"
    return ComponentResult(dtype, None, limits, True, (), NO_NUMBERS, (), skipped=why)


def check_components(
    pipe,
    manifest: Manifest,
    opts: ValidateOptions,
    full_size: bool,
    timesteps: list[float],
    size: tuple[int, int],
    providers: list,
) -> dict[str, ComponentResult]:
    """Each component against PyTorch at `size` (and a non-square size); for a failing fp16 one, the first node to
    blame on its smallest failing case."""
    results = {}
    for component, entry in manifest.components.items():
        started = time.perf_counter()
        limits = component_limits(entry.dtype, full_size, opts.atol, opts.rtol)
        if component in exported_controlnets(manifest) and component not in controlnet_models(pipe):
            results[component] = not_checked(component, entry.dtype, limits)
            continue
        cases = component_cases(component, pipe, manifest, timesteps, opts.seed, opts.guidance_scale, size)
        check = check_component(component, pipe, manifest, cases, limits, providers)
        result = check.result
        if check.failing and entry.dtype == "fp16" and opts.locate:
            smallest = min(check.failing, key=lambda c: sum(v.size for v in c.inputs.values()))
            rtol = limits.relative_l2 or FP16_RELATIVE_L2
            blame = locate_fp16_failure(component, pipe, manifest, smallest, rtol, providers)
            result = replace(result, first_bad_node=blame)
        results[component] = result
        opts.log(f"checked {component} in {time.perf_counter() - started:.1f} s")
    return results


def validate(source: str | Source, folder: str | Path, **options) -> ValidationReport:
    """Check the export in `folder` against SOURCE (a folder, a preset or a loaded `Source`); returns the report.
    `options` are `ValidateOptions`' fields."""
    opts = ValidateOptions(**options)
    check_options(opts)
    started = time.perf_counter()
    manifest = read_manifest(folder)
    height, width = end_to_end_size(manifest, opts)  # a bad size is refused before anything loads
    controlnets = check_controlnets(manifest, opts)
    opts = replace(opts, guidance_scale=guidance_scale(manifest, opts))
    scheduler, config = chosen_scheduler(manifest.folder, opts.scheduler)
    src = reference_for(source, manifest, opts, controlnets)
    providers = resolve_providers(opts.provider, manifest.target)
    check_cpu_layout(manifest)
    timesteps = reference_timesteps(scheduler, config, opts.steps, manifest, (height, width))
    # the U-Net's or the transformer's size picks the fp32 limit
    unet_parameters = int(sum(p.numel() for p in denoiser(src.pipe).parameters()))
    full_size = unet_parameters > FULL_SIZE_UNET_PARAMETERS
    components = check_components(src.pipe, manifest, opts, full_size, timesteps, (height, width), providers)
    any_fp16 = any(entry.dtype == "fp16" for entry in manifest.components.values())
    run = Generation(scheduler, config, (height, width), min_psnr(any_fp16, opts.min_psnr))
    checked = [c for c in exported_controlnets(manifest) if c in controlnet_models(src.pipe)]
    draws = planned_draws(manifest, checked[0] if checked else None)
    if opts.end_to_end:
        generations = end_to_end(src.pipe, manifest, opts, run, draws)
    else:
        generations = skipped_generations(draws, run.min_psnr, "not asked for")
    settings = Settings(
        scheduler=scheduler,
        steps=opts.steps,
        seed=opts.seed,
        guidance_scale=opts.guidance_scale,
        strength=opts.strength,
        prompt=opts.prompt,
        negative_prompt=opts.negative_prompt,
        height=height,
        width=width,
        timesteps=tuple(timesteps),
    )
    return ValidationReport(
        source=src.name,
        export=str(manifest.folder.resolve()),
        dtype=manifest.dtype,
        target=manifest.target,
        provider=first_provider(providers),
        versions=versions(),
        export_created_by=dict(manifest.created_by),
        settings=settings,
        unet_parameters=unet_parameters,
        full_size=full_size,
        components=components,
        end_to_end=generations,
        seconds=round(time.perf_counter() - started, 2),
    )
