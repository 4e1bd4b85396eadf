"""`sdexport validate`: an export against its PyTorch source, per component and end to end.

The reference is always diffusers/PyTorch in fp32. Tolerances are the constants below (overridable); the
report's JSON schema is `validate_report.schema.json` beside this file (docs/validate-report.md).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import onnx
import onnxruntime as ort
import sdruntime
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging
from onnx import TensorProto, numpy_helper
from PIL import Image
from sdruntime.conditioning import (
    MicroConditioning,
    guidance_scale_embedding,
    img2img_time_ids,
    txt2img_time_ids,
)
from sdruntime.manifest import (
    COMPONENT_IO,
    DYNAMIC_AXES,
    TARGETS_TABLE,
    ExportError,
    Manifest,
    TensorEntry,
    latent_shape,
    read_manifest,
    sha256_file,
    write_manifest,
)
from sdruntime.pipeline import StableDiffusionPipeline as RuntimePipeline
from sdruntime.schedulers import SCHEDULERS, scheduler_name_for_class
from sdruntime.session import (
    NUMPY_DTYPES,
    NonFiniteOutput,
    SessionSettings,
    check_cpu_layout,
    resolve_providers,
    session_options,
)

from .components import is_sdxl, model_dims, set_attention
from .conversion import checkable, export_component, trace_component, with_cpu_layout_probe
from .conversion import versions as export_versions
from .errors import SdexportError, ValidationFailed, first_line
from .export import save_model, torch_outputs
from .load import Source, load_source, replace_vae
from .lora import check_loras, fuse_loras
from .staging import REPORT_NAME  # what `convert --validate` leaves in the export

REPORT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("validate_report.schema.json")

FP32_MAX_ABS = {"small": 1e-4, "full": 1e-3}
FP16_RELATIVE_L2 = 1e-2
MIN_PSNR = {"fp32": 45.0, "fp16": 30.0}
FULL_SIZE_UNET_PARAMETERS = 100_000_000
PSNR_CAP = 100.0
FP16_MAX = 65504.0
DIFF_AMPLIFY = 16
FALLBACK_ROUNDS = 3
SHAPE_OPS = {"Shape", "Size"}  # they read a tensor's shape, never its values

PROMPTS = ("a photograph of an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk")
NEGATIVE_PROMPT = "blurry, low quality"

# The diffusers class each runtime scheduler mirrors; the variant's OVERRIDES (karras) are applied too.
DIFFUSERS_SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m-karras": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "lcm": "LCMScheduler",
}


@dataclass
class ValidateOptions:
    provider: str = "cpu"
    scheduler: str | None = None
    steps: int = 10
    seed: int = 0
    guidance_scale: float = 7.5
    strength: float = 0.75
    prompt: str | None = None  # the end-to-end runs' (None: PROMPTS[0])
    negative_prompt: str | None = None  # None: NEGATIVE_PROMPT
    height: int | None = None  # the end-to-end runs' size (default: the export's default size)
    width: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_psnr: float | None = None
    save_images: str | Path | None = None
    config: str | None = None  # single-file SOURCE: as `convert --config`
    prediction_type: str | None = None  # single-file SOURCE: as `convert --prediction-type`
    allow_pickle: bool = False  # single-file SOURCE: as `convert --allow-pickle`
    end_to_end: bool = True
    locate: bool = True
    log: Callable[[str], None] = field(default=lambda line: None)

    def __post_init__(self):
        self.prompt = PROMPTS[0] if self.prompt is None else self.prompt
        self.negative_prompt = NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


@dataclass
class Case:
    """One set of inputs for a component; height and width in image pixels."""

    label: str
    inputs: dict[str, np.ndarray]
    batch: int
    height: int | None = None
    width: int | None = None
    timestep: float | None = None


def check_options(opts: ValidateOptions) -> None:
    """Refuse bad options before anything is loaded."""
    if opts.scheduler is not None and opts.scheduler not in SCHEDULERS:
        raise SdexportError(f"unknown scheduler '{opts.scheduler}': choose one of {', '.join(SCHEDULERS)}")
    if opts.steps < 1:
        raise SdexportError(f"--steps must be at least 1, got {opts.steps}")
    for name, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and value <= 0:
            raise SdexportError(f"{name} must be positive, got {value}")
    if not 0.0 < opts.strength <= 1.0:
        raise SdexportError(f"strength must be in (0, 1], got {opts.strength}")
    for name, value in (("--height", opts.height), ("--width", opts.width)):
        if value is not None and value < 1:
            raise SdexportError(f"{name} must be positive, got {value}")


def end_to_end_size(manifest: Manifest, opts: ValidateOptions) -> tuple[int, int]:
    """The end-to-end runs' (height, width): the options' or the export's default size."""
    default = image_sizes(manifest)[0]
    height, width = opts.height or default[0], opts.width or default[1]
    if manifest.static and (height, width) != default:
        raise SdexportError(f"this export is static at {default[0]}x{default[1]}: drop --height/--width")
    for name, value in (("height", height), ("width", width)):
        if value % manifest.size_multiple:
            raise SdexportError(
                f"--{name} {value} is not a multiple of {manifest.size_multiple} (this export's size multiple)"
            )
    return height, width


