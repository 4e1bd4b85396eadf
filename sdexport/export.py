"""torch.onnx.export of one component, saving (with external data when needed) and the check against PyTorch."""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import uses_external_data
from onnxruntime.transformers.float16 import convert_np_to_float16

from .components import dynamic_axes, example_inputs, io_of, model_dims, text_encoders, wrap

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_NAME = "model.onnx_data"
LEAN_TRACE_BYTES = PROTOBUF_LIMIT  # components with more weights than this are traced without them
# What fp16 conversion does to fp32 values out of fp16's range (ORT's converter, whose defaults these are)
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0


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
    # Past 2 GB the weights go in as graph inputs and are written afterwards, one tensor at a time:
    # exporting them with the graph holds them twice (an SDXL U-Net's 10.3 GB would need 21 GB).
    lean = parameter_bytes(module) > LEAN_TRACE_BYTES
    with torch.no_grad(), warnings.catch_warnings():
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
            dynamo=False,
        )
    if lean:
        attach_weights(path, module, {spec.name for spec in io.inputs})
    if fixed:
        sizes = {**model_dims(pipe), **fixed}
        fix_axes(path, {spec.name: [sizes.get(axis) for axis in spec.shape] for spec in io.inputs + io.outputs}, fixed)
    return path


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def attach_weights(path: Path, module: torch.nn.Module, io_inputs: set[str]) -> None:
    """Turn the graph inputs that a weightless trace (export_params=False) named after the module's
    parameters and buffers into initializers, written one at a time into one model.onnx_data."""
    model = onnx.load(str(path))
    state = module.state_dict()
    kept = []
    offset = 0
    with open(path.parent / EXTERNAL_DATA_NAME, "wb") as data:
        for value in model.graph.input:
            if value.name in io_inputs:
                kept.append(value)
                continue
            if value.name not in state:
                raise RuntimeError(f"the traced graph takes {value.name}, which is neither an input nor a weight")
            array = state[value.name].detach().cpu().contiguous().numpy()  # 0-d stays 0-d
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


def export_fp32(
    component: str, pipe, opset: int, fixed: dict[str, int], latent_size: tuple[int, int], batch: int
) -> onnx.ModelProto:
    """Trace one component to an fp32 ONNX model held in memory (external data loaded)."""
    with tempfile.TemporaryDirectory(prefix="sdexport-trace-") as tmp:
        path = trace(component, pipe, opset, fixed, latent_size, batch, Path(tmp) / "model.onnx")
        return onnx.load(str(path), load_external_data=True)


def release_weights(pipe) -> None:
    """Free the PyTorch weights once every graph is traced and PyTorch's reference outputs are kept:
    ONNX Runtime then holds the weights alone (ORT's fusions of an SD 1.5 U-Net need most of a
    24 GB machine on their own)."""

    for module in (pipe.unet, pipe.vae, *text_encoders(pipe).values()):
        module.to("meta")
    gc.collect()


def release_unused(pipe, wanted: list[str]) -> list[str]:
    """Free the PyTorch weights of the modules no wanted component is traced from (an SDXL U-Net export
    need not hold SDXL's 3.5 GB of text encoders and VAE); their configs stay. Returns their names."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, **text_encoders(pipe)}
    used = {"vae" if c.startswith("vae_") else c for c in wanted}
    unused = [name for name in modules if name not in used]
    for name in unused:
        modules[name].to("meta")
    gc.collect()
    return unused


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too big for one protobuf (2 GB); ByteSize() itself fails beyond that."""
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    return tensors + len(model.graph.node) * 512 > PROTOBUF_LIMIT


@dataclass
class OnDisk:
    """A graph whose weights stay in files until it is written (components past 2 GB): `model` is the
    graph with references (ONNX external data) into `folder`, and `fp16` names the tensors stored
    there in fp32 that are written in fp16 (precision.to_fp16 converts the graph and names them).
    Holding an SDXL U-Net's 10.3 GB of weights in Python while ONNX Runtime optimizes or writes them
    would pass 16 GB; this way one tensor at a time is in memory."""

    model: onnx.ModelProto
    folder: Path
    fp16: frozenset[str] = frozenset()
    owner: object = field(default=None, repr=False)  # the TemporaryDirectory holding `folder`, if any


def graph_of(model: onnx.ModelProto | OnDisk) -> onnx.ModelProto:
    """The graph of a model held in memory or on disk (with the weights of neither)."""
    return model.model if isinstance(model, OnDisk) else model


