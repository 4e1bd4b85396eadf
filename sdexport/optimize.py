"""Per-target graph optimization (DESIGN.md's target table)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx


def optimize_for_target(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """generic: ORT's basic, provider-independent cleanup (constant folding, redundant nodes);
    cpu: ORT's extended CPU optimizations, saved with the model so loading need not pay them again.
    """
    level = {"generic": "basic", "cpu": "extended"}.get(target)
    return ort_offline_optimize(model, level) if level else model


def ort_offline_optimize(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """Run ONNX Runtime's graph optimizations of `level` once and keep the optimized graph.

    The basic level uses standard ops only; the extended level's fusions (FusedConv, ...) run on
    the CPU EP. The layout transforms of the "all" level are machine-specific: left to load time.
    """
    import onnxruntime as ort

    from .export import save_model

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
        if model.ByteSize() > 2**31 - 1:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx_data"
            )
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(optimized), load_external_data=True)
