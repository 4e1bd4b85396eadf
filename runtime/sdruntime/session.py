"""ONNX Runtime sessions for the exported components: providers, options and IO binding."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import UserError
from .manifest import TEXT_ENCODER_MASK, ExportError, Manifest, TensorEntry
from .onnx_proto import external_data_locations
from .ort_options import WARNINGS, ort_session_options
from .targets import RUNTIME_TARGETS

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
OPENVINO = PROVIDER_NAMES["openvino"]
# how each provider's package is installed, for the refusal when it is missing
INSTALL_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu for cuda/tensorrt",
    "TensorrtExecutionProvider": "install onnxruntime-gpu for cuda/tensorrt",
    OPENVINO: 'pip install "sdexport-runtime[openvino]" && pip install --force-reinstall --no-deps '
    "onnxruntime-openvino (its package replaces onnxruntime's files)",
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class ProviderError(UserError):
    """The requested execution provider cannot run this export; the message says what can."""


@dataclass
class SessionSettings:
    """Knobs for every component's session. `optimization` None picks a level per target."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimization: str | None = None
    enable_cpu_mem_arena: bool = True
    log_severity: int = 3
    extra: dict[str, str] = field(default_factory=dict)
    # CUDA EP: capture the U-Net in a CUDA graph when the export is static (fixed shapes and buffers)
    cuda_graph: bool = True
    # TensorRT EP: fp16 engines, caches beside the export, and the shapes its profile covers
    trt_fp16: bool = True
    trt_cache_dir: str | None = None
    trt_images: tuple[int, int, int] = (1, 1, 4)  # images per call: min, opt, max
    trt_sizes: tuple[int, int, int] | None = None  # pixel side: min, opt, max (default: the export's default)
    # OpenVINO EP: the device ("CPU", "GPU", "NPU", "GPU.1", ...; "openvino:GPU" as a provider name sets it too),
    # its compiled-model cache (default: openvino_cache beside the export) and precision (None: the device's own)
    openvino_device: str = "CPU"
    openvino_cache_dir: str | None = None
    openvino_precision: str | None = None
    # LoRA sets (adapters.py) whose sessions stay loaded besides the base's; each holds its own U-Net session
    adapter_sets: int = 2


def resolve_providers(provider: str | Sequence, target: str) -> list:
    """Turn `provider` into ORT's provider list for a target, or raise one clear line.

    A name ("cpu", "cuda", "tensorrt", "openvino", "openvino:GPU") asks for exactly that provider; a list of
    ORT providers (names or (name, options) pairs) falls back in order among those installed that the target supports.
    """
    available = ort.get_available_providers()
    known = RUNTIME_TARGETS.get(target)  # which providers may run the target's graphs (targets.py)
    supported = known.providers if known else None
    if isinstance(provider, str):
        provider, _, device = provider.partition(":") if provider.startswith("openvino:") else (provider, "", "")
        if provider not in PROVIDER_NAMES and provider not in PROVIDER_NAMES.values():
            raise ProviderError(
                f"unknown provider '{provider}': choose cpu, cuda, tensorrt, openvino or a list of ORT providers"
            )
        name = PROVIDER_NAMES.get(provider, provider)
        if name not in available:
            hint = INSTALL_HINTS.get(name)
            raise ProviderError(
                f"{name} is not installed: this onnxruntime offers {', '.join(available)}"
                + (f" ({hint})" if hint else "")
            )
        if supported is not None and name not in supported:
            raise ProviderError(
                f"this export targets '{target}' and cannot run on {name}: use {' or '.join(sorted(supported))}, "
                f"or re-export with `sdexport convert --target generic`"
            )
        if device:  # "openvino:GPU": the device travels as the provider's own option
            return [(name, {"device_type": device})]
        return [name] if name != "TensorrtExecutionProvider" else [name, "CUDAExecutionProvider"]
    chosen = []
    for entry in provider:
        if isinstance(entry, str) and entry.startswith("openvino:"):  # "openvino:GPU,cpu" from the command line
            entry = (OPENVINO, {"device_type": entry.partition(":")[2]})
        name = entry[0] if isinstance(entry, (tuple, list)) else entry
        name = PROVIDER_NAMES.get(name, name)
        if name in available and (supported is None or name in supported):
            chosen.append((name, entry[1]) if isinstance(entry, (tuple, list)) else name)
    if not chosen:
        raise ProviderError(
            f"none of the providers {[PROVIDER_NAMES.get(p, p) if isinstance(p, str) else p[0] for p in provider]} "
            f"can run this '{target}' export here: installed are {', '.join(available)}"
        )
    return chosen


