"""`sdexport convert`: SOURCE -> an exported folder, in four steps that each read the plan:
plan (plan.py) -> trace every component (trace.py) -> finish each graph (component_export.py) ->
configs and manifest (artifacts.py). It is written into a staged folder and put in place when
complete (staging.py), optionally validated against PyTorch before that (fp32_fallback.py).

(The module is not named convert.py: `sdexport.convert` is the package's function, which a
submodule of that name would replace once imported.)"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from sdruntime.manifest import ComponentEntry, Manifest, config_file_entries, file_entry, write_manifest

from .artifacts import Written, component_entry, export_manifest, with_cpu_layout_probe, write_configs
from .component_export import checkable, finish_component
from .controlnet import attach_controlnets, check_controlnet_sources
from .convert_options import ConvertOptions, check_options, check_output
from .errors import SdexportError, ValidationFailed
from .families import FAMILY_NAMES
from .fp32_fallback import check_convert_options, validate_conversion
from .load import attach_tiny_vae, load_source, replace_vae
from .lora import check_loras, fuse_loras
from .plan import ExportPlan, force_upcast_note, plan_export
from .progress import end, mark
from .specs import set_attention, spec_of, transformer_family
from .staging import staged_folder
from .trace import Traced, release_unused, release_weights, trace_component


def convert(source: str, out: str | os.PathLike, **options) -> Path:
    """Export SOURCE to OUT; see `sdexport convert --help` for the options."""
    opts = ConvertOptions(**options)
    check_options(opts)
    validating = opts.validate or opts.auto_fp32_fallback
    if validating:
        check_convert_options(opts.dtype, opts.target, opts.auto_fp32_fallback)
    loras = check_loras(opts.loras)
    out = Path(out)
    check_output(out, opts.overwrite)
    log = opts.log
    started = time.perf_counter()
    # a failed validation's export stays in its temporary folder, with the report, for inspection
    with staged_folder(out, log, keep=(ValidationFailed,)) as tmp:
        mark("pipeline", "load")
        src = load_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
        end()
        log(f"loaded {src.kind} '{src.name}' in {time.perf_counter() - started:.1f} s")
        check_family_options(src.pipe, loras, opts.controlnets, opts.quantize)
        if opts.vae:
            replace_vae(src, opts.vae)
            log(f"replaced the pipeline's VAE with {src.vae}")
        if opts.tiny_vae:
            attach_tiny_vae(src, opts.tiny_vae)
            log(f"exporting the tiny VAE {src.tiny_vae} as vae_decoder_tiny")
        if loras:
            src.loras = fuse_loras(src.pipe, loras, log)
        attach_controlnets(src.pipe, check_controlnet_sources(opts.controlnets), log)
        manifest = export_all(src, tmp, opts)
        mark("pipeline", "manifest")
        write_configs(src.pipe, src, tmp, list(manifest.components))
        write_manifest(tmp, replace(manifest, config_files=config_file_entries(tmp)))
        if opts.quantize:
            quantize_written(tmp, opts)
        if validating:
            mark("pipeline", "validate")
            validate_conversion(src, tmp, out, opts.target, opts.auto_fp32_fallback, log)
        end()
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def quantize_written(folder: Path, opts: ConvertOptions) -> None:
    """--quantize: the written export's graphs made int8 in place (quantize.py)."""
    from .quantize import DEFAULT_PROMPTS, quantize_export, read_prompts, scheme_of

    prompts = read_prompts(opts.calibration_prompts) if opts.calibration_prompts else list(DEFAULT_PROMPTS)
    quantize_export(folder, scheme_of(opts.quantize), prompts, opts.quantize_vae, opts.log)


def check_family_options(pipe, loras, controlnets, quantize: str | None = None) -> None:
    """LoRAs, ControlNets and int8 are fitted to U-Nets: refused for SD3 and Flux in one line, before any export."""
    family = transformer_family(pipe)
    if family and (loras or controlnets):
        what = "--lora" if loras else "--controlnet"
        raise SdexportError(f"{what} is not supported for {FAMILY_NAMES[family]} pipelines yet: convert without it")
    if family and quantize:
        raise SdexportError("--quantize supports U-Net pipelines (SD 1.x/2.x, SDXL): convert SD3 or Flux without it")


def export_all(src, tmp: Path, opts: ConvertOptions) -> Manifest:
    """Every requested component: planned, traced (the graphs are then finished without torch), finished
    and written, then the manifest."""
    plan = plan_export(src.pipe, opts, checkable(opts.target))
    set_attention(src.pipe, plan.attention)
    if note := force_upcast_note(plan):
        opts.log(note)
    extra_files = write_extra_files(src.pipe, tmp, plan)
    traced = trace_all(src.pipe, tmp, opts.opset, plan)
    components = {}
    laid_out = False
    for item in traced:
        started = time.perf_counter() - item.seconds  # the logged time includes the component's tracing
        written = finish_component(
            item, tmp, opts.target, plan.components[item.component].fp16, bool(plan.facts.upcast_attention)
        )
        written = replace(written, files=written.files + extra_files.get(item.component, ()))
        components[item.component] = entry = component_entry(
            item.component, plan.components[item.component].dtype, plan, item.dims, written
        )
        laid_out = laid_out or written.laid_out
        opts.log(exported_line(item.component, time.perf_counter() - started, entry, written, opts.check))
    manifest = export_manifest(src, tmp, opts, plan, components)
    return with_cpu_layout_probe(tmp, manifest) if laid_out else manifest


def write_extra_files(pipe, folder: Path, plan: ExportPlan) -> dict[str, tuple]:
    """The files some components carry besides their graph (text_encoder's final LayerNorm), written while
    the weights are still there; their manifest entries by component."""
    written = {}
    for component in plan.components:
        if spec_of(component).extra_files is not None:
            names = spec_of(component).extra_files(pipe, folder)
            written[component] = tuple(file_entry(folder, name) for name in names)
    return written


def trace_all(pipe, folder: Path, opset: int, plan: ExportPlan) -> list[Traced]:
    """Every planned component traced, in the IO table's order, with PyTorch's reference outputs where
    the plan compares; in a lean plan each module is freed once its last component is traced."""
    if plan.lean:
        release_unused(pipe, list(plan.components))
    traced = []
    # the U-Net last, each module freed once its last component is traced: tracing an SDXL U-Net with
    # the text encoders and VAE still held passed 16 GB
    for i, component in enumerate(order := plan.trace_order()):
        mark(component, "trace")
        traced.append(trace_component(component, pipe, folder, plan.facts, plan.static, opset, plan.compare))
        if plan.lean:
            release_unused(pipe, order[i + 1 :])
    if plan.lean:  # PyTorch's outputs are kept: ORT loads alone
        release_weights(pipe)
    return sorted(traced, key=lambda t: list(plan.components).index(t.component))


def exported_line(component: str, seconds: float, entry: ComponentEntry, written: Written, check: bool) -> str:
    """The log line of one exported component: its dtype, time, size and error against PyTorch."""
    size = sum(f.bytes for f in entry.files) / 1e6
    result = written.compared
    detail = "" if result or not check else ", not compared with PyTorch (the cuda target runs on the CUDA EP only)"
    if result:
        detail = f", max abs diff vs PyTorch {result['max_abs_diff']:.2e} (relative L2 {result['relative_l2']:.1e})"
        if not result["finite"]:
            detail += ", NaN/Inf in the output"
    return f"exported {component} ({entry.dtype}) in {seconds:.1f} s, {size:.1f} MB{detail}"
