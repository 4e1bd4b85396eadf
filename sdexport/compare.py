"""The comparison of a written graph with PyTorch: the reference outputs of random inputs, kept so
that the weights can be freed, and ONNX Runtime's outputs for the same inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sdruntime.ort_options import ort_session_options

from .chunked_run import chunked_outputs
from .specs import example_inputs, spec_of, wrap
from .streaming import materialized, source_of


def torch_outputs(component: str, pipe, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """PyTorch's outputs; a streamed module (streaming.py) runs with one layer's weights read in at a time."""
    module = wrap(component, pipe)
    inner = spec_of(component).module_of(pipe, component)
    source = source_of(inner)
    with torch.no_grad(), materialized(inner, source) if source else contextlib.nullcontext():
        out = module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in out]


def ort_outputs(
    model_path: Path, inputs: dict[str, np.ndarray], provider: str = "CPUExecutionProvider"
) -> list[np.ndarray]:
    # basic: optimized when exported; one run: the CPU kernels' packed copies of the weights (doubling
    # an SDXL U-Net's) would not pay off
    options = ort_session_options("basic", prepacking=False)
    session = ort.InferenceSession(str(model_path), options, providers=[provider])
    feed = {}
    # the inputs with defaults (the U-Net's ControlNet residuals) too, when the reference has them
    for spec in (*session.get_inputs(), *session.get_overridable_initializers()):
        if spec.name not in inputs:
            continue
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


def compare_outputs(
    reference: Reference, model_path: Path, provider: str = "CPUExecutionProvider", chunked: bool = False
) -> dict[str, float]:
    """ONNX Runtime's outputs for the reference's inputs against PyTorch's; `chunked`: run in pieces of a few
    layers' weights (chunked_run.py), for a streamed graph too large for one session here."""
    expected = reference.outputs
    if chunked:
        got = [o.astype(np.float32) for o in chunked_outputs(model_path, reference.inputs, provider)]
    else:
        got = ort_outputs(model_path, reference.inputs, provider)
    max_abs = max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got))
    rel_l2 = max(float(np.linalg.norm(e - g) / max(np.linalg.norm(e), 1e-12)) for e, g in zip(expected, got))
    finite = all(np.isfinite(g).all() for g in got)
    return {"max_abs_diff": max_abs, "relative_l2": rel_l2, "finite": finite}