def first_provider(providers: list) -> str:
    return providers[0][0] if isinstance(providers[0], tuple) else providers[0]


def default_level(target: str, providers: list, component: str = "", laid_out: bool = False) -> str:
    """The graph optimization level a session is created at, unless the settings choose one.

    GPU providers gain fusions from "all". On the CPU EP, graphs laid out when exported (cpu
    exports with a layout probe) were optimized at "all" then, so "basic" loads them as they are.
    For other graphs on the CPU EP, "all" sped the VAE decoder at 256x256 from 3.56 to 3.07 s
    (0.3 s vs 0.4 s to create its session), while for an SD 1.5 U-Net its NCHWc layout took session
    creation from 1.2 s to 8-11 s; that U-Net gains the layout (2.1 -> 1.8 s per step at 32x32
    latents) from the cpu target instead.
    """
    if first_provider(providers) != "CPUExecutionProvider":
        return "all"
    known = RUNTIME_TARGETS.get(target)
    if laid_out and known and known.load_level:
        return known.load_level
    return "all" if component in ("vae_decoder", "vae_encoder") else "basic"


def check_cpu_layout(manifest: Manifest) -> None:
    """Refuse a cpu export whose NCHWc layout this CPU reads differently, by running its probe.

    ORT lays convolutions out in blocks as wide as the exporting CPU's vectors (16 floats with
    AVX-512, 8 with AVX2); a graph laid out for another width runs without error and computes garbage.
    """
    probe = manifest.cpu_layout_probe
    if probe is None:
        return
    model = manifest.folder / probe.path
    io_path = model.with_name("io.npz")  # its input and expected output, beside it
    for path in (model, io_path):
        if not path.is_file():
            raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
    with np.load(io_path) as io:
        x, expected = io["x"], io["y"]
    options = ort_session_options("basic", log_severity=WARNINGS)
    try:
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        same = got.shape == expected.shape and np.allclose(got, expected, rtol=1e-4, atol=1e-4)
        why = "it computes the layout probe differently"
    except Exception as e:  # an ORT without NCHWc kernels for this CPU
        same, why = (
            False,
            f"it cannot run the layout probe: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
        )
    if not same:
        raise ProviderError(
            f"{manifest.folder} is a cpu export laid out for another CPU ({why}; ONNX Runtime's NCHWc blocks "
            "follow the vector width): re-export it on this machine with `sdexport convert --target cpu`, "
            "or use --target generic"
        )


def session_options(
    settings: SessionSettings, manifest: Manifest, providers: list, component: str = ""
) -> ort.SessionOptions:
    laid_out = manifest.cpu_layout_probe is not None
    level = default_level(manifest.target, providers, component, laid_out)
    quantization = getattr(manifest.components.get(component), "quantization", None)
    if quantization is not None and quantization.scheme == "full":
        # QDQ graphs get int8 kernels only where ORT fuses their Q/DQ pairs, from "extended" up: an SD 1.5 U-Net
        # call took 4.42 s at "basic" and 0.96 s at "all" on 2 cores (docs/benchmarks.md, int8)
        level = "all"
    return ort_session_options(
        settings.optimization or level,
        log_severity=settings.log_severity,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        cpu_mem_arena=settings.enable_cpu_mem_arena,
        config=settings.extra,
    )


