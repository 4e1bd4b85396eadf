"""`sdexport convert`: SOURCE -> an exported folder (ONNX graphs, tokenizer, scheduler, manifest)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import numpy as np
import onnx
import onnxruntime
import onnxruntime as ort
import torch
import transformers
from sdruntime.manifest import (
    COMPONENTS,
    CPU_LAYOUT_FORMAT_VERSION,
    DTYPES,
    FINAL_LAYER_NORM,
    FORMAT_VERSION,
    TARGETS,
    TARGETS_TABLE,
    ComponentEntry,
    ExportSource,
    FileEntry,
    LayoutProbe,
    LoraEntry,
    Manifest,
    PipelineFacts,
    StaticShapes,
    axis_sizes,
    describe_io,
    facts_io,
    file_entry,
)
from transformers import CLIPTokenizerFast

from . import __version__
from .components import (
    final_layer_norm,
    first_tokenizer,
    model_dims,
    num_hidden_states,
    num_time_ids,
    pipeline_components,
    set_attention,
    size_multiple,
    vae_scale_factor,
)
from .errors import SdexportError
from .export import (
    Reference,
    compare_outputs,
    graph_of,
    reference_outputs,
    release_unused,
    release_weights,
    save_model,
    trace,
)
from .families import pipeline_family
from .graph_check import check_written_graph
from .optimize import CPU_LAYOUT_PROBE, finish_graph, uses_cpu_layout, write_cpu_layout_probe
from .scheduler_config import write_scheduler_config

SOURCE_DOCS = ("LICENSE", "LICENSE.md", "LICENSE.txt", "README.md", "model_card.md")


@dataclass
class ConvertOptions:
    components: Sequence[str] = COMPONENTS
    dtype: str = "fp32"
    keep_fp32: Sequence[str] = ()
    target: str = "generic"
    opset: int = 17
    static: bool = False
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    overwrite: bool = False
    check: bool = True
    log: Callable[[str], None] = field(default=print)
    loras: Sequence = ()  # "FILE[:SCALE]" or (FILE, SCALE), fused in order (sdexport/lora.py)
    config: str | None = None  # single-file checkpoints: a diffusers folder with the configs
    prediction_type: str | None = None  # single-file checkpoints: epsilon | v_prediction
    allow_pickle: bool = False  # single-file checkpoints: read a .ckpt with torch.load(weights_only=True)
    validate: bool = False  # run `sdexport validate`'s checks before OUT is put in place
    auto_fp32_fallback: bool = False  # fp16: keep the nodes validation blames in fp32 (implies validate)
    vae: str | None = None  # a diffusers AutoencoderKL folder that replaces the pipeline's VAE before export


def checkable(target: str) -> bool:
    """Whether this machine can run the target's graphs to compare them with PyTorch."""

    return TARGETS_TABLE[target].check_provider in ort.get_available_providers()


def check_written(component: str, path: Path, target: str) -> None:
    """The written graph type-checks and, where this machine runs its target, loads (graph_check.py)."""

    check_written_graph(component, path, TARGETS_TABLE[target].check_provider if checkable(target) else None)


