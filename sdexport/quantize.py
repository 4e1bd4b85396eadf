"""int8 exports (`sdexport convert --quantize`): the fp32 graphs of an export, quantized in place with ONNX
Runtime's quantization tools after the export is written, before it is put in place.

Two schemes:
  int8-weights  ORT's dynamic quantization: MatMul/Gemm weights stored as int8 (per output channel), the
                activations quantized at run time (DynamicQuantizeLinear + MatMulInteger). No calibration.
  int8-full     ORT's static QDQ quantization: weights int8 per channel, activations uint8 with ranges
                calibrated on the export's own fp32 graphs run along real denoising trajectories of
                calibration prompts (the text encoders' token ids, the U-Net's inputs at every step, the
                VAE decoder's final latents).
Both keep in float, by rule rather than node-by-node measurement here (`kept_float`): attention (the softmax
and the MatMuls of two activations) and the first and last convolutions. int8-weights is the default: on this
project's measurements (docs/benchmarks.md, int8) only it kept the pictures; int8-full's U-Net runs 2.3x faster
but its single range per activation over the whole trajectory loses too much. The manifest records the scheme
per component (manifest.QuantizationEntry); a quantized component records no weight map, so the runtime
refuses run-time LoRAs and embeddings on it in one line, and creates int8-full sessions at level "all".
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from sdruntime.manifest import ComponentEntry, QuantizationEntry, file_entry
from sdruntime.targets import CPU

from .errors import SdexportError

# onnx and ONNX Runtime's quantization tools are imported where used: `sdexport convert` checks its options
# (check_quantize_options) before anything slow is imported

SCHEMES = ("int8-weights", "int8-full")
QUANTIZE_CHOICES = ("int8", *SCHEMES)
DEFAULT_SCHEME = "int8-weights"  # `--quantize int8`: see docs/benchmarks.md, int8
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
VAE_COMPONENTS = ("vae_decoder",)  # the encoder (image-to-image) stays fp32: text-to-image calibrates no input of it
CALIBRATION_STEPS = 8  # per calibration prompt: the U-Net's inputs at 8 points of each denoising trajectory
# dynamic: convolutions stay float; ORT's ConvInteger made an SD 1.5 U-Net step 2x slower (docs/benchmarks.md, int8)
WEIGHT_OPS = ("MatMul", "Gemm")
FULL_OPS = ("Conv", "MatMul", "Gemm")

# the default calibration prompts: varied subjects, styles and colours, as a user's would be
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red star on a green background",
    "a watercolor painting of a quiet harbor at sunset",
    "a close-up portrait of an old man with a white beard, studio lighting",
    "a bowl of fruit on a wooden table, oil painting",
    "a futuristic city skyline at night, neon lights, rain",
    "a blue circle on a yellow background, top left",
    "a snowy mountain landscape with a frozen lake",
    "an isometric illustration of a tiny house, pastel colors",
    "a black and white sketch of a cat sleeping on a sofa",
    "a bright orange sports car on a desert road",
    "a fantasy castle in the clouds, digital art",
)


def scheme_of(quantize: str | None) -> str | None:
    """The scheme `--quantize` names: "int8" is the default scheme."""
    return DEFAULT_SCHEME if quantize == "int8" else quantize


def check_quantize_options(
    quantize: str | None, dtype: str, target: str, prompts_file: str | None, quantize_vae: bool
) -> None:
    """Refuse, in one line each, what int8 does not apply to."""
    if quantize is None:
        if prompts_file or quantize_vae:
            what = "--calibration-prompts" if prompts_file else "--quantize-vae"
            raise SdexportError(f"{what} applies to int8 exports: add --quantize int8")
        return
    if quantize not in QUANTIZE_CHOICES:
        raise SdexportError(f"unknown --quantize '{quantize}': choose from {', '.join(QUANTIZE_CHOICES)}")
    if dtype != "fp32":
        raise SdexportError(f"--quantize quantizes fp32 graphs, and this export is {dtype}: drop --dtype or --quantize")
    if target != "generic":
        # the cpu target's graphs hold ORT's contrib ops (FusedMatMul, NCHWc), which ORT's quantizer cannot type
        raise SdexportError(
            f"--quantize makes int8 graphs for the CPU EP from generic graphs, not --target {target}: "
            "use --target generic (ONNX Runtime fuses the int8 kernels when it loads them)"
        )
    if prompts_file and scheme_of(quantize) != "int8-full":
        raise SdexportError("--calibration-prompts calibrates --quantize int8-full only: add it or drop the prompts")
    if prompts_file:
        read_prompts(prompts_file)


def read_prompts(path: str | Path) -> list[str]:
    """Calibration prompts, one per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SdexportError(
            f"--calibration-prompts {path}: {e.strerror or e}; pass a text file, one prompt a line"
        ) from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdexportError(f"--calibration-prompts {path} has no prompts: write one prompt per line")
    return prompts