def check_external_data(model_path: Path) -> None:
    """Refuse models whose external-data locations leave the model's folder (ORT >= 1.32 refuses too)."""
    folder = model_path.parent.resolve()
    try:
        locations = external_data_locations(model_path)
    except (ValueError, IndexError) as e:
        raise ExportError(f"{model_path} is not an ONNX model ({e}): run `sdexport convert` again") from e
    for location in locations:
        target = (folder / location).resolve()
        if os.path.isabs(location) or folder not in target.parents:
            raise ExportError(
                f"{model_path} points its external data at '{location}', outside its folder: "
                "refusing to read it; re-export the model or move the data beside model.onnx"
            )


def shape_of(spec: Sequence[int | str], known: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else known[d] for d in spec)


def trt_profile(manifest: Manifest, component: str, settings: SessionSettings) -> dict[str, str]:
    """TensorRT's min/opt/max shape profile for a component, from the requested images and sizes."""
    static = manifest.static
    sizes = settings.trt_sizes or (manifest.pipeline.default_height,) * 3
    if static:
        images, sizes = (static.batch_size,) * 3, (static.height,) * 3
    else:
        images = settings.trt_images
    profile = {}
    for key, n, side in zip(("min", "opt", "max"), images, sizes):
        known = manifest.axis_sizes(component, n, side, side)
        shapes = [
            f"{i.name}:{'x'.join(str(d) for d in shape_of(i.shape, known))}"
            for i in manifest.components[component].inputs
            if not (component == "unet" and "residual" in i.name and manifest.pipeline.unet_residual_defaults)
            and not (i.name == TEXT_ENCODER_MASK and manifest.pipeline.text_encoder_mask_defaults)
        ]
        profile[f"trt_profile_{key}_shapes"] = ",".join(shapes)
    return profile


def provider_options(providers: list, manifest: Manifest, component: str, settings: SessionSettings) -> list:
    """Add this project's defaults to named providers: TensorRT caches, fp16 and profiles; CUDA graphs; OpenVINO's
    device and model cache."""
    expanded = []
    for entry in providers:
        if first_provider([entry]) == OPENVINO:  # the caller's own options win over the settings'
            expanded.append(
                (OPENVINO, {**openvino_options(manifest, settings), **(entry[1] if isinstance(entry, tuple) else {})})
            )
        elif isinstance(entry, tuple):  # the caller's own options win
            expanded.append(entry)
        elif entry == "TensorrtExecutionProvider":
            cache = settings.trt_cache_dir or str(manifest.folder / "trt_cache")
            expanded.append(
                (
                    entry,
                    {
                        "trt_fp16_enable": str(int(settings.trt_fp16)),
                        "trt_engine_cache_enable": "1",
                        "trt_engine_cache_path": cache,
                        "trt_timing_cache_enable": "1",
                        "trt_timing_cache_path": cache,
                        **trt_profile(manifest, component, settings),
                    },
                )
            )
        elif entry == "CUDAExecutionProvider" and uses_cuda_graph(manifest, component, settings):
            expanded.append((entry, {"enable_cuda_graph": "1"}))
        else:
            expanded.append(entry)
    return expanded


def openvino_options(manifest: Manifest, settings: SessionSettings) -> dict[str, str]:
    """The OpenVINO EP's options from the settings: device, model cache, precision, threads."""
    options = {
        "device_type": settings.openvino_device,
        "cache_dir": settings.openvino_cache_dir or str(manifest.folder / "openvino_cache"),
    }
    if settings.openvino_precision:
        options["precision"] = settings.openvino_precision
    if settings.intra_op_threads > 0:
        options["num_of_threads"] = str(settings.intra_op_threads)
    return options


