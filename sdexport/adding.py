"""`sdexport add-controlnet OUT [NAME=]PATH`: a ControlNet added to an existing export, which keeps every graph
it has. The U-Net already takes ControlNet residuals (inputs that default to zeros), so only the ControlNet is
traced, at the export's dtype, target, opset, attention form and static sizes, from the export's own configs.

The ControlNet's folder is written beside OUT's others in a temporary folder and renamed into place; then the
manifest is replaced in one rename, so a failed add leaves OUT as it was."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from sdruntime.manifest import Manifest, read_manifest, write_manifest

from .artifacts import component_entry, with_cpu_layout_probe
from .component_export import checkable, finish_component
from .controlnet import ControlNetSource, attach_controlnets, parse_controlnet
from .converting import exported_line
from .errors import SdexportError
from .families import FAMILY_NAMES
from .plan import EXPORT_DTYPE, ComponentPlan, ExportPlan
from .specs import controlnet_models, set_module_attention, spec_of
from .trace import trace_component


def check_add(out: Path, text: str, overwrite: bool) -> tuple[Manifest, ControlNetSource]:
    """Refuse what cannot be added before anything loads: OUT must be an export whose U-Net takes residuals."""
    manifest = read_manifest(out)
    if manifest.pipeline.transformer_family:
        family = FAMILY_NAMES[manifest.pipeline.family]
        raise SdexportError(f"{out} is an export of {family}, for which ControlNets are not supported yet")
    if not manifest.pipeline.unet_residual_scales or "unet" not in manifest.components:
        raise SdexportError(
            f"{out}'s U-Net takes no ControlNet residuals (it predates them): re-export it with "
            "`sdexport convert SOURCE -o OUT --controlnet [NAME=]PATH`"
        )
    source = parse_controlnet(text)
    if manifest.has(source.component) and not overwrite:
        raise SdexportError(f"{out} already has a ControlNet named '{source.name}': pass --overwrite or another NAME=")
    return manifest, source


def _config(folder: Path) -> SimpleNamespace | None:
    path = folder / "config.json"
    return SimpleNamespace(**json.loads(path.read_text())) if path.is_file() else None


def pipeline_view(out: Path, manifest: Manifest):
    """What tracing reads of a pipeline, from the export's configs: the U-Net's and VAE's configs, the text
    encoders' widths, the tokenizers' lengths; no weights."""
    from diffusers.configuration_utils import FrozenDict

    facts = manifest.pipeline
    view = SimpleNamespace(
        unet=SimpleNamespace(config=FrozenDict(json.loads((out / "unet" / "config.json").read_text()))),
        vae=SimpleNamespace(config=FrozenDict(json.loads((out / "vae_decoder" / "config.json").read_text()))),
        config=FrozenDict({"requires_aesthetics_score": bool(facts.requires_aesthetics_score)}),
        tokenizer=SimpleNamespace(model_max_length=facts.tokenizer_max_length) if facts.tokenizer_max_length else None,
        tokenizer_2=SimpleNamespace(model_max_length=facts.tokenizer_2_max_length),
    )
    for name in ("text_encoder", "text_encoder_2"):
        config = _config(out / name)
        setattr(view, name, SimpleNamespace(config=config) if config is not None else None)
    return view


def add_controlnet(
    out: str | os.PathLike, text: str, check: bool = True, overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Export the ControlNet `[NAME=]PATH` into the export OUT, as convert --controlnet would have."""
    out = Path(out)
    started = time.perf_counter()
    manifest, source = check_add(out, text, overwrite)
    view = pipeline_view(out, manifest)
    attach_controlnets(view, [source], log)
    unet = manifest.components["unet"]
    for model in controlnet_models(view).values():
        set_module_attention(model, unet.attention)
    plan = ExportPlan(
        facts=manifest.pipeline,
        size_multiple=manifest.size_multiple,
        static=manifest.static,
        attention=unet.attention,
        components={source.component: ComponentPlan(source.component, manifest.dtype, EXPORT_DTYPE)},
        lean=True,
        compare=check and checkable(manifest.target),
    )
    staging = out / f".add-{source.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        entry, laid_out = _export_into(staging, view, source, manifest, plan, log)
        final = out / source.component
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(exist_ok=True)
        os.replace(staging / source.component, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    updated = replace(manifest, components={**manifest.components, source.component: entry})
    if laid_out:
        updated = with_cpu_layout_probe(out, updated)
    _replace_manifest(out, updated)
    log(f"added ControlNet '{source.name}' to {out} in {time.perf_counter() - started:.1f} s")
    return out


def _export_into(staging: Path, view, source: ControlNetSource, manifest: Manifest, plan: ExportPlan, log):
    component = source.component
    traced = trace_component(
        component, view, staging, manifest.pipeline, manifest.static, manifest.opset, reference=plan.compare
    )
    written = finish_component(
        traced, staging, manifest.target, manifest.dtype == "fp16", bool(manifest.pipeline.upcast_attention)
    )
    spec_of(component).save_config(spec_of(component).module_of(view, component), staging / component)
    entry = component_entry(component, manifest.dtype, plan, traced.dims, written)
    log(exported_line(component, traced.seconds, entry, written, plan.compare))
    return entry, written.laid_out


def _replace_manifest(out: Path, manifest: Manifest) -> None:
    """Write the manifest beside the old one and rename it over, so readers see one or the other whole."""
    staging = out / f".manifest.tmp-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        os.replace(write_manifest(staging, manifest), out / "sdexport.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
