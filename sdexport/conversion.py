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

import numpy as np
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
    file_entry,
)

from .errors import SdexportError
from .families import pipeline_family

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


def checkable(target: str) -> bool:
    """Whether this machine can run the target's graphs to compare them with PyTorch."""
    import onnxruntime as ort

    return TARGETS_TABLE[target].check_provider in ort.get_available_providers()


def check_written(component: str, path: Path, target: str) -> None:
    """The written graph type-checks and, where this machine runs its target, loads (graph_check.py)."""
    from .graph_check import check_written_graph

    check_written_graph(component, path, TARGETS_TABLE[target].check_provider if checkable(target) else None)


def check_options(opts: ConvertOptions) -> None:
    """Refuse bad options before anything is loaded or written."""
    unknown = [c for c in opts.components if c not in COMPONENTS]
    if unknown or not opts.components:
        raise SdexportError(
            f"unknown component '{(unknown or [''])[0]}': choose from {', '.join(COMPONENTS)}"
        )
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
    from .components import num_hidden_states, vae_scale_factor

    factor = vae_scale_factor(pipe)
    tokenizer = pipe.tokenizer
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
        num_hidden_states=num_hidden_states(pipe),
    )


def versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import __version__

    return {
        "sdexport": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
    }


def write_tokenizer(pipe, folder: Path) -> None:
    """vocab.json, merges.txt and a tokenizer.json whose padding and truncation are set."""
    from transformers import CLIPTokenizerFast

    pipe.tokenizer.save_pretrained(folder)
    fast = CLIPTokenizerFast.from_pretrained(folder)
    backend = fast.backend_tokenizer
    length = pipe.tokenizer.model_max_length
    backend.enable_padding(pad_id=pipe.tokenizer.pad_token_id, pad_token=pipe.tokenizer.pad_token, length=length)
    backend.enable_truncation(max_length=length)
    backend.save(str(folder / "tokenizer.json"))


