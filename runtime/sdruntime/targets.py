"""What each `--target` means when an export runs: the runtime's half of the target table.

The exporter's half (the attention form traced, the offline optimization, the fused ops, the provider
convert checks on) is sdexport/targets.py; both are keyed by TARGETS, the names the manifest accepts.

target    providers that run it    CPU EP load level  CUDA graphs
generic   any (OpenVINO EP too)    per component      yes
cpu       CPU EP                   basic              no
cuda      CUDA EP                  per component      yes
tensorrt  TensorRT, CUDA, CPU,     per component      yes
          OpenVINO EPs

The load level is the session's optimization level on the CPU EP for graphs laid out at export (GPU
providers load at "all"); "per component" is "all" for the VAE and "basic" for the U-Net and text
encoder (session.default_level). A cpu export's graphs were optimized at "all" when exported, so
"basic" loads them as they are.

The OpenVINO EP runs generic graphs (pictures within 1e-5 of the CPU EP's latents on tiny-sd, each graph
placed whole on it) and the tensorrt target's standard-op graphs; it refuses a cpu export's graphs ("OpenVINO
does not support ... com.microsoft.nchwc.Conv", onnxruntime-openvino 1.24.1), and a cuda export's are CUDA-only.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"


@dataclass(frozen=True)
class RuntimeTarget:
    """How the runtime runs one target's graphs (the table in this module's docstring)."""

    name: str
    providers: frozenset[str] | None  # the ORT providers that may run its graphs; None: any
    load_level: str | None  # the CPU EP's session level for graphs laid out at export; None: per component
    cuda_graphs: bool  # a static U-Net on the CUDA EP may be captured in a CUDA graph


RUNTIME_TARGETS: dict[str, RuntimeTarget] = {
    "generic": RuntimeTarget("generic", None, None, cuda_graphs=True),
    "cpu": RuntimeTarget("cpu", frozenset({CPU}), "basic", cuda_graphs=False),
    "cuda": RuntimeTarget("cuda", frozenset({CUDA}), None, cuda_graphs=True),
    "tensorrt": RuntimeTarget("tensorrt", frozenset({TENSORRT, CUDA, CPU, OPENVINO}), None, cuda_graphs=True),
}
TARGETS = tuple(RUNTIME_TARGETS)