def save_model(model: onnx.ModelProto | OnDisk, path: Path) -> list[str]:
    """Write model.onnx, with every tensor in one model.onnx_data beside it when over 2 GB.

    Returns the file names written, relative to the model's folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, OnDisk):
        return save_on_disk(model, path)
    if not is_large(model):
        onnx.save_model(model, str(path))
        return [path.name]
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )
    # onnx creates the data file readable by its owner only; give it model.onnx's permissions
    shutil.copymode(path, path.parent / EXTERNAL_DATA_NAME)
    return [path.name, EXTERNAL_DATA_NAME]


def save_on_disk(disk: OnDisk, path: Path) -> list[str]:
    """Write an OnDisk graph as save_model writes one held in memory: its external tensors are read one
    at a time (and converted to fp16 where `disk.fp16` says) into one model.onnx_data, or into
    model.onnx itself when the whole model fits in 2 GB (an SD 1.5 U-Net in fp16)."""
    model = disk.model
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    written = sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in external)
    if written + model.ByteSize() + len(model.graph.node) * 512 <= PROTOBUF_LIMIT:
        for tensor in external:
            data = stored_tensor(disk, tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
        onnx.save_model(model, str(path))
        return [path.name]
    offset = 0
    with open(path.parent / EXTERNAL_DATA_NAME, "wb") as out:
        for tensor in external:
            data = stored_tensor(disk, tensor)
            set_external_location(tensor, offset, len(data))
            out.write(data)
            offset += len(data)
    onnx.save_model(model, str(path))
    shutil.copymode(path, path.parent / EXTERNAL_DATA_NAME)
    return [path.name, EXTERNAL_DATA_NAME]


def stored_tensor(disk: OnDisk, tensor: onnx.TensorProto) -> bytes:
    """The bytes of one of the graph's external tensors as they are to be written (fp16 where converted)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    data = np.fromfile(
        disk.folder / info["location"], dtype=np.uint8, count=int(info["length"]), offset=int(info.get("offset", 0))
    )
    if tensor.name in disk.fp16:
        data = convert_np_to_float16(data.view(np.float32), FP16_MIN_POSITIVE, FP16_MAX_FINITE).astype(np.float16)
    expected = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if data.nbytes != expected:
        raise RuntimeError(
            f"{tensor.name} holds {data.nbytes} bytes in {info['location']}, its type and shape {expected}"
        )
    return data.tobytes()


def set_external_location(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def torch_outputs(component: str, pipe, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    module = wrap(component, pipe)
    with torch.no_grad():
        out = module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in out]


def ort_outputs(
    model_path: Path, inputs: dict[str, np.ndarray], provider: str = "CPUExecutionProvider"
) -> list[np.ndarray]:

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # optimized when exported
    # one run: the CPU kernels' packed copies of the weights (doubling an SDXL U-Net's) would not pay off
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(model_path), options, providers=[provider])
    feed = {}
    for spec in session.get_inputs():
        value = inputs[spec.name]
        feed[spec.name] = value.astype(np.float16) if spec.type == "tensor(float16)" else value
    return [o.astype(np.float32) for o in session.run(None, feed)]


@dataclass(frozen=True)
class Reference:
    """Random inputs of one component and PyTorch's outputs for them, kept so that the weights can
    be freed before ONNX Runtime loads the graph."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def reference_outputs(component: str, pipe, batch: int, latent_size: tuple[int, int], seed: int = 1) -> Reference:
    inputs = example_inputs(component, pipe, batch, *latent_size, seed=seed)
    return Reference({k: v.numpy() for k, v in inputs.items()}, torch_outputs(component, pipe, inputs))


def compare_with_torch(
    component: str,
    pipe,
    model_path: Path,
    batch: int,
    latent_size: tuple[int, int],
    seed: int = 1,
    provider: str = "CPUExecutionProvider",
) -> dict[str, float]:
    """Run the same random inputs through PyTorch and ONNX Runtime."""
    return compare_outputs(reference_outputs(component, pipe, batch, latent_size, seed), model_path, provider)


def compare_outputs(reference: Reference, model_path: Path, provider: str = "CPUExecutionProvider") -> dict[str, float]:
    """ONNX Runtime's outputs for the reference's inputs against PyTorch's."""
    expected = reference.outputs
    got = ort_outputs(model_path, reference.inputs, provider)
    max_abs = max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got))
    rel_l2 = max(float(np.linalg.norm(e - g) / max(np.linalg.norm(e), 1e-12)) for e, g in zip(expected, got))
    finite = all(np.isfinite(g).all() for g in got)
    return {"max_abs_diff": max_abs, "relative_l2": rel_l2, "finite": finite}
