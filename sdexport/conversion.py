"""`sdexport convert`: SOURCE -> an exported folder (ONNX graphs, tokenizer, scheduler, manifest)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sdruntime.manifest import (
    COMPONENTS,
    CPU_LAYOUT_FORMAT_VERSION,
    DTYPES,
    FINAL_LAYER_NORM,
    FORMAT_VERSION,
    TARGETS,
    config_file_entries,
    describe_io,
    file_entry,
    write_manifest,
)

from .errors import SdexportError, ValidationFailed

ATTENTION_FOR_TARGET = {"generic": "sdpa", "cpu": "sdpa", "cuda": "plain", "tensorrt": "sdpa"}
LOCK_NAME = ".convert.lock"  # in a convert's temporary folder while it works
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


CHECK_PROVIDER = {"generic": "CPUExecutionProvider", "cpu": "CPUExecutionProvider",
                  "tensorrt": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def checkable(target: str) -> bool:
    """Whether this machine can run the target's graphs to compare them with PyTorch."""
    import onnxruntime as ort

    return CHECK_PROVIDER[target] in ort.get_available_providers()


def check_written(component: str, path: Path, target: str) -> None:
    """The written graph type-checks and, where this machine runs its target, loads (graph_check.py)."""
    from .graph_check import check_written_graph

    check_written_graph(component, path, CHECK_PROVIDER[target] if checkable(target) else None)


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


def pipeline_facts(pipe, family: str) -> dict:
    from .components import num_hidden_states, vae_scale_factor

    factor = vae_scale_factor(pipe)
    tokenizer = pipe.tokenizer
    return {
        "family": family,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_scale_factor": factor,
        "latent_channels": int(pipe.unet.config.in_channels),
        "default_height": int(pipe.unet.config.sample_size) * factor,
        "default_width": int(pipe.unet.config.sample_size) * factor,
        "tokenizer_max_length": int(tokenizer.model_max_length),
        "pad_token_id": int(tokenizer.pad_token_id),
        "scheduler_class": pipe.scheduler.__class__.__name__,
        "upcast_attention": bool(pipe.unet.config.get("upcast_attention", False)),
        "num_hidden_states": num_hidden_states(pipe),
    }


def detect_family(pipe) -> str:
    """sd2 for SD 2.x-shaped U-Nets (linear projections, per-block head dims), else sd1."""
    config = pipe.unet.config
    return "sd2" if config.get("use_linear_projection") or isinstance(config.attention_head_dim, (list, tuple)) else "sd1"


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