def write_configs(pipe, source, tmp: Path, components: Sequence[str]) -> None:
    write_tokenizer(pipe, tmp / "tokenizer")
    from .scheduler_config import write_scheduler_config  # only the keys the source set: swaps then match diffusers
    write_scheduler_config(pipe.scheduler, tmp / "scheduler")
    configs = {
        "text_encoder": lambda d: pipe.text_encoder.config.save_pretrained(d),
        "unet": lambda d: pipe.unet.save_config(d),
        "vae_decoder": lambda d: pipe.vae.save_config(d),
        "vae_encoder": lambda d: pipe.vae.save_config(d),
    }
    for component in components:
        configs[component](tmp / component)
    index = {k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}
    index = {k: v for k, v in index.items() if k in ("text_encoder", "tokenizer", "unet", "scheduler")}
    index.update({
        "_class_name": "ORTStableDiffusionPipeline",
        "_diffusers_version": pipe.config.get("_diffusers_version", ""),
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
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
    """One component traced to an fp32 ONNX file, with the shapes it was traced at."""

    component: str
    path: Path
    dims: dict[str, int]  # the IO table's axes this export fixes (model dims, plus static ones)
    latent: tuple[int, int]
    batch: int
    seconds: float


def trace_shapes(component: str, facts: PipelineFacts,
                 static: StaticShapes | None) -> tuple[dict[str, int], tuple[int, int], int]:
    """The fixed axes, latent size and batch a component is traced with (static exports fix them;
    dynamic ones are traced at the default height, square, with a batch of 2)."""
    if static:
        fixed = axis_sizes(facts, component, static.batch_size, static.height, static.width)
        return fixed, (fixed["height"], fixed["width"]), fixed["batch"]
    sizes = axis_sizes(facts, component, 1, facts.default_height, facts.default_height)
    return {}, (sizes["height"], sizes["width"]), 2


def trace_component(component: str, pipe, folder: Path, facts: PipelineFacts, static: StaticShapes | None,
                    opset: int) -> Traced:
    """Trace one component to `folder/.fp32/<component>/model.onnx`."""
    from .components import model_dims
    from .export import trace

    started = time.perf_counter()
    fixed, latent, batch = trace_shapes(component, facts, static)
    path = trace(component, pipe, opset, fixed, latent, batch, folder / ".fp32" / component / "model.onnx")
    return Traced(component, path, {**model_dims(pipe), **fixed}, latent, batch, time.perf_counter() - started)


def finish_component(traced: Traced, folder: Path, target: str, fp16: bool, upcast_attention: bool,
                     extra_fp32_nodes: Sequence[str] = (), compare_with=None) -> Written:
    """Finish a traced graph for the target and dtype, write it, check it, and compare it with
    PyTorch when `compare_with` (the pipeline) is given. Returns what the manifest records of it."""
    from .export import compare_with_torch, save_model
    from .optimize import finish_graph, uses_cpu_layout

    component = traced.component
    model, kept = finish_graph(component, traced.path, target, fp16, upcast_attention, extra_fp32_nodes)
    shutil.rmtree(traced.path.parent)
    with contextlib.suppress(OSError):
        traced.path.parent.parent.rmdir()  # the .fp32 folder, once every traced graph is finished
    path = folder / component / "model.onnx"
    files = save_model(model, path)
    laid_out = uses_cpu_layout(model)
    del model
    check_written(component, path, target)
    result = None
    if compare_with is not None:
        result = compare_with_torch(component, compare_with, path, traced.batch if traced.dims.get("batch") else 1,
                                    traced.latent, provider=TARGETS_TABLE[target].check_provider)
    return Written(tuple(file_entry(folder, f"{component}/{name}") for name in files), tuple(kept), result, laid_out)


def export_component(component: str, pipe, folder: Path, facts: PipelineFacts, static: StaticShapes | None,
                     opset: int, target: str, fp16: bool, extra_fp32_nodes: Sequence[str] = (),
                     compare: bool = True) -> Written:
    """Trace, finish, write and check one component: the path every export takes (finish_component)."""
    traced = trace_component(component, pipe, folder, facts, static, opset)
    return finish_component(traced, folder, target, fp16, bool(facts.upcast_attention), extra_fp32_nodes,
                            pipe if compare and checkable(target) else None)


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


def export_all(src, tmp: Path, opts: ConvertOptions) -> Manifest:
    """Every requested component, traced first (the graphs are then finished without torch), and the manifest."""
    from .components import final_layer_norm, set_attention, size_multiple
    from .export import release_weights

    pipe = src.pipe
    facts = pipeline_facts(pipe, pipeline_family(pipe))
    multiple = size_multiple(pipe)
    static = static_shapes(opts, facts, multiple)
    attention = TARGETS_TABLE[opts.target].attention
    set_attention(pipe, attention)
    traced = [trace_component(c, pipe, tmp, facts, static, opts.opset) for c in opts.components]
    if "text_encoder" in opts.components:
        (tmp / FINAL_LAYER_NORM).parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / FINAL_LAYER_NORM, **final_layer_norm(pipe))
    check = opts.check and checkable(opts.target)
    if not check and not (opts.validate or opts.auto_fp32_fallback):
        release_weights(pipe)
    components = {}
    laid_out = False
    for item in traced:
        component = item.component
        t0 = time.perf_counter() - item.seconds  # the logged time includes the component's tracing
        dtype = "fp16" if opts.dtype == "fp16" and component not in opts.keep_fp32 else "fp32"
        written = finish_component(item, tmp, opts.target, dtype == "fp16", bool(facts.upcast_attention),
                                   compare_with=pipe if check else None)
        result = written.compared
        laid_out = laid_out or written.laid_out
        files = written.files + ((file_entry(tmp, FINAL_LAYER_NORM),) if component == "text_encoder" else ())
        inputs, outputs = describe_io(component, dtype, item.dims, facts.num_hidden_states or 0)
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
        detail = "" if result or not opts.check else ", not compared with PyTorch (the cuda target runs on the CUDA EP only)"
        if result:
            detail = f", max abs diff vs PyTorch {result['max_abs_diff']:.2e} (relative L2 {result['relative_l2']:.1e})"
            if not result["finite"]:
                detail += ", NaN/Inf in the output"
        opts.log(f"exported {component} ({dtype}) in {time.perf_counter() - t0:.1f} s, {size:.1f} MB{detail}")
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_by=versions(),
        source=ExportSource(src.kind, src.name, tuple(LoraEntry.from_json(x) for x in src.loras)),
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
    from .optimize import CPU_LAYOUT_PROBE, write_cpu_layout_probe

    if manifest.cpu_layout_probe is not None:
        return manifest
    files = write_cpu_layout_probe(folder)
    probe = LayoutProbe(f"{CPU_LAYOUT_PROBE}/model.onnx", tuple(file_entry(folder, name) for name in files))
    # runtimes that skip the probe refuse the format version
    return replace(manifest, cpu_layout_probe=probe, format_version=CPU_LAYOUT_FORMAT_VERSION)