# -- numbers -----------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    """JSON has no NaN or Inf: those become null (the `finite` flag says why)."""
    return float(value) if np.isfinite(value) else None


def error_metrics(expected: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """max abs, mean abs and relative L2 error of `got` against `expected`, and whether `got` is finite."""
    expected = expected.astype(np.float64)
    diff = np.abs(expected - got.astype(np.float64))
    norm = max(float(np.linalg.norm(expected)), 1e-12)
    return {
        "max_abs": _number(diff.max()),
        "mean_abs": _number(diff.mean()),
        "relative_l2": _number(np.linalg.norm(diff) / norm),
        "finite": bool(np.isfinite(got).all()),
    }


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR of two uint8 images in dB, capped at PSNR_CAP (identical images)."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else float(min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse)))


def worst(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest of each error over several outputs or cases (None, i.e. non-finite, wins)."""
    merged: dict[str, Any] = {"finite": all(m["finite"] for m in metrics)}
    for key in ("max_abs", "mean_abs", "relative_l2"):
        values = [m[key] for m in metrics]
        merged[key] = None if any(v is None for v in values) else max(values, default=0.0)
    return merged


def limit_problems(metrics: dict[str, Any], limits: dict[str, float | None]) -> list[str]:
    """Why `metrics` are out of `limits`, one phrase each; empty when within."""
    if not metrics["finite"]:
        return ["NaN/Inf in the output"]
    problems = []
    for key, name in (("max_abs", "max abs"), ("relative_l2", "relative L2")):
        limit, value = limits[key], metrics[key]
        if limit is not None and (value is None or value > limit):
            problems.append(f"{name} {value:.2e} > {limit:.0e}")
    return problems


# -- inputs ------------------------------------------------------------------------------------


def image_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """Two valid (height, width) in pixels: the default size and a non-square one (the static size only)."""
    if manifest.static:
        return [(manifest.static.height, manifest.static.width)]
    m = manifest.size_multiple
    height, width = manifest.pipeline.default_height, manifest.pipeline.default_width
    second = max(m, height // 2 // m * m)
    return [(height, width), (second if second != height else height + m, width)]


def batch_sizes(manifest: Manifest, component: str) -> list[int]:
    """1 and 2, or the batch a static export fixes."""
    first = manifest.components[component].inputs[0].shape[0]
    return [first] if isinstance(first, int) else [1, 2]


def token_ids(pipe, prompts: list[str], component: str = "text_encoder") -> np.ndarray:
    tokenizer = pipe.tokenizer_2 if component == "text_encoder_2" else pipe.tokenizer
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    )
    return tokens.input_ids.astype(np.int64)


def prompts_for(batch: int, guided: bool) -> list[str]:
    """Real prompts; guided batches put the negative (empty) prompts first, as the pipelines do."""
    if not guided or batch == 1:
        return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    half = batch // 2
    return [""] * half + [PROMPTS[i % len(PROMPTS)] for i in range(batch - half)]


def text_embeddings(pipe, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The U-Net's encoder_hidden_states for `prompts` as the pipeline computes them, and for SDXL the
    pooled `text_embeds` too (diffusers' own encode_prompt: both encoders' penultimate states)."""
    with torch.no_grad():
        if not is_sdxl(pipe):
            return pipe.text_encoder(torch.from_numpy(token_ids(pipe, prompts)))[0].float().numpy(), {}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return embeds.float().numpy(), {"text_embeds": pooled.float().numpy()}


def unet_conditioning(manifest: Manifest, batch: int, height: int, width: int, guidance_scale: float) -> dict:
    """SDXL's time_ids (the generated size, no crop; a refiner's aesthetic score 6) and an LCM U-Net's
    timestep_cond (the guidance embedding), as the pipelines make them, where the U-Net takes them."""
    facts = manifest.pipeline
    names = {t.name for t in manifest.components["unet"].inputs}
    extra = {}
    if "time_ids" in names:  # the runtime's own defaults: no micro-conditioning given, no guidance batch
        default = MicroConditioning()
        if facts.requires_aesthetics_score:
            extra["time_ids"] = img2img_time_ids(default, (height, width), batch, False, aesthetic=True)
        else:
            extra["time_ids"] = txt2img_time_ids(default, (height, width), batch, False)
    if "timestep_cond" in names:
        extra["timestep_cond"] = guidance_scale_embedding([guidance_scale - 1.0] * batch, facts.time_cond_proj_dim)
    return extra


def gradient_image(height: int, width: int, flip: bool = False):
    """A deterministic RGB test picture: red across, green down, blue along the diagonal."""

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / max(width - 1, 1), y / max(height - 1, 1)
    if flip:
        x, y = 1.0 - x, 1.0 - y
    rgb = np.stack([x, y, 0.5 * (x + y) * (1.0 - x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def image_batch(height: int, width: int, batch: int) -> np.ndarray:
    """[batch, 3, H, W] in [-1, 1]: the gradient and its mirror image."""
    images = [
        np.asarray(gradient_image(height, width, flip=i % 2 == 1), np.float32) / 127.5 - 1.0 for i in range(batch)
    ]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def component_cases(
    component: str, pipe, manifest: Manifest, timesteps: list[float], seed: int, guidance_scale: float = 7.5
) -> list[Case]:
    """The same inputs PyTorch and ONNX Runtime get: every batch x size (x timestep for the U-Net)."""

    gen = torch.Generator().manual_seed(seed)
    cases = []
    for batch in batch_sizes(manifest, component):
        if component in ("text_encoder", "text_encoder_2"):
            ids = token_ids(pipe, prompts_for(batch, False), component)
            cases.append(Case(f"b{batch} prompts", {"input_ids": ids}, batch))
            continue
        for height, width in image_sizes(manifest):
            latent = latent_shape(manifest.pipeline, batch, height, width)
            size = f"b{batch} {height}x{width}"
            if component == "unet":
                embeddings, pooled = text_embeddings(pipe, prompts_for(batch, True))
                extra = {**pooled, **unet_conditioning(manifest, batch, height, width, guidance_scale)}
                order = [t.name for t in manifest.components["unet"].inputs]  # the wrapper takes them in order
                for t in timesteps:
                    given = {
                        "sample": torch.randn(latent, generator=gen).numpy(),
                        "timestep": np.full(batch, t, np.float32),
                        "encoder_hidden_states": embeddings,
                        **extra,
                    }
                    inputs = {name: given[name] for name in order}
                    cases.append(Case(f"{size} t={t:g}", inputs, batch, height, width, t))
            elif component == "vae_decoder":
                scaled = torch.randn(latent, generator=gen).numpy() / manifest.pipeline.vae_scaling_factor
                cases.append(Case(size, {"latent_sample": scaled.astype(np.float32)}, batch, height, width))
            else:
                cases.append(Case(size, {"sample": image_batch(height, width, batch)}, batch, height, width))
    return cases


# -- running -----------------------------------------------------------------------------------


def open_session(path: Path, manifest: Manifest, providers: list, component: str = ""):
    options = session_options(SessionSettings(), manifest, providers, component)
    return ort.InferenceSession(str(path), options, providers=providers)


def feeds_for(manifest: Manifest, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs cast to the dtypes the manifest records (fp16 for an fp16 component's float inputs)."""
    return {k: v.astype(NUMPY_DTYPES[manifest.input_spec(component, k).dtype]) for k, v in inputs.items()}


def run_torch(component: str, pipe, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return torch_outputs(component, pipe, {k: torch.from_numpy(v) for k, v in inputs.items()})


def hash_problems(manifest: Manifest, component: str) -> list[str]:
    """Each file of the component that is missing or no longer has its recorded sha256."""
    problems = []
    for entry in manifest.components[component].files:
        path = manifest.folder / entry.path
        if not path.is_file():
            problems.append(f"{entry.path} is missing")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path} does not match its sha256 in sdexport.json (changed since export)")
    return problems


def check_case(
    case: Case, expected: list[np.ndarray], got: list[np.ndarray], names: list[str], limits: dict[str, float | None]
) -> dict[str, Any]:
    outputs = {
        name: error_metrics(e, g)
        if e.shape == g.shape
        else {
            "max_abs": None,
            "mean_abs": None,
            "relative_l2": None,
            "finite": True,
            "shape_mismatch": [list(e.shape), list(g.shape)],
        }
        for name, e, g in zip(names, expected, got)
    }
    merged = worst(list(outputs.values()))
    problems = limit_problems(merged, limits)
    if not all(np.isfinite(e).all() for e in expected):
        problems.append("PyTorch itself produced NaN/Inf")
    problems += [
        f"{n} has shape {o['shape_mismatch'][1]}, PyTorch {o['shape_mismatch'][0]}"
        for n, o in outputs.items()
        if "shape_mismatch" in o
    ]
    return {
        "label": case.label,
        "batch": case.batch,
        "height": case.height,
        "width": case.width,
        "timestep": case.timestep,
        "inputs": {k: list(v.shape) for k, v in case.inputs.items()},
        "outputs": outputs,
        **merged,
        "ok": not problems,
        "problems": problems,
    }


def component_limits(dtype: str, full_size: bool, opts: ValidateOptions) -> dict[str, float | None]:
    """fp32: max abs; fp16: relative L2 (max abs reported). --atol/--rtol, when given, bound every component."""
    max_abs = FP32_MAX_ABS["full" if full_size else "small"] if dtype == "fp32" else None
    relative = FP16_RELATIVE_L2 if dtype == "fp16" else None
    return {
        "max_abs": opts.atol if opts.atol is not None else max_abs,
        "relative_l2": opts.rtol if opts.rtol is not None else relative,
    }


def check_component(
    component: str,
    pipe,
    manifest: Manifest,
    opts: ValidateOptions,
    full_size: bool,
    timesteps: list[float],
    providers: list,
) -> dict[str, Any]:
    """Every case through PyTorch and ONNX Runtime; for a failing fp16 component, the first node to blame."""
    entry = manifest.components[component]
    limits = component_limits(entry.dtype, full_size, opts)
    hashes = hash_problems(manifest, component)
    names = [o.name for o in entry.outputs]
    all_cases = component_cases(component, pipe, manifest, timesteps, opts.seed, opts.guidance_scale)
    checked, problems, provider = [], list(hashes), None
    try:
        session = open_session(manifest.model_path(component), manifest, providers, component)
        provider = session.get_providers()[0]
    except Exception as e:  # a corrupted model is this component's failure, not a usage error
        problems.append(f"ONNX Runtime cannot load it: {first_line(e)}")
    else:
        for case in all_cases:
            try:
                got = session.run(names, feeds_for(manifest, component, case.inputs))
            except Exception as e:
                problems.append(f"{case.label}: ONNX Runtime failed: {first_line(e)}")
                continue
            checked.append((case, check_case(case, run_torch(component, pipe, case.inputs), got, names, limits)))
    cases = [outcome for _, outcome in checked]
    problems += [f"{c['label']}: {p}" for c in cases for p in c["problems"]]
    no_numbers = {"max_abs": None, "mean_abs": None, "relative_l2": None, "finite": False}
    result = {
        "dtype": entry.dtype,
        "provider": provider,
        "limits": limits,
        "sha256_ok": not hashes,
        "cases": cases,
        **(worst(cases) if cases else no_numbers),
        "ok": not problems,
        "problems": problems,
        "first_bad_node": None,
    }
    failing = [case for case, outcome in checked if not outcome["ok"]]
    if failing and entry.dtype == "fp16" and opts.locate:
        smallest = min(failing, key=lambda c: sum(v.size for v in c.inputs.values()))
        rtol = limits["relative_l2"] or FP16_RELATIVE_L2
        result["first_bad_node"] = locate_fp16_failure(component, pipe, manifest, smallest, rtol, providers)
    return result


# -- the first fp16 node to leave tolerance -------------------------------------------------------


def trace_fp32(component: str, pipe, manifest: Manifest):
    """A fresh fp32 export of the component, before any optimization: the graph `to_fp16` converts."""

    with tempfile.TemporaryDirectory(prefix="sdexport-trace-") as tmp:
        traced = trace_component(component, pipe, Path(tmp), manifest.pipeline, manifest.static, int(manifest.opset))
        return onnx.load(str(traced.path), load_external_data=True)


def all_tensor_values(
    model, feeds: dict[str, np.ndarray], folder: Path, manifest: Manifest, providers: list
) -> dict[str, np.ndarray]:
    """Run `model` with every float intermediate tensor exposed as a graph output (values as float32)."""

    path = folder / "model.onnx"
    save_model(model, path)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))  # works on > 2 GB models too
    typed = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    exposed = {o.name for o in typed.graph.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for node in typed.graph.node:
        for name in node.output:
            if name and name not in exposed and types.get(name) in floats:
                typed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                exposed.add(name)
    onnx.save(typed, str(path))
    session = open_session(path, manifest, providers)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return {n: v.astype(np.float32) for n, v in zip(names, values) if v.dtype.kind == "f"}


def value_tensors(graph) -> set[str]:
    """Tensors whose values reach the outputs: consumed by something other than Shape/Size, or graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type not in SHAPE_OPS:
            used.update(node.input)
    return used


def first_divergence(graph, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float):
    """(fp16 node, tensor) of the first output, in topological order, that overflows or leaves rtol."""
    used = value_tensors(graph)
    compared = [
        (node, name)
        for node in graph.node
        for name in node.output
        if name in used and name in reference and name in got and reference[name].shape == got[name].shape
    ]
    overflow = next(
        ((n, t) for n, t in compared if not np.isfinite(got[t]).all() and np.isfinite(reference[t]).all()), None
    )
    if overflow is not None:  # NaN/Inf spreads: the first one is the culprit, not the first inexact tensor
        return overflow
    return next(((n, t) for n, t in compared if (error_metrics(reference[t], got[t])["relative_l2"] or 0) > rtol), None)


def out_of_fp16_range(model, values: dict[str, np.ndarray]) -> list[str]:
    """Nodes that produce or consume a tensor beyond fp16's range (65504) in the fp32 run, in graph order."""

    big = {name for name, v in values.items() if v.size and np.isfinite(v).all() and np.abs(v).max() > FP16_MAX}
    big |= {
        init.name
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and np.abs(numpy_helper.to_array(init)).max(initial=0) > FP16_MAX
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in SHAPE_OPS and (big.intersection(node.input) or big.intersection(node.output))
    ]


def locate_fp16_failure(
    component: str, pipe, manifest: Manifest, case: Case, rtol: float, providers: list
) -> dict[str, Any]:
    """Compare every intermediate tensor of the fp16 file with a fresh fp32 export on one failing case."""

    fp32 = trace_fp32(component, pipe, manifest)
    fp16 = onnx.load(str(manifest.model_path(component)))
    with tempfile.TemporaryDirectory(prefix="sdexport-locate-") as tmp:
        reference = all_tensor_values(fp32, case.inputs, Path(tmp) / "fp32", manifest, providers)
        got = all_tensor_values(
            fp16, feeds_for(manifest, component, case.inputs), Path(tmp) / "fp16", manifest, providers
        )
    found = first_divergence(fp16.graph, reference, got, rtol)
    result: dict[str, Any] = {
        "case": case.label,
        "node": None,
        "fp16_node": None,
        "op_type": None,
        "tensor": None,
        "metrics": None,
        "fp32_max_value": None,
        "out_of_fp16_range": False,
        "suggested_fp32_nodes": [],
    }
    if found is None:
        return result
    fp16_node, tensor = found
    producer = next((n for n in fp32.graph.node if tensor in n.output), None)
    peak = float(np.abs(reference[tensor]).max()) if reference[tensor].size else 0.0
    kept = set(manifest.components[component].fp32_nodes)
    region = [n for n in out_of_fp16_range(fp32, reference) if n not in kept]
    own = [producer.name] if producer is not None and producer.name not in kept else []
    result.update(
        {
            "node": producer.name if producer is not None else fp16_node.name,
            "fp16_node": fp16_node.name,
            "op_type": producer.op_type if producer is not None else fp16_node.op_type,
            "tensor": tensor,
            "metrics": error_metrics(reference[tensor], got[tensor]),
            "fp32_max_value": peak,
            "out_of_fp16_range": peak > FP16_MAX,
            "suggested_fp32_nodes": region if peak > FP16_MAX and region else own,
        }
    )
    return result


# -- end to end --------------------------------------------------------------------------------


def diffusers_scheduler(name: str, config: dict):
    """The diffusers scheduler our `name` mirrors, from the exported config itself (never another scheduler's)."""

    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
    with quiet_diffusers():
        return cls.from_config(dict(config), **SCHEDULERS[name].OVERRIDES)


class quiet_diffusers:
    """Silence diffusers' warnings about config keys another scheduler class wrote."""

    def __enter__(self):
        self.level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        logging.set_verbosity(self.level)


def reference_timesteps(name: str, config: dict, steps: int) -> list[float]:
    """The first and last timestep of the schedule: a noisy and an almost clean U-Net input."""
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    return list(dict.fromkeys([timesteps[0], timesteps[-1]]))


def diffusers_generate(pipe, scheduler, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], final latents) from diffusers' text-to-image or image-to-image pipeline."""

    parts = {**pipe.components, "scheduler": scheduler}
    if is_sdxl(pipe):  # no watermark, as the runtime adds none
        cls = StableDiffusionXLImg2ImgPipeline if "image" in kwargs else StableDiffusionXLPipeline
        flags = {"force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True)}
        if cls is StableDiffusionXLImg2ImgPipeline:
            flags["requires_aesthetics_score"] = pipe.config.get("requires_aesthetics_score", False)
        elif parts.get("text_encoder") is None:
            raise SdexportError("an SDXL refiner draws from an image only: validate it with img2img")
        extra = {**flags, "add_watermarker": False}
    else:
        cls = StableDiffusionImg2ImgPipeline if "image" in kwargs else StableDiffusionPipeline
        extra = {"requires_safety_checker": False}
    with quiet_diffusers():
        reference = cls(**parts, **extra)
    reference.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        out = reference(
            **kwargs,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    image = (out.images[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    return image, final["latents"].float().numpy()


def save_comparison(folder: Path, mode: str, reference: np.ndarray, ours: np.ndarray) -> str:
    """diffusers | runtime | |difference| x DIFF_AMPLIFY, side by side in one PNG."""

    folder.mkdir(parents=True, exist_ok=True)
    diff = np.clip(np.abs(reference.astype(np.int16) - ours.astype(np.int16)) * DIFF_AMPLIFY, 0, 255).astype(np.uint8)
    path = folder / f"{mode}.png"
    Image.fromarray(np.concatenate([reference, ours, diff], axis=1)).save(path)
    return str(path)


def compare_generation(
    mode: str, pipe, runtime, name: str, config: dict, opts: ValidateOptions, min_psnr: float, size: tuple[int, int]
) -> dict[str, Any]:
    """One generation by diffusers and by the runtime with the same prompt, seed, steps and scheduler."""

    kwargs: dict[str, Any] = {
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "num_inference_steps": opts.steps,
        "guidance_scale": opts.guidance_scale,
    }
    if mode == "img2img":
        kwargs.update(image=gradient_image(*size), strength=opts.strength)
    else:
        kwargs.update(height=size[0], width=size[1])
    result = e2e_entry(mode, min_psnr)
    image, latents = diffusers_generate(pipe, diffusers_scheduler(name, config), opts.seed, **kwargs)
    try:
        ours = runtime(**kwargs, scheduler=name, seed=opts.seed)
    except NonFiniteOutput as e:
        return {**result, "ok": False, "finite": False, "problems": [str(e)]}
    ours_image = np.asarray(ours.images[0])
    result["psnr_db"] = psnr(image, ours_image)
    result["latent_max_abs"] = _number(np.abs(latents - ours.latents).max())
    result["finite"] = bool(np.isfinite(ours.latents).all())
    if result["psnr_db"] < min_psnr:
        result["problems"].append(f"PSNR {result['psnr_db']:.1f} dB < {min_psnr:g} dB")
    if not result["finite"]:
        result["problems"].append("NaN/Inf in the final latents")
    result["ok"] = not result["problems"]
    if opts.save_images:
        result["image"] = save_comparison(Path(opts.save_images), mode, image, ours_image)
    return result


def e2e_entry(mode: str, min_psnr: float, **values) -> dict[str, Any]:
    entry = {
        "mode": mode,
        "psnr_db": None,
        "latent_max_abs": None,
        "finite": True,
        "min_psnr_db": min_psnr,
        "ok": True,
        "skipped": None,
        "image": None,
        "problems": [],
    }
    return {**entry, **values}


def end_to_end(
    pipe, manifest: Manifest, opts: ValidateOptions, name: str, config: dict, min_psnr: float, size: tuple[int, int]
) -> dict[str, dict[str, Any]]:
    """Text-to-image and image-to-image through sdruntime.StableDiffusionPipeline and diffusers."""

    modes = ("text2img", "img2img")
    encoder = "text_encoder_2" if manifest.pipeline.family == "sdxl" else "text_encoder"
    missing = [c for c in (encoder, "unet", "vae_decoder") if not manifest.has(c)]
    if missing:
        return {m: e2e_entry(m, min_psnr, skipped=f"the export has no {', '.join(missing)}") for m in modes}
    try:
        runtime = RuntimePipeline.load(manifest.folder, provider=opts.provider, verify=False)
    except ExportError as e:
        return {m: e2e_entry(m, min_psnr, ok=False, problems=[f"the runtime cannot load it: {e}"]) for m in modes}
    if manifest.pipeline.family == "sdxl" and not manifest.has("text_encoder"):
        results = {"text2img": e2e_entry("text2img", min_psnr, skipped="an SDXL refiner draws from an image only")}
    else:
        results = {"text2img": compare_generation("text2img", pipe, runtime, name, config, opts, min_psnr, size)}
    if manifest.has("vae_encoder"):
        results["img2img"] = compare_generation("img2img", pipe, runtime, name, config, opts, min_psnr, size)
    else:
        results["img2img"] = e2e_entry("img2img", min_psnr, skipped="the export has no vae_encoder")
    return results


# -- the report --------------------------------------------------------------------------------


def check_matches(manifest: Manifest, pipe, source_name: str) -> None:
    """Refuse an export of another model: the config-fixed axes in its manifest must be the source's."""

    dims = model_dims(pipe)
    for component, entry in manifest.components.items():
        io = COMPONENT_IO[component]
        recorded = {t.name: t.shape for t in entry.inputs + entry.outputs}
        for spec in io.inputs + io.outputs:
            for axis, size in zip(spec.shape, recorded.get(spec.name, ())):
                if axis not in DYNAMIC_AXES and size != dims[axis]:
                    raise SdexportError(
                        f"{manifest.folder} was not exported from {source_name}: its {component} {spec.name} has "
                        f"{axis} {size}, the source's has {dims[axis]}; pass the SOURCE it was exported from"
                    )


def versions() -> dict[str, str]:
    return {**export_versions(), "sdexport-runtime": sdruntime.__version__, "numpy": np.__version__}


def failures(report: dict[str, Any]) -> list[str]:
    """Every problem, prefixed with the component or the end-to-end mode."""
    lines = [f"{c}: {p}" for c, entry in report["components"].items() for p in entry["problems"]]
    return lines + [f"{m}: {p}" for m, entry in report["end_to_end"].items() for p in entry["problems"]]


def provider_name(providers: list) -> str:
    first = providers[0]
    return first[0] if isinstance(first, (tuple, list)) else first


def chosen_scheduler(folder: Path, opts: ValidateOptions) -> tuple[str, dict]:
    """(runtime scheduler name, exported scheduler_config.json): --scheduler, else the exported class's."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
    config = json.loads(path.read_text(encoding="utf-8"))
    return opts.scheduler or scheduler_name_for_class(config.get("_class_name", ""), config) or "pndm", config


def load_reference(source: str, manifest: Manifest, opts: ValidateOptions):
    """Load SOURCE as the export was made from it: the same single-file options and the LoRAs
    the manifest records, fused at their scales."""

    loras = check_loras(f"{lora.path}:{lora.scale}" for lora in manifest.source.loras)
    src = load_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
    if loras:
        src.loras = fuse_loras(src.pipe, loras, opts.log)
    if manifest.source.vae not in (None, "pipeline"):
        replace_vae(src, manifest.source.vae)
    return src


def validate(source, folder: str | Path, **options) -> dict[str, Any]:
    """Check the export in `folder` against SOURCE (a folder, a preset or a loaded `Source`); returns the report."""

    opts = ValidateOptions(**options)
    check_options(opts)
    started = time.perf_counter()
    manifest = read_manifest(folder)
    height, width = end_to_end_size(manifest, opts)  # a bad size is refused before anything loads
    src = source if isinstance(source, Source) else load_reference(source, manifest, opts)
    pipe = src.pipe
    check_matches(manifest, pipe, src.name)
    providers = resolve_providers(opts.provider, manifest.target)
    check_cpu_layout(manifest)
    set_attention(pipe, next(iter(manifest.components.values())).attention)
    name, config = chosen_scheduler(manifest.folder, opts)
    timesteps = reference_timesteps(name, config, opts.steps)
    unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
    full_size = unet_parameters > FULL_SIZE_UNET_PARAMETERS
    components = {}
    for component in manifest.components:
        t0 = time.perf_counter()
        components[component] = check_component(component, pipe, manifest, opts, full_size, timesteps, providers)
        opts.log(f"checked {component} in {time.perf_counter() - t0:.1f} s")
    fp16 = any(e.dtype == "fp16" for e in manifest.components.values())
    min_psnr = opts.min_psnr if opts.min_psnr is not None else MIN_PSNR["fp16" if fp16 else "fp32"]
    if opts.end_to_end:
        e2e = end_to_end(pipe, manifest, opts, name, config, min_psnr, (height, width))
    else:
        e2e = {m: e2e_entry(m, min_psnr, skipped="not asked for") for m in ("text2img", "img2img")}
    report = {
        "report_version": REPORT_VERSION,
        "ok": False,
        "source": src.name,
        "export": str(manifest.folder.resolve()),
        "dtype": manifest.dtype,
        "target": manifest.target,
        "provider": provider_name(providers),
        "versions": versions(),
        "export_created_by": dict(manifest.created_by),
        "settings": {
            "scheduler": name,
            "steps": opts.steps,
            "seed": opts.seed,
            "guidance_scale": opts.guidance_scale,
            "strength": opts.strength,
            "prompt": opts.prompt,
            "negative_prompt": opts.negative_prompt,
            "height": height,
            "width": width,
            "timesteps": timesteps,
        },
        "unet_parameters": int(unet_parameters),
        "full_size": full_size,
        "components": components,
        "end_to_end": e2e,
        "fp32_fallback": {},
        "failures": [],
        "seconds": 0.0,
    }
    report["failures"] = failures(report)
    report["ok"] = not report["failures"]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise SdexportError(f"cannot write the report to {path} ({e.strerror}): choose another --json") from e
    return path


def load_report_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _fmt(value: float | None, spec: str = ".1e") -> str:
    return "nan" if value is None else format(value, spec)


def _limit_text(limits: dict[str, float | None]) -> str:
    parts = [f"max abs <= {limits['max_abs']:.0e}"] if limits["max_abs"] is not None else []
    parts += [f"rel L2 <= {limits['relative_l2']:.0e}"] if limits["relative_l2"] is not None else []
    return ", ".join(parts) or "finite"


def format_table(report: dict[str, Any]) -> str:
    """The human summary: one row per component and case, one per end-to-end run, then what failed."""
    lines = [
        f"validate {report['export']} ({report['dtype']}, {report['target']}) against {report['source']} "
        f"on {report['provider']}",
        f"{'component':<14} {'case':<20} {'max abs':>8} {'mean abs':>8} {'rel L2':>8}  {'limit':<26} result",
    ]
    for component, entry in report["components"].items():
        if not entry["cases"]:
            lines.append(f"{component:<14} {'-':<20} {'':>8} {'':>8} {'':>8}  {_limit_text(entry['limits']):<26} FAIL")
        for case in entry["cases"]:
            status = "ok" if case["ok"] else "FAIL" + ("" if case["finite"] else " (NaN/Inf)")
            lines.append(
                f"{component:<14} {case['label']:<20} {_fmt(case['max_abs']):>8} {_fmt(case['mean_abs']):>8} "
                f"{_fmt(case['relative_l2']):>8}  {_limit_text(entry['limits']):<26} {status}"
            )
    settings = report["settings"]
    for mode, entry in report["end_to_end"].items():
        run = f"{settings['scheduler']} {settings['steps']} steps"
        if entry["skipped"]:
            lines.append(f"{mode:<14} {run:<20} skipped: {entry['skipped']}")
            continue
        status = "ok" if entry["ok"] else "FAIL"
        lines.append(
            f"{mode:<14} {run:<20} PSNR {_fmt(entry['psnr_db'], '.1f')} dB, latents max abs "
            f"{_fmt(entry['latent_max_abs'])}  (PSNR >= {entry['min_psnr_db']:g} dB) {status}"
        )
    lines += blame_lines(report)
    lines += [f"fallback: {c}: {note}" for c, notes in report["fp32_fallback"].items() for note in notes]
    lines += [f"FAIL {line}" for line in report["failures"] if "sha256" in line or "cannot load" in line]
    lines.append("result: ok" if report["ok"] else f"result: FAILED ({', '.join(failed_parts(report))})")
    return "\n".join(lines)


def blame_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for component, entry in report["components"].items():
        blame = entry.get("first_bad_node")
        if not blame:
            continue
        if not blame["node"]:
            lines.append(f"{component}: no intermediate tensor of the fp16 graph leaves tolerance on {blame['case']}")
            continue
        why = "NaN/Inf" if not blame["metrics"]["finite"] else f"relative L2 {_fmt(blame['metrics']['relative_l2'])}"
        if blame["out_of_fp16_range"]:
            why += f"; its fp32 value reaches {blame['fp32_max_value']:.3g}, beyond fp16's {FP16_MAX:g}"
        lines.append(f"{component}: first fp16 node out of tolerance: {blame['node']} ({blame['op_type']}, {why})")
        if blame["suggested_fp32_nodes"]:
            lines.append(
                f"{component}: keep in fp32 (fp32_nodes): {', '.join(blame['suggested_fp32_nodes'])}"
                " -- `sdexport convert --dtype fp16 --auto-fp32-fallback` applies it"
            )
    return lines


def failed_parts(report: dict[str, Any]) -> list[str]:
    parts = [c for c, e in report["components"].items() if not e["ok"]]
    return parts + [m for m, e in report["end_to_end"].items() if not e["ok"]]


def check_report(report: dict[str, Any], where: str = "") -> None:
    """Raise ValidationFailed (exit 1) naming what failed, in one line."""
    if report["ok"]:
        return
    first = {}
    for line in report["failures"]:
        first.setdefault(line.split(":", 1)[0], line.split(":", 1)[1].strip())
    detail = "; ".join(f"{part} ({why})" for part, why in first.items())
    raise ValidationFailed(f"validation failed: {detail}{where}")


# -- convert --validate and --auto-fp32-fallback --------------------------------------------------


def rebuild_component(component: str, pipe, folder: Path, fp32_nodes: list[str] | None, note: str) -> None:
    """Re-export one component with these nodes kept in fp32 (None: all of it) and update the manifest."""
    manifest = read_manifest(folder)
    entry, target = manifest.components[component], manifest.target
    written = export_component(
        component,
        pipe,
        folder,
        manifest.pipeline,
        manifest.static,
        int(manifest.opset),
        target,
        fp16=fp32_nodes is not None,
        extra_fp32_nodes=fp32_nodes or (),
    )
    if written.laid_out:  # an fp16 cpu export's component now in fp32 and laid out
        manifest = with_cpu_layout_probe(folder, manifest)
    check = written.compared
    others = tuple(f for f in entry.files if not f.path.startswith(f"{component}/model.onnx"))
    entry = replace(
        entry,
        files=written.files + others,
        fp32_nodes=written.fp32_nodes if fp32_nodes is not None else (),
        export_max_abs_diff=check["max_abs_diff"] if check else None,
        export_relative_l2=check["relative_l2"] if check else None,
        notes=(*entry.notes, note),
    )
    if fp32_nodes is None:
        entry = replace(
            entry, dtype="fp32", inputs=tuple(map(_as_fp32, entry.inputs)), outputs=tuple(map(_as_fp32, entry.outputs))
        )
    write_manifest(folder, replace(manifest, components={**manifest.components, component: entry}))


def _as_fp32(tensor: TensorEntry) -> TensorEntry:
    return replace(tensor, dtype="float32") if tensor.dtype == "float16" else tensor


def fixable(report: dict[str, Any]) -> dict[str, list[str]]:
    """fp16 components that failed and the fp32 nodes the report suggests for each."""
    return {
        c: e["first_bad_node"]["suggested_fp32_nodes"]
        for c, e in report["components"].items()
        if not e["ok"]
        and e["dtype"] == "fp16"
        and e.get("first_bad_node")
        and e["first_bad_node"]["suggested_fp32_nodes"]
    }


def apply_fp32_fallback(
    src, folder: Path, report: dict[str, Any], provider: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Keep the suggested nodes in fp32 and re-check, a few rounds; then keep what still fails wholly in fp32."""
    actions: dict[str, list[str]] = {}
    for _ in range(FALLBACK_ROUNDS):
        fixes = fixable(report)
        if not fixes:
            break
        for component, nodes in fixes.items():
            kept = list(dict.fromkeys([*read_manifest(folder).components[component].fp32_nodes, *nodes]))
            note = f"--auto-fp32-fallback kept {len(nodes)} more node(s) in fp32: {', '.join(nodes)}"
            log(f"{component}: {note}")
            rebuild_component(component, src.pipe, folder, kept, note)
            actions.setdefault(component, []).append(note)
        report = validate(src, folder, provider=provider, end_to_end=False, log=log)
    for component, entry in report["components"].items():
        if not entry["ok"] and entry["dtype"] == "fp16":
            # to_fp16 still casts tensors between two kept nodes to fp16, so an out-of-range one stays inf
            note = (
                "--auto-fp32-fallback kept the whole component in fp32: keeping nodes did not bring it within tolerance"
            )
            log(f"{component}: {note}")
            rebuild_component(component, src.pipe, folder, None, note)
            actions.setdefault(component, []).append(note)
    if actions:
        report = validate(src, folder, provider=provider, log=log)
    report["fp32_fallback"] = {c: notes for c, notes in actions.items()}
    return report


def check_convert_options(dtype: str, target: str, auto_fp32_fallback: bool) -> None:
    """`convert --validate/--auto-fp32-fallback`: refuse what cannot work before anything is exported."""
    if auto_fp32_fallback and dtype != "fp16":
        raise SdexportError("--auto-fp32-fallback applies to fp16 exports: add --dtype fp16 or drop it")
    if not checkable(target):
        raise SdexportError(
            f"--validate runs the '{target}' export on {TARGETS_TABLE[target].check_provider}, which this onnxruntime lacks: "
            "drop --validate, or install onnxruntime-gpu"
        )


def validate_conversion(
    src, folder: Path, out: Path, target: str, auto_fp32_fallback: bool, log: Callable[[str], None]
) -> None:
    """`convert --validate`: write the report into the export; raise ValidationFailed naming where it was kept."""
    provider = TARGETS_TABLE[target].check_provider
    report = validate(src, folder, provider=provider, log=log)
    if auto_fp32_fallback:
        report = apply_fp32_fallback(src, folder, report, provider, log)
    write_report(report, folder / REPORT_NAME)
    log(format_table(report))
    check_report(report, f"; the export is kept in {folder} with {REPORT_NAME} (not moved to {out})")