def kept_float(model, component: str) -> list[str]:
    """The nodes kept in float: attention (its softmax, and the MatMuls of two activations around it: the
    scores and their product with V), and a U-Net's or VAE's first and last convolutions (the ones that read
    the latents and write the prediction or pixels)."""
    nodes = model.graph.node
    weights = {t.name for t in model.graph.initializer}
    kept = [n.name for n in nodes if n.op_type == "Softmax"]
    kept += [n.name for n in nodes if n.op_type == "MatMul" and not set(n.input) & weights]
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    if convs and component != "text_encoder":
        kept += [convs[0], convs[-1]] if len(convs) > 1 else convs
    return kept


@contextlib.contextmanager
def quiet_preprocess_notice() -> Iterator[None]:
    """Within the block, drop ORT's root-logger advice to run its pre-processing first."""

    def not_notice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    logging.getLogger().addFilter(not_notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(not_notice)


def quantize_weights(src: Path, dst: Path, component: str, op_types: Sequence[str] = WEIGHT_OPS) -> list[str]:
    """int8-weights: ORT's dynamic quantization of the MatMul/Gemm weights, per channel. Returns the nodes
    kept in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = kept_float(onnx.load(str(src), load_external_data=False), component)
    with quiet_preprocess_notice():
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    return excluded


class FeedsReader:
    """ORT's calibration reader (a CalibrationDataReader by its get_next) over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def __iter__(self):
        return self.items


def quantize_full(src: Path, dst: Path, component: str, feeds: Sequence[dict[str, np.ndarray]]) -> list[str]:
    """int8-full: ORT's static QDQ quantization (uint8 activations, int8 weights per channel), calibrated
    (min-max) on `feeds`. Returns the nodes kept in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    excluded = kept_float(onnx.load(str(src), load_external_data=False), component)
    with quiet_preprocess_notice():
        quantize_static(
            src,
            dst,
            FeedsReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(FULL_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            calibration_providers=["CPUExecutionProvider"],
            # every sample's activations are held until the ranges are computed: ORT 1.32's
            # CalibMaxIntermediateOutputs drops each full batch of samples without computing their ranges
            extra_options={"MatMulConstBOnly": True},
        )
    return excluded


class RecordingBinding:
    """A U-Net binding that keeps a copy of its inputs at every run (the calibration samples)."""

    def __init__(self, binding, feeds: dict[str, np.ndarray], samples: list):
        self.binding, self.samples = binding, samples
        self.current = {name: np.array(value, copy=True) for name, value in feeds.items()}

    def update(self, name: str, value: np.ndarray) -> None:
        self.current[name] = np.array(value, copy=True)
        self.binding.update(name, value)

    def run(self) -> dict[str, np.ndarray]:
        self.samples.append(dict(self.current))
        return self.binding.run()


class RecordingComponent:
    """A runtime component that records the inputs of every run, through a call or a binding."""

    def __init__(self, component, samples: list):
        self.component, self.samples = component, samples

    def __getattr__(self, name: str):
        return getattr(self.component, name)

    def bind(self, feeds: dict[str, np.ndarray]) -> RecordingBinding:
        return RecordingBinding(self.component.bind(feeds), feeds, self.samples)

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        self.samples.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return self.component(**feeds)


def calibration_samples(
    folder: Path, components: Sequence[str], prompts: Sequence[str], steps: int, size: int
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every run's inputs of `components` while the export's fp32 graphs draw each prompt (seed = its index)."""
    from sdruntime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder, "cpu", verify=False)
    samples: dict[str, list] = {name: [] for name in components}
    for name in components:
        pipe._components[name] = RecordingComponent(pipe.component(name), samples[name])
    for seed, prompt in enumerate(prompts):
        pipe(prompt, num_inference_steps=steps, seed=seed, height=size, width=size)
    return samples