def convert(source: str, out: str | os.PathLike, **options) -> Path:
    """Export SOURCE to OUT; see `sdexport convert --help` for the options."""
    opts = ConvertOptions(**options)
    check_options(opts)
    if opts.validate or opts.auto_fp32_fallback:
        from .validate import check_convert_options

        check_convert_options(opts.dtype, opts.target, opts.auto_fp32_fallback)
    from .lora import check_loras, fuse_loras

    loras = check_loras(opts.loras)
    out = Path(out)
    check_output(out, opts.overwrite)

    from .load import load_source

    log = opts.log
    started = time.perf_counter()
    remove_stale_temporaries(out, log)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise SdexportError(f"cannot write to {out.parent} ({e.strerror}): choose another -o") from e
    try:
        with folder_lock(tmp):
            src = load_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
            log(f"loaded {src.kind} '{src.name}' in {time.perf_counter() - started:.1f} s")
            if loras:
                src.loras = fuse_loras(src.pipe, loras, log)
            manifest = export_all(src, tmp, opts)
            write_configs(src.pipe, src, tmp, opts.components)
            manifest["config_files"] = config_file_entries(tmp)
            write_manifest(tmp, manifest)
            if opts.validate or opts.auto_fp32_fallback:
                from .validate import validate_conversion

                validate_conversion(src, tmp, out, opts.target, opts.auto_fp32_fallback, log)
        replace_folder(tmp, out)
    except ValidationFailed:
        raise  # the export stays in its temporary folder, with the report, for inspection
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold a lock file in a convert's temporary folder while it works: process ids do not tell a
    convert on another host or in another container (same shared folder) from a killed one."""
    if os.name != "posix":
        yield
        return
    import fcntl

    path = folder / LOCK_NAME
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def in_use(folder: Path) -> bool:
    """Whether a convert, here or on another host, holds the folder's lock file."""
    import fcntl

    try:
        with open(folder / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def remove_stale_temporaries(out: Path, log: Callable[[str], None]) -> None:
    """Remove what converts to OUT left behind when killed: their `.OUT.tmp-PID` folders, and the
    `.OUT.old-PID` of an interrupted replace once OUT is there. A folder whose process still runs
    or whose lock is held stays, and so does a failed validation's export, which is kept with its
    report for inspection. POSIX only."""
    from .validate import REPORT_NAME

    if os.name != "posix" or not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        if process_alive(int(pid)) or in_use(path):
            continue
        if (kind == "tmp" and (path / REPORT_NAME).is_file()) or (kind == "old" and not out.exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log(f"removed {path}, left by an interrupted convert")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old OUT is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_all(src, tmp: Path, opts: ConvertOptions) -> dict:
    from .components import final_layer_norm, model_dims, set_attention, size_multiple, static_dims, vae_scale_factor
    from .export import compare_with_torch, release_weights, save_model, trace
    from .optimize import finish_graph, uses_cpu_layout

    pipe = src.pipe
    family = detect_family(pipe)
    facts = pipeline_facts(pipe, family)
    multiple = size_multiple(pipe)
    factor = vae_scale_factor(pipe)
    static = None
    if opts.static:
        height = opts.height or facts["default_height"]
        width = opts.width or facts["default_width"]
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise SdexportError(f"--{name} {value} is not a multiple of {multiple} (this model's size multiple)")
        static = {"batch_size": opts.batch_size, "height": height, "width": width}
    attention = ATTENTION_FOR_TARGET[opts.target]
    set_attention(pipe, attention)
    plans = {}
    for component in opts.components:  # trace everything first: the graphs are finished without torch
        t0 = time.perf_counter()
        dims = model_dims(pipe)
        if static:
            fixed = static_dims(component, static["batch_size"], static["height"], static["width"], factor, dims["max_length"])
            batch, latent = fixed["batch"], (fixed["height"], fixed["width"])
        else:
            fixed = {}
            default = facts["default_height"] // factor
            batch, latent = 2, (default, default)
        dims.update(fixed)
        traced = trace(component, pipe, opts.opset, fixed, latent, batch, tmp / ".fp32" / component / "model.onnx")
        plans[component] = (traced, dims, latent, batch, time.perf_counter() - t0)
    if "text_encoder" in plans:
        (tmp / FINAL_LAYER_NORM).parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / FINAL_LAYER_NORM, **final_layer_norm(pipe))
    check = opts.check and checkable(opts.target)
    if not check and not (opts.validate or opts.auto_fp32_fallback):
        release_weights(pipe)
    components = {}
    laid_out = False
    for component, (traced, dims, latent, batch, traced_s) in plans.items():
        t0 = time.perf_counter() - traced_s  # the logged time includes the component's tracing
        dtype = "fp16" if opts.dtype == "fp16" and component not in opts.keep_fp32 else "fp32"
        model, kept = finish_graph(component, traced, opts.target, dtype == "fp16", facts["upcast_attention"])
        shutil.rmtree(traced.parent)
        path = tmp / component / "model.onnx"
        files = save_model(model, path)
        laid_out = laid_out or uses_cpu_layout(model)
        del model
        check_written(component, path, opts.target)
        result = None
        if check:
            result = compare_with_torch(component, pipe, path, 1 if not static else batch, latent,
                                        provider=CHECK_PROVIDER[opts.target])
        entry = {
            "path": f"{component}/model.onnx",
            "files": [file_entry(tmp, f"{component}/{name}") for name in files],
            "dtype": dtype,
            "attention": attention,
            "fp32_nodes": kept,
            "export_max_abs_diff": result["max_abs_diff"] if result else None,
            "export_relative_l2": result["relative_l2"] if result else None,
            **describe_io(component, dtype, dims, facts["num_hidden_states"]),
        }
        if component == "text_encoder":
            entry["files"].append(file_entry(tmp, FINAL_LAYER_NORM))
        components[component] = entry
        size = sum(f["bytes"] for f in entry["files"]) / 1e6
        detail = "" if result or not opts.check else ", not compared with PyTorch (the cuda target runs on the CUDA EP only)"
        if result:
            detail = f", max abs diff vs PyTorch {result['max_abs_diff']:.2e} (relative L2 {result['relative_l2']:.1e})"
            if not result["finite"]:
                detail += ", NaN/Inf in the output"
        opts.log(f"exported {component} ({dtype}) in {time.perf_counter() - t0:.1f} s, {size:.1f} MB{detail}")
    shutil.rmtree(tmp / ".fp32", ignore_errors=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": versions(),
        "source": {"kind": src.kind, "name": src.name, "loras": src.loras},
        "dtype": opts.dtype,
        "target": opts.target,
        "opset": opts.opset,
        "pipeline": facts,
        "size_multiple": multiple,
        "static": static,
        "components": components,
    }
    if laid_out:
        add_cpu_layout_probe(tmp, manifest)
    return manifest


def add_cpu_layout_probe(folder: Path, manifest: dict) -> None:
    """Record the probe that tells the runtime whether this CPU reads the graphs' NCHWc layout."""
    from .optimize import CPU_LAYOUT_PROBE, write_cpu_layout_probe

    if "cpu_layout_probe" not in manifest:
        files = write_cpu_layout_probe(folder)
        manifest["cpu_layout_probe"] = {
            "path": f"{CPU_LAYOUT_PROBE}/model.onnx",
            "files": [file_entry(folder, name) for name in files],
        }
        manifest["format_version"] = CPU_LAYOUT_FORMAT_VERSION  # runtimes that skip the probe refuse it
