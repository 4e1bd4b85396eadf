"""The exported folder's contract: the component IO table, the axis sizes and the manifest `sdexport.json`.

The exporter writes what this module describes and the runtime reads it back; neither repeats the
IO table. The manifest is read and written here only (`Manifest.from_json` / `to_json`,
`read_manifest` / `write_manifest`), as frozen dataclasses whose fields are its JSON keys; the JSON
Schema beside this file (manifest.schema.json) is tested against them. Torch-free: only the
standard library.

The targets' meaning is in targets.py (the runtime's half) and sdexport/targets.py (the exporter's).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

MANIFEST_NAME = "sdexport.json"
FORMAT_VERSION = 1
# Version 2 adds `cpu_layout_probe`: a runtime that reads version 1 only would load such graphs
# without checking that this CPU reads their layout, so those exports are marked 2 and it refuses them.
CPU_LAYOUT_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, CPU_LAYOUT_FORMAT_VERSION)
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

DTYPES = ("fp32", "fp16")
# text_encoder_2: SDXL, SD3 and Flux; text_encoder_3 (T5): SD3; unet: SD 1.x/2.x and SDXL; transformer: SD3 and Flux
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")
# they see the prompts and the negative prompts in one batch (Flux's transformer does not: its guidance is embedded)
GUIDED_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "controlnet")
# The transformer families: SD3/SD3.5 (MMDiT on [batch, C, h, w] latents) and Flux.1 (on 2x2-packed latents)
TRANSFORMER_FAMILIES = ("sd3", "flux")
# ControlNets are components named "controlnet/NAME", each in its own folder; their IO is the "controlnet" entry
CONTROLNET = "controlnet"
# A tiny decoder (TAESD's family, diffusers' AutoencoderTiny) beside the VAE, exported with `--tiny-vae`: the VAE
# decoder's IO, for previews and `decoder="tiny"`; not in COMPONENTS (it exists only where --tiny-vae adds it)
TINY_DECODER = "vae_decoder_tiny"


def component_kind(component: str) -> str:
    """The IO table's entry of a component: "controlnet" for "controlnet/NAME", else the name itself."""
    return component.split("/", 1)[0]


def controlnet_component(name: str) -> str:
    return f"{CONTROLNET}/{name}"


class ExportError(UserError):
    """A folder that is not a usable export; the message is one line that says what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. `dtype` "float" follows the export's dtype; others are fixed.

    Shape entries are symbolic names: the ones in DYNAMIC_AXES vary at run time unless the export
    is static; the others are resolved from the model's config when the manifest is written.
    """

    name: str
    dtype: str
    shape: tuple[str, ...]


@dataclass(frozen=True)
class ComponentIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


# ControlNet residuals: the latent size divided by 2, 4, ... (each U-Net down block halves it)
RESIDUAL_AXES = tuple(f"{axis}_{2**k}" for k in range(1, 6) for axis in ("height", "width"))
# The transformer families' sequences: T5's tokens (max_sequence_length), the transformer's text tokens
# (SD3: CLIP's 77 then T5's; Flux: T5's) and Flux's packed latent tokens (h/2 x w/2)
SEQUENCE_AXES = ("t5_sequence", "text_sequence", "packed_sequence")
DYNAMIC_AXES = ("batch", "sequence", "height", "width", "image_height", "image_width", *RESIDUAL_AXES, *SEQUENCE_AXES)