def components_to_quantize(manifest, quantize_vae: bool) -> list[str]:
    """The export's text encoders and U-Net, and its VAE with --quantize-vae."""
    names = DEFAULT_COMPONENTS + (VAE_COMPONENTS if quantize_vae else ())
    return [name for name in names if manifest.has(name)]


def quantize_export(
    folder: Path, scheme: str, prompts: Sequence[str], quantize_vae: bool, log: Callable, steps: int = CALIBRATION_STEPS
) -> None:
    """Quantize the written export in `folder` in place: each component's graph replaced by its int8 graph,
    checked (strict types, loads on the CPU EP), and its manifest entry rewritten. int8-full calibrates on
    `prompts`, `steps` denoising steps each."""
    from sdruntime.manifest import read_manifest, write_manifest

    manifest = read_manifest(folder)
    if manifest.pipeline.transformer_family:
        raise SdexportError("--quantize supports U-Net pipelines (SD 1.x/2.x, SDXL): convert SD3 or Flux without it")
    names = components_to_quantize(manifest, quantize_vae)
    samples = {}
    if scheme == "int8-full":
        started = time.perf_counter()
        samples = calibration_samples(folder, names, prompts, steps, calibration_size(manifest))
        log(f"calibrated on {len(prompts)} prompts x {steps} steps in {time.perf_counter() - started:.1f} s")
    components = dict(manifest.components)
    for name in names:
        started = time.perf_counter()
        entry = quantize_component(folder, manifest.components[name], name, scheme, samples.get(name), len(prompts))
        components[name] = entry
        size = sum(f.bytes for f in entry.files) / 1e6
        log(f"quantized {name} ({scheme}) in {time.perf_counter() - started:.1f} s, {size:.1f} MB")
    write_manifest(folder, replace(manifest, components=components))


def calibration_size(manifest) -> int:
    """The calibration pictures' side: the export's default size, at most 256 pixels (calibrating an SD 1.5
    U-Net at 512 pixels on a CPU takes long; ranges at 256 were not compared with ranges at 512), a multiple
    of the size multiple."""
    facts = manifest.pipeline
    side = min(facts.default_height, facts.default_width, 256)
    return max(manifest.size_multiple, side // manifest.size_multiple * manifest.size_multiple)


def quantize_component(
    folder: Path, entry: ComponentEntry, name: str, scheme: str, samples: Sequence | None, prompts: int
) -> ComponentEntry:
    """One component's graph replaced by its int8 graph (written as `save_model` writes every graph), checked,
    and its manifest entry: the new files, the scheme, no weight map (run-time LoRAs need the float weights),
    no comparison with PyTorch (that was of the fp32 graph)."""
    import onnx

    from .graph_check import check_written_graph
    from .graph_files import save_model

    path = folder / entry.path
    scratch = folder / ".int8" / name
    scratch.mkdir(parents=True)
    try:
        if scheme == "int8-full":
            excluded = quantize_full(path, scratch / "model.onnx", name, samples or [])
        else:
            excluded = quantize_weights(path, scratch / "model.onnx", name)
        model = onnx.load(str(scratch / "model.onnx"))
        graph_files = [f for f in entry.files if Path(f.path).name.startswith("model.onnx")]
        for f in graph_files:
            (folder / f.path).unlink()
        written = save_model(model, path)
        del model
    finally:
        shutil.rmtree(folder / ".int8")
    check_written_graph(name, path, CPU)
    prefix = str(Path(entry.path).parent)
    others = tuple(f for f in entry.files if not Path(f.path).name.startswith("model.onnx"))
    files = tuple(file_entry(folder, f"{prefix}/{w}") for w in written) + others
    full = scheme == "int8-full"
    quantization = QuantizationEntry(
        scheme="full" if full else "weights",
        weight_type="int8",
        activation_type="uint8" if full else "dynamic uint8",
        per_channel=True,
        op_types=FULL_OPS if full else WEIGHT_OPS,
        excluded_nodes=len(excluded),
        calibration_prompts=prompts if full else 0,
    )
    return replace(
        entry, files=files, weights=None, quantization=quantization, export_max_abs_diff=None, export_relative_l2=None
    )
