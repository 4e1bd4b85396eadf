"""`--lora FILE[:SCALE]`: fuse LoRAs (diffusers/peft or kohya-ss format) into the weights before export.

diffusers reads both formats (`load_lora_weights`), fuses with `fuse_lora(lora_scale=...)`, and
`unload_lora_weights()` then leaves plain modules with the fused weights, so the exported graphs
carry no LoRA branches. Each LoRA is loaded, fused and unloaded in turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffusers.utils import logging as diffusers_logging
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from sdruntime.lora import LoraError, parse_lora_spec

from .errors import SdexportError, first_line
from .specs import text_encoders

# the key endings of a LoRA's "down" matrix, one per adapted module, in the formats diffusers reads
DOWN_KEYS = (
    ".lora_down.weight",
    ".lora_A.weight",
    ".lora.down.weight",
    "_lora.down.weight",
    ".lora_linear_layer.down.weight",
)
HINT = "pass a LoRA for Stable Diffusion 1.x/2.x or SDXL as .safetensors, in diffusers or kohya-ss format"
FAMILY_HINT = "is it made for another model family (SDXL, SD 2.x vs 1.x)?"


def parse_lora(spec: str | Sequence) -> tuple[Path, float]:
    """ "FILE[:SCALE]" (scale 1.0 by default) or (FILE, SCALE) -> (path, scale), read as the runtime reads it."""
    try:
        return parse_lora_spec(spec)
    except LoraError as e:
        raise SdexportError(str(e)) from e


def count_lora_layers(path: Path) -> int:
    """How many modules the LoRA adapts, from the key names alone; refuses files that hold no LoRA."""

    if not path.is_file():
        raise SdexportError(f"LoRA {path} not found: check the path given to --lora")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise SdexportError(f"LoRA {path} is not a safetensors file ({reason}): {HINT}") from e
    layers = sum(1 for key in keys if key.endswith(DOWN_KEYS))
    if not layers:
        found = f"found e.g. '{keys[0]}'" if keys else "it is empty"
        raise SdexportError(f"LoRA {path} has no LoRA weights (no lora_down or lora_A keys; {found}): {HINT}")
    return layers


def check_loras(specs: Iterable) -> list[tuple[Path, float]]:
    """Parse and check every --lora before anything is loaded: [(path, scale)]."""
    loras = [parse_lora(spec) for spec in specs]
    if loras:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise SdexportError(
                "--lora needs the peft package, which diffusers fuses LoRAs with: pip install peft"
            ) from e
    for path, _ in loras:
        count_lora_layers(path)
    return loras


def fuse_loras(pipe, loras: Sequence[tuple[Path, float]], log=print) -> list[dict]:
    """Fuse each LoRA into the U-Net and the text encoders (SDXL's two as well); returns the manifest's
    source.loras."""

    fused = []
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # unmatched keys are counted below, not warned about
    try:
        for i, (path, scale) in enumerate(loras):
            expected = count_lora_layers(path)
            adapter = f"sdexport_lora_{i}"
            try:
                pipe.load_lora_weights(
                    str(path.parent),
                    weight_name=path.name,
                    adapter_name=adapter,
                    use_safetensors=True,
                    local_files_only=True,
                )
            except (ValueError, RuntimeError, KeyError, OSError) as e:
                raise SdexportError(f"LoRA {path} {_why_it_does_not_fit(e, expected)}: {FAMILY_HINT}") from e
            matched = _adapted_modules(pipe, adapter)
            if matched < expected:
                raise SdexportError(
                    f"LoRA {path}: {expected - matched} of its {expected} layers match no module of "
                    f"this model: {FAMILY_HINT}"
                )
            pipe.fuse_lora(components=["unet", *text_encoders(pipe)], lora_scale=scale, adapter_names=[adapter])
            pipe.unload_lora_weights()
            log(f"fused LoRA {path.name} ({matched} layers) at scale {scale:g}")
            fused.append({"path": str(path.resolve()), "scale": scale})
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return fused


def _why_it_does_not_fit(error: BaseException, expected: int) -> str:
    text = str(error)
    if "Target modules" in text:  # peft: not one module name matched
        return f"matches no module of this model (none of its {expected} layers)"
    mismatch = re.search(
        r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)",
        text,
    )
    if mismatch:
        name, theirs, ours = mismatch.groups()
        return f"does not fit this model: its {name} is {theirs}, this model's is {ours}"
    return f"could not be applied to this model ({first_line(error)})"


def _adapted_modules(pipe, adapter: str) -> int:
    return sum(
        1
        for component in (pipe.unet, *text_encoders(pipe).values())
        for module in component.modules()
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})
    )