COMPONENT_IO: dict[str, ComponentIO] = {
    "text_encoder": ComponentIO(
        inputs=(TensorSpec("input_ids", "int64", ("batch", "max_length")),),
        outputs=(
            TensorSpec("last_hidden_state", "float", ("batch", "max_length", "text_hidden_size")),
            TensorSpec("pooler_output", "float", ("batch", "text_hidden_size")),
        ),
    ),
    # SDXL's CLIPTextModelWithProjection: the projected pooled output first, as optimum orders it
    # (diffusers takes output[0] as the pooled embedding when it is 2-D)
    "text_encoder_2": ComponentIO(
        inputs=(TensorSpec("input_ids", "int64", ("batch", "max_length_2")),),
        outputs=(
            TensorSpec("text_embeds", "float", ("batch", "text_embeds_dim")),
            TensorSpec("last_hidden_state", "float", ("batch", "max_length_2", "text_hidden_size_2")),
        ),
    ),
    "unet": ComponentIO(
        inputs=(
            # latent_channels, or 9 for inpainting: latents, mask and masked-image latents
            TensorSpec("sample", "float", ("batch", "unet_in_channels", "height", "width")),
            # float32 in every export: fp16 cannot hold timesteps such as 957.375
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float", ("batch", "sequence", "cross_attention_dim")),
        ),
        outputs=(TensorSpec("out_sample", "float", ("batch", "out_channels", "height", "width")),),
    ),
    "vae_decoder": ComponentIO(
        inputs=(TensorSpec("latent_sample", "float", ("batch", "latent_channels", "height", "width")),),
        outputs=(TensorSpec("sample", "float", ("batch", "image_channels", "image_height", "image_width")),),
    ),
    "vae_encoder": ComponentIO(
        inputs=(TensorSpec("sample", "float", ("batch", "image_channels", "image_height", "image_width")),),
        outputs=(TensorSpec("latent_parameters", "float", ("batch", "latent_parameters", "height", "width")),),
    ),
    TINY_DECODER: ComponentIO(
        inputs=(TensorSpec("latent_sample", "float", ("batch", "latent_channels", "height", "width")),),
        outputs=(TensorSpec("sample", "float", ("batch", "image_channels", "image_height", "image_width")),),
    ),
    # diffusers' ControlNetModel; the outputs (residuals, as many as the U-Net's) come from residual_specs
    CONTROLNET: ComponentIO(
        inputs=(
            TensorSpec("sample", "float", ("batch", "latent_channels", "height", "width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float", ("batch", "sequence", "cross_attention_dim")),
            # the control image: RGB in [0, 1], not normalized, as diffusers prepares it
            TensorSpec("controlnet_cond", "float", ("batch", "image_channels", "image_height", "image_width")),
            # one factor per residual: the conditioning scale, or guess mode's 0.1 ... 1.0 ramp times it
            TensorSpec("conditioning_scale", "float", ("residuals",)),
        ),
        outputs=(),
    ),
}

# What differs in the transformer families: SD3's first text encoder is CLIP-L with its projection (as SDXL's
# second is), T5 is text_encoder_3 in SD3 and text_encoder_2 in Flux; the transformers take optimum's names.
T5_ENCODER_IO = ComponentIO(
    inputs=(TensorSpec("input_ids", "int64", ("batch", "t5_sequence")),),
    outputs=(TensorSpec("last_hidden_state", "float", ("batch", "t5_sequence", "t5_hidden_size")),),
)
FAMILY_IO: dict[str, dict[str, ComponentIO]] = {
    "sd3": {
        "text_encoder": ComponentIO(
            inputs=(TensorSpec("input_ids", "int64", ("batch", "max_length")),),
            outputs=(
                TensorSpec("text_embeds", "float", ("batch", "text_embeds_dim_1")),
                TensorSpec("last_hidden_state", "float", ("batch", "max_length", "text_hidden_size")),
            ),
        ),
        "text_encoder_3": T5_ENCODER_IO,
        "transformer": ComponentIO(
            inputs=(
                TensorSpec("hidden_states", "float", ("batch", "latent_channels", "height", "width")),
                TensorSpec("encoder_hidden_states", "float", ("batch", "text_sequence", "joint_attention_dim")),
                TensorSpec("pooled_projections", "float", ("batch", "pooled_projection_dim")),
                # sigma x 1000, float32 in every export as the U-Net's timestep
                TensorSpec("timestep", "float32", ("batch",)),
            ),
            outputs=(TensorSpec("out_hidden_states", "float", ("batch", "out_channels", "height", "width")),),
        ),
    },
    "flux": {
        "text_encoder_2": T5_ENCODER_IO,
        "transformer": ComponentIO(
            inputs=(
                TensorSpec("hidden_states", "float", ("batch", "packed_sequence", "packed_channels")),
                TensorSpec("encoder_hidden_states", "float", ("batch", "text_sequence", "joint_attention_dim")),
                TensorSpec("pooled_projections", "float", ("batch", "pooled_projection_dim")),
                # sigma (the transformer multiplies by 1000 itself), float32 in every export
                TensorSpec("timestep", "float32", ("batch",)),
                # the rotary positions: zeros for the text tokens, (0, row, column) for the latent tokens
                TensorSpec("txt_ids", "float32", ("text_sequence", "position_axes")),
                TensorSpec("img_ids", "float32", ("packed_sequence", "position_axes")),
            ),
            outputs=(TensorSpec("out_hidden_states", "float", ("batch", "packed_sequence", "packed_out_channels")),),
        ),
    },
}
# An AutoencoderTiny's encoder (`--vae` with a tiny VAE, PipelineFacts.vae_tiny) gives the latents themselves:
# no distribution to sample, as diffusers' retrieve_latents reads its `latents`
TINY_VAE_ENCODER_IO = ComponentIO(
    inputs=COMPONENT_IO["vae_encoder"].inputs,
    outputs=(TensorSpec("latents", "float", ("batch", "latent_channels", "height", "width")),),
)
# Flux dev's distilled guidance, embedded like the timestep (guidance_embeds)
FLUX_GUIDANCE_INPUT = TensorSpec("guidance", "float32", ("batch",))

# The U-Net's ControlNet inputs and a ControlNet's outputs, named after diffusers' arguments and fields
UNET_RESIDUAL_INPUTS = ("down_block_additional_residual_{}", "mid_block_additional_residual")
CONTROLNET_OUTPUTS = ("down_block_res_sample_{}", "mid_block_res_sample")


def residual_specs(scales: tuple[int, ...], names: tuple[str, str]) -> tuple[TensorSpec, ...]:
    """The residuals a ControlNet adds to a U-Net: one per down-block output (the first conv's, each
    resnet's, each downsampler's), then the mid block's; `scales` is each one's latent size divisor."""

    def spatial(axis: str, scale: int) -> str:
        return axis if scale == 1 else f"{axis}_{scale}"

    return tuple(
        TensorSpec(
            name, "float", ("batch", f"residual_channels_{i}", spatial("height", scale), spatial("width", scale))
        )
        for i, (name, scale) in enumerate(zip(residual_names(len(scales), names), scales))
    )


def residual_names(count: int, names: tuple[str, str] = UNET_RESIDUAL_INPUTS) -> list[str]:
    """The names of `count` residuals, the down blocks' then the mid block's: the U-Net's inputs
    (UNET_RESIDUAL_INPUTS) or a ControlNet's outputs (CONTROLNET_OUTPUTS), which pair up in order."""
    return [names[0].format(i) for i in range(count - 1)] + [names[1]] if count else []


def resolve_dtype(spec_dtype: str, export_dtype: str) -> str:
    """The ONNX element type of a tensor: "float" follows the export, the others are fixed."""
    if spec_dtype == "float":
        return "float16" if export_dtype == "fp16" else "float32"
    return spec_dtype


def resolve_shape(shape: tuple[str, ...], dims: dict[str, int]) -> list[int | str]:
    """Replace the names that `dims` fixes by numbers; the rest stay symbolic."""
    return [dims.get(axis, axis) for axis in shape]


# The U-Net's optional inputs, in optimum's order (after sample, timestep, encoder_hidden_states):
# timestep_cond for LCM-distilled U-Nets (time_cond_proj_dim), text_embeds and time_ids for SDXL's
# "text_time" U-Nets (diffusers passes those two in added_cond_kwargs).
UNET_OPTIONAL_INPUTS: dict[str, TensorSpec] = {
    "timestep_cond": TensorSpec("timestep_cond", "float", ("batch", "time_cond_proj_dim")),
    "text_embeds": TensorSpec("text_embeds", "float", ("batch", "text_embeds_dim")),
    # float32 in every export, like timestep: its Sin/Cos embedding stays fp32, as diffusers computes it
    "time_ids": TensorSpec("time_ids", "float32", ("batch", "time_ids_dim")),
}

FINAL_LAYER_NORM = "text_encoder/final_layer_norm.npz"
# the CLIP text encoders' optional input (PipelineFacts.text_encoder_attention_mask): 1 attends, 0 masks a token out
TEXT_ENCODER_MASK = "attention_mask"
TEXT_ENCODER_HIDDEN = {
    "text_encoder": ("max_length", "text_hidden_size"),
    "text_encoder_2": ("max_length_2", "text_hidden_size_2"),
}


def component_io(
    component: str,
    num_hidden_states: int = 0,
    text_time: bool = False,
    timestep_cond: bool = False,
    residual_scales: tuple[int, ...] = (),
    family: str = "",
    guidance_embeds: bool = False,
    tiny_vae: bool = False,
    attention_mask: bool = False,
) -> ComponentIO:
    """The IO table's entry. A CLIP text encoder takes `attention_mask` after input_ids when `attention_mask`
    (TEXT_ENCODER_MASK), and also outputs `hidden_states.{i}` (optimum's names) for
    i < num_hidden_states: the embeddings and each layer's output (clip_skip; SDXL's penultimate
    layer). The U-Net takes `timestep_cond` when `timestep_cond` (LCM) and `text_embeds` and
    `time_ids` when `text_time` (SDXL), then a ControlNet's residuals when `residual_scales` says
    their sizes; a ControlNet takes SDXL's two too and outputs those residuals. The transformer families'
    entries are FAMILY_IO's; Flux dev's transformer takes `guidance` last (`guidance_embeds`). An AutoencoderTiny's
    encoder (`tiny_vae`) outputs its latents."""
    kind = component_kind(component)
    if kind == "vae_encoder" and tiny_vae:
        return TINY_VAE_ENCODER_IO
    io = FAMILY_IO.get(family, {}).get(kind) or COMPONENT_IO[kind]
    if kind == "transformer" and guidance_embeds:
        return ComponentIO(io.inputs + (FLUX_GUIDANCE_INPUT,), io.outputs)
    if io is T5_ENCODER_IO:
        return io
    if kind in TEXT_ENCODER_HIDDEN and (num_hidden_states or attention_mask):
        shape = ("batch", *TEXT_ENCODER_HIDDEN[kind])
        hidden = tuple(TensorSpec(f"hidden_states.{i}", "float", shape) for i in range(num_hidden_states))
        mask = (TensorSpec(TEXT_ENCODER_MASK, "int64", shape[:2]),) if attention_mask else ()
        return ComponentIO(io.inputs + mask, io.outputs + hidden)
    if kind == "unet":
        wanted = {"timestep_cond": timestep_cond, "text_embeds": text_time, "time_ids": text_time}
        extra = tuple(spec for name, spec in UNET_OPTIONAL_INPUTS.items() if wanted[name])
        return ComponentIO(io.inputs + extra + residual_specs(residual_scales, UNET_RESIDUAL_INPUTS), io.outputs)
    if kind == CONTROLNET:
        extra = tuple(UNET_OPTIONAL_INPUTS[name] for name in ("text_embeds", "time_ids") if text_time)
        return ComponentIO(io.inputs + extra, residual_specs(residual_scales, CONTROLNET_OUTPUTS))
    return io


def facts_io(facts: PipelineFacts, component: str) -> ComponentIO:
    """The IO of one component of an export with these pipeline facts."""
    hidden = facts.num_hidden_states_2 if component == "text_encoder_2" else facts.num_hidden_states
    return component_io(
        component,
        int(hidden or 0),
        text_time=facts.family == "sdxl",
        timestep_cond=facts.time_cond_proj_dim is not None,
        residual_scales=tuple(facts.unet_residual_scales or ()),
        family=facts.family,
        guidance_embeds=bool(facts.guidance_embeds),
        tiny_vae=bool(facts.vae_tiny),
        attention_mask=bool(facts.text_encoder_attention_mask),
    )


def describe_io(
    component: str, export_dtype: str, dims: dict[str, int], num_hidden_states: int = 0, io: ComponentIO | None = None
) -> tuple[tuple[TensorEntry, ...], tuple[TensorEntry, ...]]:
    """The manifest's `inputs` and `outputs` of one component (of `io`, else of the IO table's entry
    with `num_hidden_states` hidden states)."""
    io = io or component_io(component, num_hidden_states)

    def entry(spec: TensorSpec) -> TensorEntry:
        return TensorEntry(spec.name, resolve_dtype(spec.dtype, export_dtype), tuple(resolve_shape(spec.shape, dims)))

    return tuple(entry(s) for s in io.inputs), tuple(entry(s) for s in io.outputs)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- the manifest, as dataclasses whose fields are its JSON keys --------------------------------
# Fields listed in a class's OMITTED_WHEN_EMPTY are left out of the JSON when None or empty, as the
# exporter always did for them (older exports lack them); every other field is always written.


def _to_json(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    return value


class _JsonFields:
    OMITTED_WHEN_EMPTY: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in self.OMITTED_WHEN_EMPTY and (value is None or value == ()):
                continue
            out[name] = _to_json(value)
        return out


@dataclass(frozen=True)
class TensorEntry(_JsonFields):
    """One input or output as exported: its ONNX element type and shape (numbers where fixed)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, data: Mapping) -> TensorEntry:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class FileEntry(_JsonFields):
    """A file of the export, relative to its folder, with its size and sha256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, data: Mapping) -> FileEntry:
        return cls(data["path"], data["bytes"], data["sha256"])


def _files(items) -> tuple[FileEntry, ...]:
    return tuple(FileEntry.from_json(f) for f in items)


@dataclass(frozen=True)
class PipelineFacts(_JsonFields):
    """What the runtime needs to know of the source pipeline beside the graphs."""

    family: str
    prediction_type: str
    vae_scaling_factor: float
    vae_scale_factor: int
    latent_channels: int
    default_height: int
    default_width: int
    tokenizer_max_length: int
    pad_token_id: int
    scheduler_class: str
    upcast_attention: bool | None = None  # None: an export that predates the fact
    num_hidden_states: int | None = None  # the text encoder's hidden-state outputs (clip_skip); None: none
    # SDXL (family "sdxl"); None in SD 1.x/2.x exports and in exports that predate SDXL.
    # text_encoder_2 and tokenizer_2: the second text encoder (CLIPTextModelWithProjection) and its
    # tokenizer, which pads with "!" (id 0) where tokenizer 1 pads with <|endoftext|>
    num_hidden_states_2: int | None = None
    text_encoder_2_hidden_size: int | None = None
    text_encoder_2_projection_dim: int | None = None  # the pooled `text_embeds` width
    tokenizer_2_max_length: int | None = None
    tokenizer_2_pad_token_id: int | None = None
    force_zeros_for_empty_prompt: bool | None = None  # no negative prompt: zero negative embeddings
    requires_aesthetics_score: bool | None = None  # refiners: time_ids end with an aesthetic score
    addition_time_embed_dim: int | None = None  # the U-Net's embedding width per time id
    projection_class_embeddings_input_dim: int | None = None  # text_embeds_dim + time ids x addition_time_embed_dim
    # LCM-distilled U-Nets (SD or SDXL): the width of `timestep_cond`, the guidance-scale embedding
    time_cond_proj_dim: int | None = None
    vae_force_upcast: bool | None = None  # the VAE config's force_upcast (SDXL's VAE overflows in fp16)
    unet_in_channels: int | None = None  # the U-Net's `sample` channels; None: an export that predates the fact
    # the latent size divisor of each ControlNet residual the U-Net takes (down blocks', then the mid
    # block's), and its channels; None: a U-Net that takes none (an export that predates ControlNet)
    unet_residual_scales: tuple[int, ...] | None = None
    unet_residual_channels: tuple[int, ...] | None = None
    # whether those inputs default to zeros (not on the tensorrt target, nor in static exports: fed zeros there)
    unet_residual_defaults: bool | None = None
    # text_encoder and text_encoder_2 take an `attention_mask` (int64 [batch, tokens]; compel's downweighting masks
    # a fragment out with it); None: an export that predates it. text_encoder_mask_defaults: the input defaults to
    # ones (not on the tensorrt target, nor in static exports: fed ones there)
    text_encoder_attention_mask: bool | None = None
    text_encoder_mask_defaults: bool | None = None
    # The transformer families (SD3, Flux); None in U-Net exports. The VAE's latents are
    # (z - vae_shift_factor) * vae_scaling_factor; the transformer works on patch_size x patch_size
    # patches (Flux packs them into channels before the transformer); T5's hidden width is the
    # transformer's joint_attention_dim; max_sequence_length is diffusers' default T5 token count
    # (SD3 256, Flux 512); guidance_embeds: Flux dev's embedded guidance.
    vae_shift_factor: float | None = None
    patch_size: int | None = None
    joint_attention_dim: int | None = None
    pooled_projection_dim: int | None = None
    max_sequence_length: int | None = None
    t5_max_length: int | None = None  # the T5 tokenizer's model_max_length: the longest max_sequence_length
    t5_pad_token_id: int | None = None
    guidance_embeds: bool | None = None
    # Tiny VAEs (diffusers' AutoencoderTiny, decoders.py): vae_tiny says the VAE itself is one (`--vae` with a tiny
    # VAE: its encoder outputs latents, not a distribution); tiny_vae_scaling_factor is the scaling factor of the
    # tiny decoder `--tiny-vae` exports beside the VAE (vae_decoder_tiny). None: no such VAE.
    vae_tiny: bool | None = None
    tiny_vae_scaling_factor: float | None = None

    OMITTED_WHEN_EMPTY = (
        "upcast_attention",
        "num_hidden_states",
        "num_hidden_states_2",
        "text_encoder_2_hidden_size",
        "text_encoder_2_projection_dim",
        "tokenizer_2_max_length",
        "tokenizer_2_pad_token_id",
        "force_zeros_for_empty_prompt",
        "requires_aesthetics_score",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "time_cond_proj_dim",
        "vae_force_upcast",
        "unet_in_channels",
        "unet_residual_scales",
        "unet_residual_channels",
        "unet_residual_defaults",
        "text_encoder_attention_mask",
        "text_encoder_mask_defaults",
        "vae_shift_factor",
        "patch_size",
        "joint_attention_dim",
        "pooled_projection_dim",
        "max_sequence_length",
        "t5_max_length",
        "t5_pad_token_id",
        "guidance_embeds",
        "vae_tiny",
        "tiny_vae_scaling_factor",
    )

    @property
    def transformer_family(self) -> bool:
        return self.family in TRANSFORMER_FAMILIES

    @property
    def unet_channels(self) -> int:
        """The U-Net's input channels: 9 for an inpainting U-Net, else the latent channels."""
        return int(self.unet_in_channels or self.latent_channels)

    @property
    def num_time_ids(self) -> int | None:
        """How many numbers `time_ids` holds per image: 6 (original size, crop, target size), or 5
        (original size, crop, aesthetic score) with requires_aesthetics_score."""
        if not self.addition_time_embed_dim or self.projection_class_embeddings_input_dim is None:
            return None
        pooled = int(self.text_encoder_2_projection_dim or 0)
        return (int(self.projection_class_embeddings_input_dim) - pooled) // int(self.addition_time_embed_dim)

    @classmethod
    def from_json(cls, data: Mapping) -> PipelineFacts:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for name in ("unet_residual_scales", "unet_residual_channels"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass(frozen=True)
class StaticShapes(_JsonFields):
    """The images per call and the pixel size a static export is fixed at."""

    batch_size: int
    height: int
    width: int

    @classmethod
    def from_json(cls, data: Mapping | None) -> StaticShapes | None:
        return None if data is None else cls(data["batch_size"], data["height"], data["width"])


@dataclass(frozen=True)
class LoraEntry(_JsonFields):
    path: str
    scale: float

    @classmethod
    def from_json(cls, data: Mapping) -> LoraEntry:
        return cls(data["path"], data["scale"])


@dataclass(frozen=True)
class ExportSource(_JsonFields):
    """What the export was made from: a folder, a preset, a single file or a hub id, and the LoRAs fused in."""

    kind: str
    name: str
    loras: tuple[LoraEntry, ...] = ()
    vae: str | None = None  # "pipeline", or the VAE folder (or preset) `--vae` put in its place; None: older exports
    tiny_vae: str | None = None  # the AutoencoderTiny folder (or preset) `--tiny-vae` exported as vae_decoder_tiny

    OMITTED_WHEN_EMPTY = ("vae", "tiny_vae")

    @classmethod
    def from_json(cls, data: Mapping) -> ExportSource:
        loras = tuple(LoraEntry.from_json(x) for x in data.get("loras", ()))
        return cls(data["kind"], data["name"], loras, data.get("vae"), data.get("tiny_vae"))


@dataclass(frozen=True)
class LayoutProbe(_JsonFields):
    """The cpu target's NCHWc layout probe: a laid-out convolution and its input and output (io.npz)."""

    path: str
    files: tuple[FileEntry, ...]

    @classmethod
    def from_json(cls, data: Mapping | None) -> LayoutProbe | None:
        return None if data is None else cls(data["path"], _files(data["files"]))


@dataclass(frozen=True)
class QuantizationEntry(_JsonFields):
    """How an int8 export quantized a component (sdexport/quantize.py): "weights" (dynamic: int8 weights,
    activations quantized at run time) or "full" (QDQ: int8 weights, activations calibrated on prompts)."""

    scheme: str
    weight_type: str
    activation_type: str  # "dynamic uint8" for the weights scheme
    per_channel: bool
    op_types: tuple[str, ...]
    excluded_nodes: int  # nodes kept in float
    calibration_prompts: int  # 0 for the weights scheme

    @classmethod
    def from_json(cls, data: Mapping | None) -> QuantizationEntry | None:
        if data is None:
            return None
        return cls(
            data["scheme"],
            data["weight_type"],
            data["activation_type"],
            bool(data["per_channel"]),
            tuple(data["op_types"]),
            int(data["excluded_nodes"]),
            int(data["calibration_prompts"]),
        )


@dataclass(frozen=True)
class ComponentEntry(_JsonFields):
    """One exported component: its graph, its files, its dtype and the target-related facts, its IO."""

    path: str
    files: tuple[FileEntry, ...]
    dtype: str
    attention: str
    fp32_nodes: tuple[str, ...] = ()  # fp16 exports: the nodes kept in fp32
    export_max_abs_diff: float | None = None  # vs PyTorch fp32 right after export; None: not compared
    export_relative_l2: float | None = None
    inputs: tuple[TensorEntry, ...] = ()
    outputs: tuple[TensorEntry, ...] = ()
    notes: tuple[str, ...] = ()  # what validation changed, e.g. nodes or the whole component kept in fp32
    # U-Net families' unet and text encoders: PyTorch weight name -> its place in the graph (weight_placement.py)
    weights: Mapping[str, Mapping[str, Any]] | None = field(default=None, hash=False)
    quantization: QuantizationEntry | None = None  # int8 exports (`sdexport convert --quantize`); no weight map then

    OMITTED_WHEN_EMPTY = ("notes", "weights", "quantization")

    @classmethod
    def from_json(cls, data: Mapping) -> ComponentEntry:
        return cls(
            path=data["path"],
            files=_files(data["files"]),
            dtype=data["dtype"],
            attention=data["attention"],
            fp32_nodes=tuple(data.get("fp32_nodes") or ()),
            export_max_abs_diff=data.get("export_max_abs_diff"),
            export_relative_l2=data.get("export_relative_l2"),
            inputs=tuple(TensorEntry.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorEntry.from_json(t) for t in data["outputs"]),
            notes=tuple(data.get("notes", ())),
            weights=data.get("weights"),
            quantization=QuantizationEntry.from_json(data.get("quantization")),
        )

    def input(self, name: str) -> TensorEntry:
        return next(i for i in self.inputs if i.name == name)


def file_entry(folder: Path, relative: str) -> FileEntry:
    path = folder / relative
    return FileEntry(relative, path.stat().st_size, sha256_file(path))


# The files beside the graphs that change what the runtime computes: hashed into `config_files`.
CONFIG_FILES = (
    "tokenizer/tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)
SDXL_CONFIG_FILES = ("tokenizer_2/tokenizer.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt")
T5_CONFIG_FILES = ("tokenizer_3/tokenizer.json",)  # SD3's T5 tokenizer (Flux's is tokenizer_2's)


def config_file_entries(folder: Path) -> tuple[FileEntry, ...]:
    """The config files the export has (an SDXL refiner has no tokenizer/, SD exports no tokenizer_2/)."""
    names = CONFIG_FILES + SDXL_CONFIG_FILES + T5_CONFIG_FILES
    return tuple(file_entry(folder, name) for name in names if (folder / name).is_file())


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Manifest(_JsonFields):
    """A parsed `sdexport.json` and the folder it describes (`folder` is not written)."""

    format_version: int
    created_by: Mapping[str, str | None]
    source: ExportSource
    dtype: str
    target: str
    opset: int
    pipeline: PipelineFacts
    size_multiple: int
    static: StaticShapes | None
    components: Mapping[str, ComponentEntry]
    cpu_layout_probe: LayoutProbe | None = None  # cpu exports laid out in NCHWc blocks (format version 2)
    config_files: tuple[FileEntry, ...] = ()  # the tokenizer and scheduler files (absent in older exports)
    folder: Path = field(default=Path("."), compare=False)

    OMITTED_WHEN_EMPTY = ("cpu_layout_probe", "config_files")

    @classmethod
    def from_json(cls, data: Mapping, folder: Path = Path(".")) -> Manifest:
        return cls(
            format_version=data["format_version"],
            created_by=dict(data.get("created_by", {})),
            source=ExportSource.from_json(data.get("source", {"kind": "folder", "name": ""})),
            dtype=data["dtype"],
            target=data["target"],
            opset=data.get("opset"),
            pipeline=PipelineFacts.from_json(data["pipeline"]),
            size_multiple=int(data["size_multiple"]),
            static=StaticShapes.from_json(data.get("static")),
            components={name: ComponentEntry.from_json(entry) for name, entry in data["components"].items()},
            cpu_layout_probe=LayoutProbe.from_json(data.get("cpu_layout_probe")),
            config_files=_files(data.get("config_files", ())),
            folder=Path(folder),
        )

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        del out["folder"]
        return out

    def has(self, component: str) -> bool:
        return component in self.components

    def model_path(self, component: str) -> Path:
        return self.folder / self.components[component].path

    def input_spec(self, component: str, name: str) -> TensorEntry:
        return self.components[component].input(name)

    def axis_sizes(self, component: str, images: int, height: int, width: int, guidance: bool = True) -> dict[str, int]:
        return axis_sizes(self.pipeline, component, images, height, width, guidance)

    def verify(self, components: list[str] | None = None, cache: HashCache | None = None) -> None:
        """Check that every file a component, the layout probe and the configs name exists and still has its recorded sha256."""
        entries = [e for c in components or list(self.components) for e in self.components[c].files]
        if self.cpu_layout_probe:
            entries += self.cpu_layout_probe.files
        entries += self.config_files
        for entry in entries:
            path = self.folder / entry.path
            if not path.is_file():
                raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
            if path.stat().st_size != entry.bytes:
                raise ExportError(
                    f"{path} has {path.stat().st_size} bytes but the manifest records "
                    f"{entry.bytes}: the file is corrupted; run `sdexport convert` again"
                )
            digest = cache.sha256(path) if cache else sha256_file(path)
            if digest != entry.sha256:
                raise ExportError(
                    f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is "
                    "corrupted or was changed; run `sdexport convert` again"
                )


def axis_sizes(
    facts: PipelineFacts,
    component: str,
    images: int,
    height: int,
    width: int,
    guidance: bool = True,
    max_sequence_length: int | None = None,
) -> dict[str, int]:
    """The sizes of the IO table's dynamic axes for `images` images of height x width pixels.

    Latents are the pixels divided by the VAE factor; with guidance the text encoder and the U-Net
    see the negative and the positive prompts in one batch, twice the images (Flux's transformer
    does not: its guidance is embedded). T5 reads `max_sequence_length` tokens (default: the export's).
    """
    factor = int(facts.vae_scale_factor)
    doubled = guidance and component_kind(component) in GUIDED_COMPONENTS
    if facts.family == "flux" and component == "transformer":
        doubled = False
    sizes = {
        "batch": 2 * images if doubled else images,
        "sequence": int(facts.tokenizer_max_length),
        "height": height // factor,
        "width": width // factor,
        "image_height": height,
        "image_width": width,
    }
    for axis in RESIDUAL_AXES:  # "height_2": the latent height halved, as a stride-2 convolution halves it
        name, divisor = axis.rsplit("_", 1)
        sizes[axis] = -(-sizes[name] // int(divisor))
    if facts.transformer_family:
        t5 = int(max_sequence_length or facts.max_sequence_length or 0)
        patch = int(facts.patch_size or 1)
        sizes["t5_sequence"] = t5
        sizes["text_sequence"] = t5 + (int(facts.tokenizer_max_length) if facts.family == "sd3" else 0)
        sizes["packed_sequence"] = (sizes["height"] // patch) * (sizes["width"] // patch)
    return sizes


def latent_shape(facts: PipelineFacts, images: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The latents of `images` images of height x width pixels, before guidance doubles them."""
    sizes = axis_sizes(facts, "unet", images, height, width, guidance=False)
    return (sizes["batch"], int(facts.latent_channels), sizes["height"], sizes["width"])


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write `sdexport.json`: the one place the manifest is written."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and sanity-check `sdexport.json`; one clear line when the folder is not an export."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder: pass the folder written by `sdexport convert`")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{folder} is not an sdexport export ({MANIFEST_NAME} is missing): "
            "create one with `sdexport convert SOURCE -o OUT`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): run `sdexport convert` again") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in READABLE_FORMAT_VERSIONS:
        raise ExportError(
            f"{path} has format version {version!r}, this runtime reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: "
            "re-export with a matching sdexport or upgrade sdexport-runtime"
        )
    missing = [k for k in ("dtype", "target", "pipeline", "size_multiple", "components") if k not in data]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}: run `sdexport convert` again")
    try:
        return Manifest.from_json(data, folder)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise ExportError(f"{path} {what}: run `sdexport convert` again") from e


class HashCache:
    """sha256 of large files, remembered by path, size and modification time.

    Hashing a full-size U-Net takes seconds; a file whose size and mtime are unchanged is not
    hashed again. The cache lives in the user's cache folder, never inside the export.
    """

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self.path = path or base / "sdruntime" / "sha256.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        cached = self.entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = sha256_file(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._save()
        return digest

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
