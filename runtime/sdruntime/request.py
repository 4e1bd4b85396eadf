"""What a caller asks for: a `GenerationRequest`, in the argument names of diffusers' pipelines, unchecked.

The CLI, the server, the exporter's validator and `StableDiffusionPipeline.__call__` all build one;
`plan.resolve_plan` checks it once against an export and fills in every default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .conditioning import MicroConditioning
from .errors import InvalidArgument


class GenerationError(InvalidArgument):
    """A request the pipeline cannot honour; the message says what to change."""


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One call's arguments, as `StableDiffusionPipeline.__call__` takes them (its docstring says what each
    means); None leaves the choice to the export (sizes, scheduler) or to the family (steps, guidance, strength)."""

    prompt: str | Sequence[str] | None
    negative_prompt: str | Sequence[str] | None = None
    num_inference_steps: int | None = None  # None: the family's (plan.py, transformer_plan.py)
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int | Sequence[int] | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1  # per prompt: diffusers' num_images_per_prompt
    latents: np.ndarray | None = None
    eta: float = 0.0
    clip_skip: int | None = None
    image: str | Path | Image.Image | None = None  # an init image: image-to-image, or the image to inpaint
    mask_image: str | Path | Image.Image | None = None  # inpainting: white repaints, black keeps
    strength: float | None = None
    prompt_embeds: np.ndarray | None = None
    timestep_spacing: str | None = None
    scheduler_options: Mapping[str, object] | None = None
    micro: MicroConditioning = field(default_factory=MicroConditioning)  # SDXL's sizes, crops, aesthetic scores
    # ControlNet (control.py): one control image per ControlNet, the ControlNets by name (default: all exported),
    # each one's scale and active span of the steps (one value for all, or one each)
    control_image: object | Sequence[object] | None = None
    controlnet: str | Sequence[str] | None = None
    controlnet_conditioning_scale: float | Sequence[float] | None = None  # None: the pipeline's default
    guess_mode: bool = False
    control_guidance_start: float | Sequence[float] = 0.0
    control_guidance_end: float | Sequence[float] = 1.0
    # SD3 and Flux only (transformer_plan.py): the other text encoders' prompts (None: `prompt`, or `negative_prompt`),
    # T5's token count, custom sigmas, and Flux's true classifier-free guidance scale
    prompt_2: str | Sequence[str] | None = None
    prompt_3: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    negative_prompt_3: str | Sequence[str] | None = None
    max_sequence_length: int | None = None
    sigmas: Sequence[float] | None = None
    true_cfg_scale: float | None = None
    # LoRAs applied at run time (adapters.py), U-Net families only: each "FILE[:SCALE]", a path, or (FILE, SCALE)
    loras: Sequence[object] | None = None
    # textual-inversion embeddings (textual_inversion.py), U-Net families only: "[TOKEN=]FILE", a path or (TOKEN, FILE)
    embeddings: Sequence[object] | None = None
    # "full": the VAE's decoder; "tiny": the tiny decoder `sdexport convert --tiny-vae` exports (decoders.py)
    decoder: str = "full"
    # "compel" or "a1111": prompts and negative prompts read as weighted, long prompts (prompt_syntax.py), U-Net families
    # only; None: as diffusers reads them (truncated at 77 tokens, parentheses are text)
    prompt_syntax: str | None = None
    # with prompt_syntax, how weights below 1 work (prompt_weighting.py): "mask" (compel's default) or "remove";
    # None: "mask"
    downweight: str | None = None
