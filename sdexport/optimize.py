"""Per-target graph work after tracing (DESIGN.md's target table), fp16 conversion included.

generic   ORT's basic, provider-independent cleanup; runs on every provider.
cpu       ORT's extended CPU fusions saved with the graph, so loading does not pay them again.
cuda      ORT's Stable Diffusion fusions (attention, GroupNorm, NhwcConv, BiasSplitGelu, packed
          QKV/KV, BiasAdd) on the fp32 graph, then fp16 with ORT's rules; CUDA EP only.
tensorrt  fp32, standard ops only, constant-folded and shape-inferred for TensorRT's own fusions;
          TensorRT builds fp16 engines itself (trt_fp16_enable).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from .export import is_large, save_model
from .precision import fp32_nodes, to_fp16

OFFLINE_LEVEL = {"generic": "basic", "cpu": "extended", "tensorrt": "basic"}
# ORT's optimizer model types for the components (onnxruntime.transformers.optimizer).
FUSION_MODEL_TYPE = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip"}


def finish_graph(component: str, model: onnx.ModelProto | Path, target: str, fp16: bool, upcast_attention: bool,
                 extra_fp32_nodes: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[str]]:
    """Fusions and offline optimization for one target on the fp32 graph, then fp16 conversion.

    The order matters: fusions need the fp32 patterns, and ORT's offline optimization on the CPU EP
    would bake CPU-only fp16 casts into a graph meant for every provider. `model` may be the path
    of a traced file, which lets the cuda fusions read its weights lazily. Returns the graph and
    the nodes an fp16 graph keeps in fp32 (the rules in precision.py plus `extra_fp32_nodes`).
    """
    if isinstance(model, Path):
        model = cuda_fusions_from_file(component, model, fp16) if target == "cuda" else \
            onnx.load(str(model), load_external_data=True)
    elif target == "cuda":
        model = cuda_fusions(component, model, fp16)
    # ORT 1.32 did not write the external initializers of a > 2 GB optimized model here: the
    # exported graph (already constant-folded by torch) is kept and ORT optimizes it at load time
    if target in OFFLINE_LEVEL and not is_large(model):
        model = ort_offline_optimize(model, OFFLINE_LEVEL[target])
    kept: list[str] = []
    if fp16:
        kept = list(dict.fromkeys([*fp32_nodes(component, model, upcast_attention), *extra_fp32_nodes]))
        model = to_fp16(component, model, kept)
    if target == "tensorrt":
        model = infer_shapes(model)
    return model, kept


def cuda_fusions(component: str, model: onnx.ModelProto, fp16: bool) -> onnx.ModelProto:
    """ORT's transformer-optimizer fusions for Stable Diffusion, as its optimize_pipeline applies them."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSION_MODEL_TYPE[component]
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
        model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
        optimization_options=options, use_gpu=True,
    )
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def cuda_fusions_from_file(component: str, path: Path, fp16: bool) -> onnx.ModelProto:
    """cuda_fusions with the weights left on disk until a fusion reads them.

    ORT's fusions copy the model for shape inference several times: with an SD 1.5 U-Net's 3.4 GB
    of weights in memory they ran out of 24 GB here. Tensors stay external (their locations are
    relative to the traced file, hence the working folder) and load once the graph is fused.
    """
    lazy = onnx.load(str(path), load_external_data=False)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a process-wide change: the exporter is single-threaded here
    try:
        fused = cuda_fusions(component, lazy, fp16)
    finally:
        os.chdir(cwd)
    onnx.load_external_data_for_model(fused, str(path.parent))
    return fused


def ort_offline_optimize(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """Run ONNX Runtime's graph optimizations of `level` once and keep the optimized graph.

    The basic level uses standard ops only; the extended level's fusions (FusedConv, ...) run on
    the CPU EP. The layout transforms of the "all" level are machine-specific: left to load time.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sdexport-opt-") as tmp:
        source, optimized = Path(tmp) / "in" / "model.onnx", Path(tmp) / "out" / "model.onnx"
        save_model(model, source)
        optimized.parent.mkdir()
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }[level]
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(optimized), load_external_data=True)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape inference (what TensorRT's parser wants); in-memory inference stops at 2 GB."""
    if is_large(model):
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
