"""Per-target graph work after tracing, fp16 conversion included.

What each target means here (its offline level, whether it holds the cuda fusions) is the exporter's
target table, sdexport/targets.py. The cuda fusions are kept only where their CUDA kernels accept
them (fusion_limits.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from sdruntime.ort_options import QUIET, WARNINGS, ort_session_options

from .fusion_limits import keep_within_limits
from .graph_files import EXTERNAL_DATA_NAME, OnDisk, graph_of, is_large, save_model
from .precision import fp32_nodes, to_fp16
from .progress import mark
from .specs import graph_spec
from .targets import EXPORT_TARGETS

NCHWC_DOMAIN = "com.microsoft.nchwc"
CPU_LAYOUT_PROBE = "cpu_layout_probe"


def finish_graph(
    component: str,
    model: onnx.ModelProto | Path,
    target: str,
    fp16: bool,
    upcast_attention: bool,
    extra_fp32_nodes: Sequence[str] = (),
    streamed: bool = False,
) -> tuple[onnx.ModelProto | OnDisk, list[str]]:
    """Fusions and offline optimization for one target on the fp32 graph, then fp16 conversion.

    The order matters: fusions need the fp32 patterns, and ORT's offline optimization on the CPU EP
    would bake CPU-only fp16 casts into a graph meant for every provider. `model` may be the path
    of a traced file, which lets the cuda fusions read its weights lazily; a traced file whose
    weights are in model.onnx_data (past 2 GB) comes back OnDisk, its weights left in files until
    save_model writes them (in fp16 where converted). Returns the graph and the nodes an fp16 graph
    keeps in fp32 (the rules in precision.py plus `extra_fp32_nodes`). A `streamed` graph (streaming.py:
    T5-XXL) is not optimized offline, which would load all of its weights: ONNX Runtime optimizes it when
    a session loads it; it stays OnDisk in the traced folder, which the caller keeps until it is written.
    """
    export_target = EXPORT_TARGETS[target]
    if streamed:  # the generic target's (plan.check_streamed)
        model = OnDisk(onnx.load(str(model), load_external_data=False), model.parent)
        kept = fp32_nodes(component, model.model, upcast_attention) + list(extra_fp32_nodes) if fp16 else []
        return (to_fp16(component, model, list(dict.fromkeys(kept))) if fp16 else model), kept
    # an fp16 conversion cannot follow the NCHWc layout (and fp16 runs slowly on the CPU EP anyway)
    level = "extended" if export_target.offline_level == "all" and fp16 else export_target.offline_level
    if isinstance(model, Path) and not export_target.fused_ops and level:
        # ONNX Runtime reads the traced file itself: holding the graph here as well would double an
        # SDXL U-Net's 10.3 GB while ORT optimizes it
        model = ort_offline_optimize(model, level, on_disk=(model.parent / EXTERNAL_DATA_NAME).exists())
    else:
        if isinstance(model, Path):
            model = (
                cuda_fusions_from_file(component, model, fp16)
                if export_target.fused_ops
                else onnx.load(str(model), load_external_data=True)
            )
        elif export_target.fused_ops:
            model = cuda_fusions(component, model, fp16)
        if level:
            model = ort_offline_optimize(model, level)
    kept: list[str] = []
    if fp16:
        mark(component, "fp16")
        kept = list(dict.fromkeys([*fp32_nodes(component, graph_of(model), upcast_attention), *extra_fp32_nodes]))
        model = to_fp16(component, model, kept)
    if target == "tensorrt" and not isinstance(model, OnDisk):  # inference reads weights, and stops at 2 GB
        model = infer_shapes(model)
    return model, kept


def cuda_fusions(component: str, model: onnx.ModelProto, fp16: bool) -> onnx.ModelProto:
    """ORT's transformer-optimizer fusions for Stable Diffusion, as its optimize_pipeline applies them,
    less the fused nodes whose CUDA kernel would refuse their widths (fusion_limits.py): those go back
    to standard ops, and the model's metadata (fusion_limits.UNFUSED_KEY) lists them with the reason."""

    model_type = graph_spec(component, [o.name for o in model.graph.output]).fusion_model_type
    options = FusionOptions(model_type)
    if model_type == "unet":
        # packed QKV/KV only pay off (and are only kernels) in fp16
        options.enable_packed_kv = fp16
        options.enable_packed_qkv = fp16
        options.enable_bias_add = True
    if model_type == "vae":
        # ORT's VAE attention matcher misreads diffusers 0.39's single mid-block attention (it
        # raised while reading the head count); the VAE's time is in its convolutions anyway
        options.enable_attention = False
    optimized = optimize_model(
        model,
        model_type=model_type,
        num_heads=0,
        hidden_size=0,
        opt_level=0,
        optimization_options=options,
        use_gpu=True,
    )
    # the fusion scripts match patterns without the kernels' limits (BiasSplitGelu: 5 widths only)
    model, _ = keep_within_limits(optimized.model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def cuda_fusions_from_file(component: str, path: Path, fp16: bool) -> onnx.ModelProto:
    """cuda_fusions with the weights left on disk until a fusion reads them.

    ORT's fusions copy the model for shape inference several times: with an SD 1.5 U-Net's 3.4 GB
    of weights in memory they ran out of 24 GB here. A traced file with external weights is fused
    in a child process whose working folder is the file's (fuse_traced_file): ORT's fusion scripts
    read external tensors relative to the working folder and take no folder to read them from.
    """
    lazy = onnx.load(str(path), load_external_data=False)
    if not any(uses_external_data(tensor) for tensor in lazy.graph.initializer):
        return cuda_fusions(component, lazy, fp16)
    del lazy
    with tempfile.TemporaryDirectory(prefix="sdexport-fused-") as tmp:
        fused = Path(tmp) / "model.onnx"
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        code = "import sys; from sdexport.optimize import fuse_traced_file; fuse_traced_file(*sys.argv[1:])"
        run = subprocess.run(
            [sys.executable, "-c", code, component, path.name, str(fused), str(int(fp16))], cwd=path.parent, env=env
        )
        if run.returncode:
            raise RuntimeError(f"the cuda fusions of {component} failed in their child process (exit {run.returncode})")
        return onnx.load(str(fused), load_external_data=True)


def fuse_traced_file(component: str, name: str, out: str, fp16: str) -> None:
    """The child process of cuda_fusions_from_file, in the traced file's folder: fuse `name` (its
    tensors stay external until a fusion reads one), then write the fused graph with every weight to `out`."""
    fused = cuda_fusions(component, onnx.load(name, load_external_data=False), fp16 == "1")
    onnx.load_external_data_for_model(fused, ".")
    # not save_model: onnx refuses an external data name that exists in the working folder (the traced one's)
    onnx.save_model(fused, out, save_as_external_data=True, location="fused.onnx_data", size_threshold=1024)


def ort_offline_optimize(model: onnx.ModelProto | Path, level: str, on_disk: bool = False) -> onnx.ModelProto | OnDisk:
    """Run ONNX Runtime's graph optimizations of `level` once and keep the optimized graph.

    The basic level uses standard ops only; the extended level's fusions (FusedConv, ...) run on
    the CPU EP; the "all" level adds the NCHWc layout, which is specific to the CPU's vector width.
    ORT writes the weights to one external file (a graph may grow past 2 GB as NCHWc pads channels),
    read back here, or left there with `on_disk` (the OnDisk then owns the folder). A model over
    2 GB is consumed: saving it moves its tensors out of the proto. A path is read by ONNX Runtime
    directly.
    """

    tmp = tempfile.TemporaryDirectory(prefix="sdexport-opt-")
    try:
        optimized = Path(tmp.name) / "out" / "model.onnx"
        if isinstance(model, Path):
            source = model
        else:
            source = Path(tmp.name) / "in" / "model.onnx"
            save_model(model, source)
        optimized.parent.mkdir()
        options = ort_session_options(
            level,
            # quiet at "all": its warning that "all" is machine-specific is the layout probe's business
            log_severity=QUIET if level == "all" else WARNINGS,
            # the session never runs: the CPU kernels' packed copies of the weights would only double
            # the MatMul weights in memory (the optimized file is the same either way)
            prepacking=False,
            save_optimized_to=optimized,
            external_data_name=EXTERNAL_DATA_NAME,
        )
        session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        del session
        if on_disk:
            return OnDisk(onnx.load(str(optimized), load_external_data=False), optimized.parent, owner=tmp)
        return onnx.load(str(optimized), load_external_data=True)
    finally:
        if not on_disk:
            tmp.cleanup()


def uses_cpu_layout(model: onnx.ModelProto) -> bool:
    """Whether ORT laid the graph's convolutions out in NCHWc blocks (the "all" level on the CPU EP)."""
    return any(node.domain == NCHWC_DOMAIN for node in model.graph.node)


def write_cpu_layout_probe(folder: Path, seed: int = 0) -> list[str]:
    """A one-convolution graph laid out by this machine's ORT, with its input and output.

    NCHWc blocks are as wide as the CPU's vectors (16 floats with AVX-512, 8 with AVX2): a graph
    laid out for one width computes garbage, silently, with another. The runtime runs the probe
    before it trusts a cpu export's graphs. Returns the written files, relative to `folder`.
    """

    rng = np.random.default_rng(seed)
    channels = 64  # a multiple of every NCHWc block width
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / 24
    bias = rng.standard_normal(channels, dtype=np.float32)
    x = rng.standard_normal((1, channels, 6, 6), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        "cpu_layout_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    probe = ort_offline_optimize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "all")
    if not uses_cpu_layout(probe):
        raise RuntimeError("ONNX Runtime did not lay the probe convolution out in NCHWc blocks")
    out = folder / CPU_LAYOUT_PROBE
    out.mkdir(parents=True, exist_ok=True)
    save_model(probe, out / "model.onnx")
    options = ort_session_options("basic", log_severity=WARNINGS)  # as the runtime loads it
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    np.savez(out / "io.npz", x=x, y=session.run(None, {"x": x})[0])
    return [f"{CPU_LAYOUT_PROBE}/model.onnx", f"{CPU_LAYOUT_PROBE}/io.npz"]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape inference (what TensorRT's parser wants); in-memory inference stops at 2 GB."""
    if is_large(model):
        return model

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
