"""Modules too large to hold in fp32 (T5-XXL: 4.7B parameters, 19 GB), exported without ever holding
their weights: the module lives on PyTorch's meta device with a `WeightSource` beside it, which gives
one weight at a time, and every step that needs weights reads them from there, one at a time.

- Tracing: torch.onnx.export records a meta module's graph as it records any other (the ops run on
  shapes only); the weights become named graph inputs, which trace.attach_weights turns into
  initializers, each read from the source and written to model.onnx_data.
- PyTorch's reference outputs: `materialized` gives each leaf module its weights from the source
  just before it runs and takes them back after, so that a forward pass holds one layer's weights.
- Sources: `SeededT5Weights` draws a preset's random weights, each tensor from its own seed and with
  T5's own initialization scales (so the weights are the same whichever order they are read in), and
  `SafetensorsWeights` reads a saved model's tensors lazily from its .safetensors files.

ONNX Runtime's offline optimization loads a whole model, so streamed graphs skip it (ORT optimizes
them when a session loads them), and their check runs with ORT's optimizations off, so that the fp16
weights are not folded into fp32 copies (the CPU EP computes fp16 MatMuls in fp32).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path

import torch

STREAM_BYTES = 8 << 30  # fp32 weights past this (T5-XXL's 19 GB) are streamed, not held


def source_of(module: torch.nn.Module) -> WeightSource | None:
    """The weight source of a streamed module (None: an ordinary module that holds its weights)."""
    return getattr(module, "sdexport_weights", None)


def is_streamed(module: torch.nn.Module) -> bool:
    return source_of(module) is not None


class WeightSource:
    """One weight at a time, as float32 on the CPU, by the module's own state_dict names."""

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, module: torch.nn.Module) -> torch.nn.Module:
        """Mark `module` (on the meta device) as streamed from this source."""
        module.sdexport_weights = self
        return module


class SeededT5Weights(WeightSource):
    """A T5 encoder's random weights: N(0, std) with T5PreTrainedModel._init_weights' scales (factor 1), each
    tensor drawn from `seed` and its name, so that the same name always gives the same tensor."""

    def __init__(self, config, seed: int):
        self.config, self.seed = config, seed
        self.shapes = shapes_of(config)

    def std(self, name: str) -> float | None:
        """The initialization scale of a weight (None: a norm's weight, ones)."""
        c = self.config
        rules = {
            "shared.weight": 1.0,
            "SelfAttention.q.weight": (c.d_model * c.d_kv) ** -0.5,
            "SelfAttention.k.weight": c.d_model**-0.5,
            "SelfAttention.v.weight": c.d_model**-0.5,
            "SelfAttention.o.weight": (c.num_heads * c.d_kv) ** -0.5,
            "relative_attention_bias.weight": c.d_model**-0.5,
            "DenseReluDense.wi_0.weight": c.d_model**-0.5,
            "DenseReluDense.wi_1.weight": c.d_model**-0.5,
            "DenseReluDense.wi.weight": c.d_model**-0.5,
            "DenseReluDense.wo.weight": c.d_ff**-0.5,
        }
        if name.endswith("layer_norm.weight"):
            return None
        found = [std for suffix, std in rules.items() if name.endswith(suffix)]
        if not found:
            raise KeyError(f"no T5 initialization rule for the weight {name}")
        return found[0]

    def tensor(self, name: str) -> torch.Tensor:
        name = "shared.weight" if name == "encoder.embed_tokens.weight" else name  # tied, as in T5EncoderModel
        shape = self.shapes[name]
        std = self.std(name)
        if std is None:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator) * std


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """The weight shapes of a T5EncoderModel with this config, from a meta instance."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class SafetensorsWeights(WeightSource):
    """A saved model's tensors read lazily from its .safetensors files (one, or several with an index)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            [single] = sorted(folder.glob("*.safetensors"))
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        self._open = safe_open

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.files and name == "encoder.embed_tokens.weight":
            name = "shared.weight"
        with self._open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name).float()


@contextlib.contextmanager
def materialized(module: torch.nn.Module, source: WeightSource):
    """Run `module` (on the meta device) with each leaf module's weights read from `source` just before it
    runs and put back on the meta device after: a forward pass holds one layer's weights at a time."""
    handles = []
    for prefix, leaf in module.named_modules():
        names = [name for name, _ in leaf.named_parameters(recurse=False)]
        if not names:
            continue

        def load(leaf, args, prefix=prefix, names=names):
            for name in names:
                weight = source.tensor(f"{prefix}.{name}" if prefix else name)
                setattr(leaf, name, torch.nn.Parameter(weight, requires_grad=False))

        def drop(leaf, args, output, names=names):
            for name in names:
                setattr(leaf, name, torch.nn.Parameter(getattr(leaf, name).to("meta"), requires_grad=False))

        handles += [leaf.register_forward_pre_hook(load), leaf.register_forward_hook(drop)]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
