"""Tracing: one component's PyTorch module to an fp32 ONNX file with torch.onnx.export, past 2 GB
without its weights (attach_weights writes them afterwards), static sizes written in afterwards
(fix_axes); and freeing the PyTorch weights once they are no longer needed."""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from sdruntime.manifest import PipelineFacts, StaticShapes, axis_sizes

from .compare import Reference, reference_outputs
from .graph_files import EXTERNAL_DATA_NAME, PROTOBUF_LIMIT, set_external_location
from .optimize import ort_offline_optimize
from .specs import (
    controlnet_models,
    denoiser,
    dynamic_axes,
    example_inputs,
    io_of,
    model_dims,
    size_multiple,
    spec_of,
    text_encoders,
    tracing_patches,
    wrap,
)
from .streaming import WeightSource, is_streamed, source_of
from .weight_map import WeightSample, sample_weights

LEAN_TRACE_BYTES = PROTOBUF_LIMIT  # components with more weights than this are traced without them


def trace(
    component: str, pipe, opset: int, fixed: dict[str, int], latent_size: tuple[int, int], batch: int, path: Path
) -> Path:
    """Trace one component to an fp32 ONNX file (past 2 GB, attach_weights writes the weights beside it).

    Static exports are traced with symbolic axes too, at their static sizes, and get those sizes
    written into the file afterwards (fix_axes). Traced with constant shapes, torch turns tensors
    made from shapes alone into constants while it converts each op, and its per-op shape
    inference fails on a constant of 1 GiB or more (torch 2.11 and 2.13 alike): it counts the
    tensor twice against protobuf's 2 GiB limit and has no file to put it in. The cuda target's
    plain attention makes one, baddbmm's empty [2 * batch * heads, tokens, tokens] input: 1 GiB
    for one SD 1.5 image at 512x512.
    """
    module = wrap(component, pipe)
    inputs = example_inputs(component, pipe, batch, *latent_size)
    io = io_of(component, pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = source_of(spec_of(component).module_of(pipe, component))
    # Past 2 GB the weights go in as graph inputs and are written afterwards, one tensor at a time:
    # exporting them with the graph holds them twice (an SDXL U-Net's 10.3 GB would need 21 GB). A
    # streamed module (streaming.py) is traced on the meta device and its weights read from its source.
    lean = source is not None or parameter_bytes(module) > LEAN_TRACE_BYTES
    if source is not None:
        inputs = {name: value.to("meta") for name, value in inputs.items()}
    with torch.no_grad(), warnings.catch_warnings(), tracing_patches(component, pipe):
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks are expected
        # dynamo=False: torch 2.13's default dynamo exporter ignores dynamic_axes
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=[s.name for s in io.inputs],
            output_names=[s.name for s in io.outputs],
            dynamic_axes=dynamic_axes(component, {}, pipe),
            opset_version=opset,
            # folding would turn weights it cannot see into nameless inputs; ORT folds them at finishing
            do_constant_folding=not lean,
            export_params=not lean,
            # on the meta device torch's initializer de-duplication would read values there are none of
            keep_initializers_as_inputs=True if source is not None else None,
            dynamo=False,
        )
    if source is not None:
        # ORT's basic passes, which the generic target runs on every graph, run here while the weights are
        # still graph inputs: later they would load all of them (optimize.finish_graph skips them)
        onnx.save_model(ort_offline_optimize(path, "basic"), str(path))
    if lean:
        attach_weights(path, module, {spec.name for spec in io.inputs}, weight_reader(module, source))
    if fixed:
        sizes = {**model_dims(pipe), **fixed}
        fix_axes(path, {spec.name: [sizes.get(axis) for axis in spec.shape] for spec in io.inputs + io.outputs}, fixed)
    return path


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def weight_reader(module: torch.nn.Module, source: WeightSource | None):
    """name -> tensor for the wrapper `module`'s state_dict names: its own tensors, or a streamed module's read
    from its source (which names them without the wrapper's attribute, "text_encoder.")."""
    state = module.state_dict()
    if source is None:
        return state.get
    return lambda name: source.tensor(name.split(".", 1)[1]) if name in state else None


def attach_weights(path: Path, module: torch.nn.Module, io_inputs: set[str], read=None) -> None:
    """Turn the graph inputs that a weightless trace (export_params=False) named after the module's
    parameters and buffers into initializers, written one at a time into one model.onnx_data
    (`read`: name -> tensor, weight_reader's; the module's own tensors by default)."""
    model = onnx.load(str(path))
    read = read or module.state_dict().get
    kept = []
    offset = 0
    with open(path.parent / EXTERNAL_DATA_NAME, "wb") as data:
        for value in model.graph.input:
            if value.name in io_inputs:
                kept.append(value)
                continue
            weight = read(value.name)
            if weight is None:
                raise RuntimeError(f"the traced graph takes {value.name}, which is neither an input nor a weight")
            array = weight.detach().cpu().contiguous().numpy()  # 0-d stays 0-d
            tensor = onnx.TensorProto(name=value.name, dims=array.shape)
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            set_external_location(tensor, offset, array.nbytes)
            data.write(memoryview(array.reshape(-1)).cast("B"))
            offset += array.nbytes
            model.graph.initializer.append(tensor)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save_model(model, str(path))


def fix_axes(path: Path, io_shapes: dict[str, list[int | None]], fixed: dict[str, int]) -> None:
    """Make a traced file static, in place: the symbolic axes of its inputs and outputs get the
    sizes of `io_shapes` (None: left as traced), those of its intermediate values the sizes of the
    axes `fixed` names. Tensors (a > 2 GB model's external data) stay where torch wrote them.
    """
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        for dim, size in zip(value.type.tensor_type.shape.dim, io_shapes.get(value.name, [])):
            if size is not None and dim.HasField("dim_param"):
                dim.dim_value = size  # clears dim_param (one of the two)
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in fixed:
                dim.dim_value = fixed[dim.dim_param]
    onnx.save_model(model, str(path))


def release_weights(pipe) -> None:
    """Free the PyTorch weights once every graph is traced and PyTorch's reference outputs are kept:
    ONNX Runtime then holds the weights alone (ORT's fusions of an SD 1.5 U-Net need most of a
    24 GB machine on their own)."""

    for module in (denoiser(pipe), pipe.vae, *text_encoders(pipe).values(), *controlnet_models(pipe).values()):
        module.to("meta")
    gc.collect()


def release_unused(pipe, wanted: list[str]) -> list[str]:
    """Free the PyTorch weights of the modules no wanted component is traced from (an SDXL U-Net export
    need not hold SDXL's 3.5 GB of text encoders and VAE); their configs stay. Returns their names."""
    main = "transformer" if getattr(pipe, "unet", None) is None else "unet"
    modules = {main: denoiser(pipe), "vae": pipe.vae, **text_encoders(pipe), **controlnet_models(pipe)}
    # a ControlNet's module goes by its component name
    used = {c if c in controlnet_models(pipe) else spec_of(c).module for c in wanted}
    unused = [name for name in modules if name not in used]
    for name in unused:
        modules[name].to("meta")
    gc.collect()
    return unused


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
    streamed: bool = False  # its weights were read from a source one at a time (streaming.py)
    weights: dict[str, WeightSample] | None = None  # samples of its weights for the manifest's weight map


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
    streamed = is_streamed(spec_of(component).module_of(pipe, component))
    weights = sample_weights(component, pipe)
    return Traced(component, path, dims, latent, batch, time.perf_counter() - started, outputs, streamed, weights)