def check_options(opts: ConvertOptions) -> None:
    """Refuse bad options before anything is loaded or written."""
    unknown = [c for c in opts.components if c not in COMPONENTS]
    if unknown or not opts.components:
        raise SdexportError(f"unknown component '{(unknown or [''])[0]}': choose from {', '.join(COMPONENTS)}")
    bad_keep = [c for c in opts.keep_fp32 if c not in COMPONENTS]
    if bad_keep:
        raise SdexportError(f"unknown component '{bad_keep[0]}' in --keep-fp32: choose from {', '.join(COMPONENTS)}")
    if opts.dtype not in DTYPES:
        raise SdexportError(f"unknown dtype '{opts.dtype}': choose fp32 or fp16")
    if opts.target not in TARGETS:
        raise SdexportError(f"unknown target '{opts.target}': choose from {', '.join(TARGETS)}")
    if opts.target == "tensorrt" and opts.dtype == "fp16":
        raise SdexportError(
            "--target tensorrt exports fp32 graphs: TensorRT builds fp16 engines itself (trt_fp16_enable, "
            "on by default in sdruntime); drop --dtype fp16"
        )
    if not 14 <= opts.opset <= 20:
        raise SdexportError(f"opset {opts.opset} is not supported: choose 14 to 20 (default 17)")
    if opts.static and opts.batch_size < 1:
        raise SdexportError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if not opts.static and (opts.height or opts.width):
        raise SdexportError("--height and --width fix the shapes of a static export: add --static")


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SdexportError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise SdexportError(f"{out} exists and is not a folder: choose another -o")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("/"))  # created when missing
    if not parent.is_dir():
        raise SdexportError(f"{parent} is not a folder: choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SdexportError(f"{parent} is not writable: choose another -o")


def pipeline_facts(pipe, family: str) -> PipelineFacts:
    factor = vae_scale_factor(pipe)
    tokenizer = first_tokenizer(pipe)
    unet = pipe.unet.config
    sdxl = sdxl_facts(pipe) if family == "sdxl" else {}
    time_cond = unet.get("time_cond_proj_dim")
    return PipelineFacts(
        family=family,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=factor,
        latent_channels=int(pipe.unet.config.in_channels),
        default_height=int(pipe.unet.config.sample_size) * factor,
        default_width=int(pipe.unet.config.sample_size) * factor,
        tokenizer_max_length=int(tokenizer.model_max_length),
        pad_token_id=int(tokenizer.pad_token_id),
        scheduler_class=pipe.scheduler.__class__.__name__,
        upcast_attention=bool(pipe.unet.config.get("upcast_attention", False)),
        num_hidden_states=num_hidden_states(pipe) or None,
        time_cond_proj_dim=int(time_cond) if time_cond is not None else None,
        vae_force_upcast=bool(pipe.vae.config.get("force_upcast", True)) if family == "sdxl" else None,
        **sdxl,
    )


def sdxl_facts(pipe) -> dict:
    """The SDXL pipeline facts: the second text encoder and tokenizer, the U-Net's added
    conditioning and the pipeline's config flags (refused when the widths do not add up)."""

    unet = pipe.unet.config
    encoder = pipe.text_encoder_2.config
    passed = unet.addition_time_embed_dim * num_time_ids(pipe) + encoder.projection_dim
    if passed != unet.projection_class_embeddings_input_dim:
        raise SdexportError(
            f"the U-Net's projection_class_embeddings_input_dim is {unet.projection_class_embeddings_input_dim}, but "
            f"{num_time_ids(pipe)} time ids x addition_time_embed_dim {unet.addition_time_embed_dim} + text_encoder_2's "
            f"projection_dim {encoder.projection_dim} make {passed}: check requires_aesthetics_score in model_index.json"
        )
    return {
        "num_hidden_states_2": num_hidden_states(pipe, "text_encoder_2"),
        "text_encoder_2_hidden_size": int(encoder.hidden_size),
        "text_encoder_2_projection_dim": int(encoder.projection_dim),
        "tokenizer_2_max_length": int(pipe.tokenizer_2.model_max_length),
        "tokenizer_2_pad_token_id": int(pipe.tokenizer_2.pad_token_id),
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(pipe.config.get("requires_aesthetics_score", False)),
        "addition_time_embed_dim": int(unet.addition_time_embed_dim),
        "projection_class_embeddings_input_dim": int(unet.projection_class_embeddings_input_dim),
    }


def versions() -> dict:
    return {
        "sdexport": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_tokenizer(tokenizer, folder: Path) -> None:
    """vocab.json, merges.txt and a tokenizer.json whose padding and truncation are set."""

    tokenizer.save_pretrained(folder)
    fast = CLIPTokenizerFast.from_pretrained(folder)
    backend = fast.backend_tokenizer
    length = tokenizer.model_max_length
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=length)
    backend.enable_truncation(max_length=length)
    backend.save(str(folder / "tokenizer.json"))


# model_index.json's entries kept from the source pipeline, and the optimum class each family loads with
INDEX_KEYS = (
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "unet",
    "scheduler",
    "force_zeros_for_empty_prompt",
    "requires_aesthetics_score",
)
ORT_CLASSES = {
    "StableDiffusionXLPipeline": "ORTStableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "ORTStableDiffusionXLImg2ImgPipeline",
}


def model_index(pipe) -> dict:
    """optimum's model_index.json: the source's entries, the VAE as two parts, the ORT class."""
    index = {k: v for k, v in dict(pipe.config).items() if k in INDEX_KEYS}
    index.update(
        {
            "_class_name": ORT_CLASSES.get(type(pipe).__name__, "ORTStableDiffusionPipeline"),
            "_diffusers_version": pipe.config.get("_diffusers_version", ""),
            "vae_decoder": ["diffusers", "AutoencoderKL"],
            "vae_encoder": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [None, None],
        }
    )
    if "text_encoder_2" not in index:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    return index


def write_configs(pipe, source, tmp: Path, components: Sequence[str]) -> None:
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            write_tokenizer(getattr(pipe, name), tmp / name)
    write_scheduler_config(pipe.scheduler, tmp / "scheduler")
    configs = {
        "text_encoder": lambda d: pipe.text_encoder.config.save_pretrained(d),
        "text_encoder_2": lambda d: pipe.text_encoder_2.config.save_pretrained(d),
        "unet": lambda d: pipe.unet.save_config(d),
        "vae_decoder": lambda d: pipe.vae.save_config(d),
        "vae_encoder": lambda d: pipe.vae.save_config(d),
    }
    for component in components:
        configs[component](tmp / component)
    (tmp / "model_index.json").write_text(json.dumps(model_index(pipe), indent=2) + "\n")
    if source.folder is not None:
        for name in SOURCE_DOCS:
            if (source.folder / name).is_file():
                shutil.copy2(source.folder / name, tmp / name)


@dataclass
class Written:
    """What finish_component wrote of one component: its files, the nodes kept in fp32, the
    comparison with PyTorch (None when not compared) and whether ORT laid it out in NCHWc blocks."""

    files: tuple[FileEntry, ...]
    fp32_nodes: tuple[str, ...]
    compared: dict | None
    laid_out: bool


@dataclass
class Traced:
    """One component traced to an fp32 ONNX file, with the latent size and batch it is checked at."""

    component: str
    path: Path
    dims: dict[str, int]  # the IO table's axes this export fixes (model dims, plus static ones)
    latent: tuple[int, int]
    batch: int
    seconds: float
    reference: Reference | None = None  # PyTorch's outputs to compare the finished graph with


TRACE_MAX_LATENT = 64  # SD 1.5's 512x512; the graphs are dynamic, so any size traces the same ops


def trace_shapes(
    component: str, facts: PipelineFacts, static: StaticShapes | None
) -> tuple[dict[str, int], tuple[int, int], int]:
    """The fixed axes, latent size and batch a component is checked with (static exports fix them;
    dynamic ones use the default height, square, with a batch of 2, but at most TRACE_MAX_LATENT
    latent pixels a side: see traced_latent)."""
    if static:
        fixed = axis_sizes(facts, component, static.batch_size, static.height, static.width)
        return fixed, (fixed["height"], fixed["width"]), fixed["batch"]
    side = min(facts.default_height, TRACE_MAX_LATENT * facts.vae_scale_factor)
    sizes = axis_sizes(facts, component, 1, side, side)
    return {}, (sizes["height"], sizes["width"]), 2


def traced_latent(latent: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The latent size a component is traced at: at most TRACE_MAX_LATENT a side (a multiple of the
    model's latent size multiple). The tracer keeps every activation of its forward pass alive,
    which at SDXL's 1024x1024 passed 10 GB on top of the U-Net's weights; every export is traced
    with symbolic axes (a static one gets its sizes written in afterwards), so the size it is
    traced at does not change the graph."""
    cap = max(multiple, TRACE_MAX_LATENT - TRACE_MAX_LATENT % multiple)
    return min(latent[0], cap), min(latent[1], cap)


def trace_component(
    component: str,
    pipe,
    folder: Path,
    facts: PipelineFacts,
    static: StaticShapes | None,
    opset: int,
    reference: bool = False,
) -> Traced:
    """Trace one component to `folder/.fp32/<component>/model.onnx`; with `reference`, keep PyTorch's
    outputs for random inputs (a static export's batch and size, else 1) to compare the finished graph with."""
    started = time.perf_counter()
    fixed, latent, batch = trace_shapes(component, facts, static)
    at = traced_latent(latent, size_multiple(pipe) // facts.vae_scale_factor)
    path = trace(component, pipe, opset, fixed, at, batch, folder / ".fp32" / component / "model.onnx")
    outputs = reference_outputs(component, pipe, batch if fixed.get("batch") else 1, latent) if reference else None
    dims = {**model_dims(pipe), **fixed}
    return Traced(component, path, dims, latent, batch, time.perf_counter() - started, outputs)


def finish_component(
    traced: Traced,
    folder: Path,
    target: str,
    fp16: bool,
    upcast_attention: bool,
    extra_fp32_nodes: Sequence[str] = (),
) -> Written:
    """Finish a traced graph for the target and dtype, write it, check it, and compare it with
    PyTorch's outputs when it was traced with a reference. Returns what the manifest records of it."""

    component = traced.component
    model, kept = finish_graph(component, traced.path, target, fp16, upcast_attention, extra_fp32_nodes)
    shutil.rmtree(traced.path.parent)
    with contextlib.suppress(OSError):
        traced.path.parent.parent.rmdir()  # the .fp32 folder, once every traced graph is finished
    path = folder / component / "model.onnx"
    files = save_model(model, path)
    laid_out = uses_cpu_layout(graph_of(model))
    del model
    check_written(component, path, target)
    result = None
    if traced.reference is not None:
        result = compare_outputs(traced.reference, path, provider=TARGETS_TABLE[target].check_provider)
    return Written(tuple(file_entry(folder, f"{component}/{name}") for name in files), tuple(kept), result, laid_out)


def export_component(
    component: str,
    pipe,
    folder: Path,
    facts: PipelineFacts,
    static: StaticShapes | None,
    opset: int,
    target: str,
    fp16: bool,
    extra_fp32_nodes: Sequence[str] = (),
    compare: bool = True,
) -> Written:
    """Trace, finish, write and check one component: the path every export takes (finish_component)."""
    traced = trace_component(component, pipe, folder, facts, static, opset, compare and checkable(target))
    return finish_component(traced, folder, target, fp16, bool(facts.upcast_attention), extra_fp32_nodes)


def static_shapes(opts: ConvertOptions, facts: PipelineFacts, multiple: int) -> StaticShapes | None:
    """The manifest's `static` entry of a static export (sizes checked against the size multiple)."""
    if not opts.static:
        return None
    height = opts.height or facts.default_height
    width = opts.width or facts.default_width
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise SdexportError(f"--{name} {value} is not a multiple of {multiple} (this model's size multiple)")
    return StaticShapes(opts.batch_size, height, width)


def export_components(pipe, requested: Sequence[str]) -> list[str]:
    """The requested components this pipeline has, in the IO table's order. The default request
    (every component) means all the pipeline has; a component named on purpose must exist."""

    present = pipeline_components(pipe)
    missing = [c for c in requested if c not in present]
    if missing and tuple(requested) != COMPONENTS:
        raise SdexportError(f"this pipeline has no {missing[0]}: choose --components from {', '.join(present)}")
    return [c for c in COMPONENTS if c in requested and c in present]


def component_dtype(component: str, opts: ConvertOptions, facts: PipelineFacts) -> str:
    """fp16 unless the component is kept in fp32: by --keep-fp32, or SDXL's VAE whose config says
    force_upcast (it overflows in fp16, so diffusers decodes in fp32 too)."""
    if opts.dtype != "fp16" or component in opts.keep_fp32:
        return "fp32"
    if component.startswith("vae_") and facts.vae_force_upcast:
        return "fp32"
    return "fp16"


def trace_order(wanted: Sequence[str]) -> list[str]:
    """The order components are traced in: the U-Net, the largest, last."""
    return sorted(wanted, key=lambda component: component == "unet")


def export_all(src, tmp: Path, opts: ConvertOptions) -> Manifest:
    """Every requested component, traced first (the graphs are then finished without torch), and the manifest."""

    pipe = src.pipe
    facts = pipeline_facts(pipe, pipeline_family(pipe))
    multiple = size_multiple(pipe)
    static = static_shapes(opts, facts, multiple)
    attention = TARGETS_TABLE[opts.target].attention
    set_attention(pipe, attention)
    wanted = export_components(pipe, opts.components)
    kept = [
        c
        for c in wanted
        if c.startswith("vae_")
        and opts.dtype == "fp16"
        and c not in opts.keep_fp32
        and component_dtype(c, opts, facts) == "fp32"
    ]
    if kept:
        opts.log(
            f"keeping {' and '.join(kept)} in fp32: the VAE config says force_upcast (SDXL's VAE overflows "
            "in fp16); pass --vae with an fp16-safe VAE (force_upcast false) to export it in fp16"
        )
    lean = not (opts.validate or opts.auto_fp32_fallback)  # validation runs the whole pipeline in PyTorch
    if "text_encoder" in wanted:
        (tmp / FINAL_LAYER_NORM).parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / FINAL_LAYER_NORM, **final_layer_norm(pipe))
    if lean:
        release_unused(pipe, wanted)
    check = opts.check and checkable(opts.target)
    traced = []
    # the U-Net last, each module freed once its last component is traced: tracing an SDXL U-Net with
    # the text encoders and VAE still held passed 16 GB
    for i, component in enumerate(order := trace_order(wanted)):
        traced.append(trace_component(component, pipe, tmp, facts, static, opts.opset, check))
        if lean:
            release_unused(pipe, order[i + 1 :])
    traced.sort(key=lambda t: wanted.index(t.component))
    if lean:  # PyTorch's outputs are kept: ORT loads alone
        release_weights(pipe)
    components = {}
    laid_out = False
    for item in traced:
        component = item.component
        t0 = time.perf_counter() - item.seconds  # the logged time includes the component's tracing
        dtype = component_dtype(component, opts, facts)
        written = finish_component(item, tmp, opts.target, dtype == "fp16", bool(facts.upcast_attention))
        result = written.compared
        laid_out = laid_out or written.laid_out
        files = written.files + ((file_entry(tmp, FINAL_LAYER_NORM),) if component == "text_encoder" else ())
        io = facts_io(facts, component)
        inputs, outputs = describe_io(component, dtype, item.dims, io=io)
        entry = ComponentEntry(
            path=f"{component}/model.onnx",
            files=files,
            dtype=dtype,
            attention=attention,
            fp32_nodes=written.fp32_nodes,
            export_max_abs_diff=result["max_abs_diff"] if result else None,
            export_relative_l2=result["relative_l2"] if result else None,
            inputs=inputs,
            outputs=outputs,
        )
        components[component] = entry
        size = sum(f.bytes for f in entry.files) / 1e6
        detail = (
            "" if result or not opts.check else ", not compared with PyTorch (the cuda target runs on the CUDA EP only)"
        )
        if result:
            detail = f", max abs diff vs PyTorch {result['max_abs_diff']:.2e} (relative L2 {result['relative_l2']:.1e})"
            if not result["finite"]:
                detail += ", NaN/Inf in the output"
        opts.log(f"exported {component} ({dtype}) in {time.perf_counter() - t0:.1f} s, {size:.1f} MB{detail}")
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_by=versions(),
        source=ExportSource(src.kind, src.name, tuple(LoraEntry.from_json(x) for x in src.loras), src.vae),
        dtype=opts.dtype,
        target=opts.target,
        opset=opts.opset,
        pipeline=facts,
        size_multiple=multiple,
        static=static,
        components=components,
        folder=tmp,
    )
    return with_cpu_layout_probe(tmp, manifest) if laid_out else manifest


def with_cpu_layout_probe(folder: Path, manifest: Manifest) -> Manifest:
    """The manifest with the probe that tells the runtime whether this CPU reads the graphs' NCHWc layout."""

    if manifest.cpu_layout_probe is not None:
        return manifest
    files = write_cpu_layout_probe(folder)
    probe = LayoutProbe(f"{CPU_LAYOUT_PROBE}/model.onnx", tuple(file_entry(folder, name) for name in files))
    # runtimes that skip the probe refuse the format version
    return replace(manifest, cpu_layout_probe=probe, format_version=CPU_LAYOUT_FORMAT_VERSION)