def openvino_start_error(options: dict[str, str]) -> ProviderError:
    """The refusal when ORT could not start the OpenVINO EP with these options (it then falls back to the CPU EP)."""
    try:  # the OpenVINO build's own list; absent from other builds
        from onnxruntime.capi._pybind_state import get_available_openvino_device_ids

        devices = ", ".join(get_available_openvino_device_ids()) or "none"
    except ImportError:
        devices = "unknown"
    asked = ", ".join(f"{k}={options[k]}" for k in ("device_type", "precision") if k in options)
    return ProviderError(
        f"OpenVINO could not start with {asked} (ONNX Runtime's log above says why; OpenVINO devices here: {devices}): "
        "choose a device this machine has, e.g. --provider openvino:CPU, and a precision it supports (CPU: FP32, ACCURACY)"
    )


def uses_cuda_graph(manifest: Manifest, component: str, settings: SessionSettings) -> bool:
    known = RUNTIME_TARGETS.get(manifest.target)
    return (
        settings.cuda_graph
        and component == "unet"
        and manifest.static is not None
        and (known is None or known.cuda_graphs)
    )


class Component:
    """One exported component: its session, its IO from the manifest and a run through IO binding.

    `overrides` ({initializer name: array}) replace graph initializers in this session only (adapters.py: a
    LoRA's patched weights); ONNX Runtime reads the arrays in place, so the component keeps them alive."""

    def __init__(
        self,
        manifest: Manifest,
        name: str,
        providers: list,
        settings: SessionSettings,
        overrides: Mapping[str, np.ndarray] | None = None,
    ):
        entry = manifest.components[name]
        self.name = name
        self.path = manifest.model_path(name)
        check_external_data(self.path)
        self.inputs: dict[str, TensorEntry] = {i.name: i for i in entry.inputs}
        self.outputs: dict[str, TensorEntry] = {o.name: o for o in entry.outputs}
        self.manifest = manifest
        # a CUDA graph replays fixed device addresses: keep one binding per shape for the session's life
        self.reuse_bindings = uses_cuda_graph(manifest, name, settings) and "CUDAExecutionProvider" in str(providers)
        self._bindings: dict[tuple, Binding] = {}
        self.run_seconds = 0.0  # time inside session runs, for the loop-overhead measurement
        options = session_options(settings, manifest, providers, name)
        self.overrides = {key: np.ascontiguousarray(value) for key, value in (overrides or {}).items()}
        self._override_values = [ort.OrtValue.ortvalue_from_numpy(value) for value in self.overrides.values()]
        for key, value in zip(self.overrides, self._override_values):
            options.add_initializer(key, value)
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=provider_options(providers, manifest, name, settings)
            )
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{self.path} could not be loaded by ONNX Runtime: {message}") from e
        # inputs ORT must be fed; those with a default (the U-Net's ControlNet residuals) are not among them
        self.required_inputs = {i.name for i in self.session.get_inputs()}
        used = self.session.get_providers()
        self.provider = used[0]
        # asked for OpenVINO alone (a list allows falling back), and ORT fell back to the CPU EP silently
        if len(providers) == 1 and first_provider(providers) == OPENVINO and self.provider != OPENVINO:
            raise openvino_start_error(provider_options(providers, manifest, name, settings)[0][1])
        self.device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        # a static export's batch: its first input's first axis (a ControlNet's conditioning_scale is fixed in
        # every export, so the export's being static decides, not any fixed axis)
        first = entry.inputs[0].shape if entry.inputs else ()
        self.static_batch = first[0] if manifest.static is not None and first and isinstance(first[0], int) else None

    def input_dtype(self, name: str):
        return NUMPY_DTYPES[self.inputs[name].dtype]

    def output_shapes(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """Output shapes from the inputs' shapes, via the IO table's symbolic axis names."""
        known: dict[str, int] = {}
        for name, value in feeds.items():
            for axis, size in zip(self.inputs[name].shape, value.shape):
                if isinstance(axis, str):
                    known[axis] = size
        f = int(self.manifest.pipeline.vae_scale_factor)
        pixels = (
            (known["image_height"], known["image_width"])
            if "image_height" in known
            else (known["height"] * f, known["width"] * f)
            if "height" in known
            else None
        )
        if pixels is not None:  # the other spatial axes follow from the pixels (latents: pixels // f)
            sizes = self.manifest.axis_sizes(self.name, known.get("batch", 1), *pixels, guidance=False)
            known = {**sizes, **known}
        return {name: shape_of(o.shape, known) for name, o in self.outputs.items()}

    def bind(self, feeds: dict[str, np.ndarray]) -> Binding:
        """Bind inputs and preallocated outputs; with `reuse_bindings`, refill the same buffers."""
        if not self.reuse_bindings:
            return Binding(self, feeds)
        key = tuple((name, value.shape) for name, value in feeds.items())
        if key not in self._bindings:
            self._bindings[key] = Binding(self, feeds)
        else:
            for name, value in feeds.items():
                self._bindings[key].update(name, value)
        return self._bindings[key]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run once; pads or splits the batch for static exports; float outputs come back as float32."""
        batch = next(iter(feeds.values())).shape[0]
        size = self.static_batch
        if size is None or size == batch:
            return self.bind(feeds).run()
        chunks = []
        for start in range(0, batch, size):
            part = {k: v[start : start + size] for k, v in feeds.items()}
            n = next(iter(part.values())).shape[0]
            if n < size:  # pad with copies of the last row; the padded rows are dropped below
                part = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in part.items()}
            out = self.bind(part).run()
            chunks.append({k: v[:n] for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class Binding:
    """Inputs and outputs bound once as OrtValues on the component's device; inputs updated in place.

    The U-Net keeps one Binding for a whole generation: the text embeddings are bound once and
    each step only writes the latents and the timestep into the bound buffers.
    """

    def __init__(self, component: Component, feeds: dict[str, np.ndarray]):
        self.component = component
        self.io = component.session.io_binding()
        self.values: dict[str, ort.OrtValue] = {}
        device = component.device
        for name, value in feeds.items():
            # a copy: on the CPU the OrtValue wraps the array's memory, which update() then overwrites
            array = np.array(value, dtype=component.input_dtype(name), order="C", copy=True)
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
            self.io.bind_ortvalue_input(name, self.values[name])
        self.outputs: dict[str, ort.OrtValue] = {}
        for name, shape in component.output_shapes(feeds).items():
            dtype = NUMPY_DTYPES[component.outputs[name].dtype]
            self.outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
            self.io.bind_ortvalue_output(name, self.outputs[name])

    def update(self, name: str, value: np.ndarray) -> None:
        """Write new data into a bound input (same shape) without rebinding."""
        array = np.ascontiguousarray(value, dtype=self.component.input_dtype(name))
        self.values[name].update_inplace(array)

    def run(self) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        self.component.session.run_with_iobinding(self.io)
        self.component.run_seconds += time.perf_counter() - started
        results = {}
        for name, value in self.outputs.items():
            array = value.numpy()
            if array.dtype != np.float32 and array.dtype.kind == "f":
                array = array.astype(np.float32)
            elif self.component.device == "cpu":
                array = array.copy()  # a CPU OrtValue's numpy() is a view of the bound buffer, reused next run
            if not np.isfinite(array).all():
                raise NonFiniteOutput(
                    self.component.name, self.component.manifest.components[self.component.name].dtype
                )
            results[name] = array
        return results


class NonFiniteOutput(ExportError):
    def __init__(self, component: str, dtype: str = "fp16"):
        fix = (
            f"its fp16 graph overflows; re-export with `sdexport convert ... --dtype fp16 --keep-fp32 {component}`"
            if dtype == "fp16"  # an fp32 graph does not overflow where PyTorch's fp32 does not
            else "its fp32 graph or its weights are damaged; re-export it (and drop --no-verify, which skips the files' check)"
        )
        super().__init__(f"{component} produced NaN or Inf: {fix}")
        self.component = component
