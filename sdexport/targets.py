"""What each `--target` means when a graph is exported: the exporter's half of the target table.

The runtime's half (which providers run it, the session levels, CUDA graphs) is sdruntime/targets.py;
both are keyed by its TARGETS.

target    checked on  attention  offline level  fused ops
generic   CPU EP      sdpa       basic          no
cpu       CPU EP      sdpa       all (NCHWc)    no
cuda      CUDA EP     plain      none           yes
tensorrt  CPU EP      sdpa       basic          no

"checked on": the provider convert runs the written graphs on to compare them with PyTorch. An fp16
cpu export is optimized offline at "extended" (an fp16 graph cannot follow the NCHWc layout).

generic   ORT's basic, provider-independent cleanup; runs on every provider.
cpu       ORT's "all" level saved with the graph: the extended CPU fusions and the NCHWc layout of
          the convolutions, so loading does not pay them again. The layout depends on the CPU's
          vector width: the export carries a probe that the runtime checks (cpu_layout_probe).
cuda      ORT's Stable Diffusion fusions (attention, GroupNorm, NhwcConv, BiasSplitGelu, packed
          QKV/KV, BiasAdd; for T5 its t5 fusions: Attention with RelativePositionBias, RMSNorm and
          SkipSimplifiedLayerNormalization; for SD3's and Flux's transformers the mmdit ones) on the
          fp32 graph, each kept only where its CUDA kernel accepts it (fusion_limits.py), then fp16
          with the fp32 rules of precision.py; CUDA EP only.
tensorrt  fp32, standard ops only, constant-folded and shape-inferred for TensorRT's own fusions;
          TensorRT builds fp16 engines itself (trt_fp16_enable).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdruntime.targets import CPU, CUDA


@dataclass(frozen=True)
class ExportTarget:
    """How the exporter makes one target's graphs (the table in this module's docstring)."""

    name: str
    check_provider: str  # the provider convert runs the written graphs on to compare them with PyTorch
    attention: str  # the attention form traced: "sdpa" or "plain"
    offline_level: str | None  # ORT's level applied once at export and saved; None: no offline pass
    fused_ops: bool  # its graphs hold ORT's Stable Diffusion fusions (contrib ops of the CUDA EP)
    # the U-Net's ControlNet residual inputs default to zeros and the text encoders' attention_mask to ones (an
    # initializer of the same name), so runners that feed only sample, timestep and encoder_hidden_states, or
    # input_ids (optimum) run them; TensorRT's parser takes an
    # input that has an initializer for a constant weight, so there the inputs are required and fed
    residual_defaults: bool = True


EXPORT_TARGETS: dict[str, ExportTarget] = {
    "generic": ExportTarget("generic", CPU, "sdpa", "basic", fused_ops=False),
    "cpu": ExportTarget("cpu", CPU, "sdpa", "all", fused_ops=False),
    "cuda": ExportTarget("cuda", CUDA, "plain", None, fused_ops=True),
    "tensorrt": ExportTarget("tensorrt", CPU, "sdpa", "basic", fused_ops=False, residual_defaults=False),
}
