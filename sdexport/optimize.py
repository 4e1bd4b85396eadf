"""Per-target graph optimization (DESIGN.md's target table)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx


def optimize_for_target(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """generic: the exported graph as is; cpu: ORT's offline optimizations saved with the model."""
    if target == "cpu":
        return ort_offline_optimize(model)
    return model


def ort_offline_optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Apply ONNX Runtime's extended CPU optimizations once, so loading need not pay them again.

    The extended level's fusions (FusedConv, FusedGemm, ...) run on the CPU EP; the layout
    transforms of the "all" level are left to load time because they are machine-specific.
    """
    import onnxruntime as ort

    from .export import save_model

    with tempfile.TemporaryDirectory(prefix="sdexport-opt-") as tmp:
        source, optimized = Path(tmp) / "in" / "model.onnx", Path(tmp) / "out" / "model.onnx"
        save_model(model, source)
        optimized.parent.mkdir()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        if model.ByteSize() > 2**31 - 1:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx_data"
            )
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(optimized), load_external_data=True)
