"""What each component is, in one place: one `ComponentSpec` per entry of the IO table in
`sdruntime.manifest` (the PyTorch module it is traced from, its wrapper with the IO table's fixed
signature, its example inputs, its fusion model type, its fp32 rules, its config file), so that a
new component is one more spec. The pipeline-wide sizes the specs read (model_dims, size_multiple)
are here too."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from sdruntime.manifest import (
    COMPONENTS,
    CONTROLNET,
    DYNAMIC_AXES,
    FINAL_LAYER_NORM,
    TEXT_ENCODER_MASK,
    TINY_DECODER,
    UNET_OPTIONAL_INPUTS,
    component_io,
    component_kind,
)

ATTENTION_FORMS = ("sdpa", "plain")


class TextEncoder(torch.nn.Module):
    """CLIP: the last hidden state, the pooled output and every hidden state; `attention_mask` (U-Net families'
    exports) masks tokens out as transformers applies it, added to CLIP's causal mask."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask=None):
        out = self.text_encoder(input_ids, attention_mask, output_hidden_states=True, return_dict=True)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


class TextEncoderWithProjection(torch.nn.Module):
    """SDXL's second text encoder: the projected pooled output, the last hidden state and every hidden state."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask=None):
        out = self.text_encoder(input_ids, attention_mask, output_hidden_states=True, return_dict=True)
        return (out.text_embeds, out.last_hidden_state, *out.hidden_states)


class T5Encoder(torch.nn.Module):
    """SD3's and Flux's T5 encoder: the last hidden state (diffusers reads nothing else)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=True).last_hidden_state


def text_encoder_wrapper(module) -> torch.nn.Module:
    """The wrapper with the IO table's outputs for a text encoder, by its class: CLIP with its projection
    (SDXL's second, SD3's first two), T5 (SD3's third, Flux's second), else CLIP."""
    name = type(module).__name__
    if name == "CLIPTextModelWithProjection":
        return TextEncoderWithProjection(module)
    if name.startswith("T5"):
        return T5Encoder(module)
    return TextEncoder(module)


class SD3Transformer(torch.nn.Module):
    """SD3's MMDiT with optimum's inputs: latents [batch, C, h, w], the joint text embeddings, the pooled
    projections and the timestep (sigma x 1000)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


class FluxTransformer(torch.nn.Module):
    """Flux's transformer with optimum's inputs: packed latents [batch, h/2 x w/2, 4C], T5's embeddings, CLIP's
    pooled output, the timestep (sigma: the transformer scales it), the rotary positions and, for dev, the
    guidance scale (guidance_embeds)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, txt_ids, img_ids, *guidance):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance[0] if guidance else None,
            return_dict=False,
        )[0]


def traceable_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb for Flux (use_real, pairs along the last axis) without the reshape to
    (..., -1, 2), which the tracer records with the traced sequence length as a constant: the even and
    odd channels are sliced instead. The same arithmetic, so the same numbers."""
    cos, sin = freqs_cis
    if sequence_dim == 2:
        cos, sin = cos[None, None, :, :], sin[None, None, :, :]
    else:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x[..., 0::2], x[..., 1::2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def traceable_rms_norm(x, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm in ops opset 17 has (torch's ONNX exporter has no aten::rms_norm below
    opset 23): x / sqrt(mean(x^2) + eps) x weight over the normalized axes, as PyTorch computes it."""
    axes = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    out = x * torch.rsqrt(x.pow(2).mean(dim=axes, keepdim=True) + eps)
    return out * weight if weight is not None else out


@contextlib.contextmanager
def tracing_patches(component: str, pipe):
    """What tracing a component needs swapped in: torch.nn.RMSNorm's function (Flux's q/k norms) and Flux's
    rotary embedding in traceable forms."""
    import diffusers.models.transformers.transformer_flux as flux
    import torch.nn.functional as functional

    saved = (functional.rms_norm, flux.apply_rotary_emb)
    functional.rms_norm = traceable_rms_norm
    if component == "transformer" and transformer_family(pipe) == "flux":
        flux.apply_rotary_emb = traceable_rotary_emb
    try:
        yield
    finally:
        functional.rms_norm, flux.apply_rotary_emb = saved


class UNet(torch.nn.Module):
    """The U-Net with the IO table's inputs; the optional ones (sdruntime.manifest.UNET_OPTIONAL_INPUTS)
    follow encoder_hidden_states in the order `optional` names them, then `residuals` ControlNet residuals
    (the down blocks', then the mid block's)."""

    def __init__(self, unet, optional: tuple[str, ...] = (), residuals: int = 0):
        super().__init__()
        self.unet = unet
        self.optional = optional
        self.residuals = residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        conditioning, residuals = rest[: len(self.optional)], rest[len(self.optional) :]
        given = dict(zip(self.optional, conditioning))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=given.get("timestep_cond"),
            added_cond_kwargs=added or None,
            down_block_additional_residuals=tuple(residuals[:-1]) if residuals else None,
            mid_block_additional_residual=residuals[-1] if residuals else None,
            return_dict=False,
        )[0]


class ControlNet(torch.nn.Module):
    """diffusers' ControlNetModel with the IO table's inputs: each residual times its own factor of
    `conditioning_scale` (the scale, or guess mode's ramp times it, computed by the runtime)."""

    def __init__(self, controlnet, text_time: bool):
        super().__init__()
        self.controlnet = controlnet
        self.text_time = text_time

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *added):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs=dict(zip(("text_embeds", "time_ids"), added)) if self.text_time else None,
            return_dict=False,
        )
        return (*(d * conditioning_scale[i] for i, d in enumerate(down)), mid * conditioning_scale[-1])


class VaeDecoder(torch.nn.Module):
    """Latents (already divided by the scaling factor) to pixels in [-1, 1] (unclamped). An AutoencoderTiny's
    decode is the same call: its DecoderTiny maps TAESD's [0, 1] output to [-1, 1] itself."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Pixels in [-1, 1] to the diagonal Gaussian's parameters (mean, logvar); sampling stays outside. An
    AutoencoderTiny's encoder gives the latents themselves (it has no quant_conv)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments


TINY_VAE_ATTRIBUTE = "sdexport_tiny_vae"  # where load.attach_tiny_vae puts the AutoencoderTiny `--tiny-vae` names


def tiny_vae(pipe):
    """The AutoencoderTiny attached for vae_decoder_tiny (load.attach_tiny_vae), or None."""
    return getattr(pipe, TINY_VAE_ATTRIBUTE, None)


def is_tiny_vae(vae) -> bool:
    """A diffusers AutoencoderTiny (TAESD's family): its encoder outputs latents, its decoder clamps its input."""
    return type(vae).__name__ == "AutoencoderTiny"


def set_attention(pipe, form: str) -> None:
    """Use SDPA or diffusers' plain attention everywhere (U-Net, VAE, ControlNets and CLIP). SD3's and Flux's
    transformers keep their joint attention processors (SDPA) and T5 its own attention (it has no SDPA form)."""

    unet = getattr(pipe, "unet", None)
    for module in (unet, pipe.vae, *controlnet_models(pipe).values()):
        if module is not None and not is_tiny_vae(module):  # an AutoencoderTiny has no attention
            set_module_attention(module, form)
    for encoder in text_encoders(pipe).values():
        if type(encoder).__name__.startswith("CLIP"):
            encoder.set_attn_implementation("sdpa" if form == "sdpa" else "eager")


def set_module_attention(module, form: str) -> None:
    """SDPA or diffusers' plain attention in one diffusers module."""
    module.set_attn_processor(AttnProcessor2_0() if form == "sdpa" else AttnProcessor())


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (an SDXL refiner has text_encoder_2 only; SD3 may lack T5)."""
    found = {name: getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    return {name: module for name, module in found.items() if module is not None}


def pipeline_components(pipe) -> tuple[str, ...]:
    """The IO table's components this pipeline has (an SDXL refiner has no text_encoder)."""
    return tuple(c for c in COMPONENTS if getattr(pipe, SPECS[c].module, None) is not None)


def denoiser(pipe) -> torch.nn.Module:
    """The U-Net, or the transformer of SD3 and Flux."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def transformer_family(pipe) -> str | None:
    """sd3 or flux for the transformer pipelines, else None."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    return "flux" if type(transformer).__name__ == "FluxTransformer2DModel" else "sd3"


def is_sdxl(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and unet.config.get("addition_embed_type") == "text_time"


def unet_optional_inputs(pipe) -> tuple[str, ...]:
    """The U-Net's optional inputs, in the IO table's order."""
    return tuple(s.name for s in io_of("unet", pipe).inputs[3:] if s.name in UNET_OPTIONAL_INPUTS)


def first_tokenizer(pipe):
    """tokenizer, or tokenizer_2 for a pipeline without the first (an SDXL refiner)."""
    return pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def size_multiple(pipe) -> int:
    """Pixel height and width must be multiples of this: traced graphs bake in the upsample sizes; a
    transformer's latents are cut into patch_size x patch_size patches."""
    if transformer_family(pipe):
        return vae_scale_factor(pipe) * patch_size(pipe)
    upsamplers = len(pipe.unet.config.block_out_channels) - 1
    return vae_scale_factor(pipe) * 2**upsamplers


def patch_size(pipe) -> int:
    """The transformer's patch side in latent pixels: SD3's config, or Flux's 2x2 packing."""
    return 2 if transformer_family(pipe) == "flux" else int(pipe.transformer.config.patch_size)


def t5_tokenizer(pipe):
    """The T5 tokenizer: SD3's tokenizer_3, Flux's tokenizer_2."""
    return pipe.tokenizer_3 if transformer_family(pipe) == "sd3" else pipe.tokenizer_2


def t5_component(pipe) -> str:
    return "text_encoder_3" if transformer_family(pipe) == "sd3" else "text_encoder_2"


def transformer_dims(pipe) -> dict[str, int]:
    """The IO table's fixed axes of an SD3 or Flux pipeline."""
    config = pipe.transformer.config
    latent = pipe.vae.config.latent_channels
    dims = {
        "max_length": pipe.tokenizer.model_max_length,
        "latent_channels": latent,
        "out_channels": config.out_channels or config.in_channels,
        "image_channels": pipe.vae.config.in_channels,
        "latent_parameters": 2 * latent,
        "joint_attention_dim": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
        "packed_channels": config.in_channels,
        "packed_out_channels": config.out_channels or config.in_channels,
        "position_axes": 3,
    }
    encoders = text_encoders(pipe)
    dims["text_hidden_size"] = encoders["text_encoder"].config.hidden_size
    if transformer_family(pipe) == "sd3":
        dims["text_embeds_dim_1"] = encoders["text_encoder"].config.projection_dim
        dims["max_length_2"] = pipe.tokenizer_2.model_max_length
        dims["text_hidden_size_2"] = encoders["text_encoder_2"].config.hidden_size
        dims["text_embeds_dim"] = encoders["text_encoder_2"].config.projection_dim
    t5 = encoders.get(t5_component(pipe))
    dims["t5_hidden_size"] = t5.config.d_model if t5 is not None else config.joint_attention_dim
    return dims


def model_dims(pipe) -> dict[str, int]:
    """The IO table's fixed axes, read from the pipeline's configs."""
    if transformer_family(pipe):
        return transformer_dims(pipe)
    unet = pipe.unet.config
    dims = {
        "max_length": first_tokenizer(pipe).model_max_length,
        "latent_channels": pipe.vae.config.latent_channels,
        "unet_in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "cross_attention_dim": unet.cross_attention_dim,
        "image_channels": pipe.vae.config.in_channels,
        "latent_parameters": 2 * pipe.vae.config.latent_channels,
    }
    encoders = text_encoders(pipe)
    if "text_encoder" in encoders:
        dims["text_hidden_size"] = encoders["text_encoder"].config.hidden_size
    if "text_encoder_2" in encoders:
        dims["max_length_2"] = pipe.tokenizer_2.model_max_length
        dims["text_hidden_size_2"] = encoders["text_encoder_2"].config.hidden_size
        dims["text_embeds_dim"] = encoders["text_encoder_2"].config.projection_dim
    if is_sdxl(pipe):
        pooled = unet.projection_class_embeddings_input_dim - unet.addition_time_embed_dim * num_time_ids(pipe)
        dims["text_embeds_dim"] = pooled
        dims["time_ids_dim"] = num_time_ids(pipe)
    if unet.get("time_cond_proj_dim") is not None:
        dims["time_cond_proj_dim"] = unet.time_cond_proj_dim
    scales, channels = residual_layout(unet)
    dims["residuals"] = len(scales)
    dims.update({f"residual_channels_{i}": width for i, width in enumerate(channels)})
    return dims


def residual_layout(unet_config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent size divisor, channels) of each residual a ControlNet adds to this U-Net, as diffusers'
    UNet2DConditionModel collects its down-block outputs: conv_in's, each resnet's and each downsampler's,
    then the mid block's."""
    channels = list(unet_config.block_out_channels)
    per_block = unet_config.layers_per_block
    per_block = [per_block] * len(channels) if isinstance(per_block, int) else list(per_block)
    scales, widths, scale = [1], [channels[0]], 1
    for i, (width, layers) in enumerate(zip(channels, per_block)):
        scales += [scale] * layers
        widths += [width] * layers
        if i < len(channels) - 1:
            scale *= 2
            scales.append(scale)
            widths.append(width)
    return (*scales, scale), (*widths, channels[-1])


def controlnet_models(pipe) -> dict[str, torch.nn.Module]:
    """The ControlNets attached to a pipeline for export (load.attach_controlnets), by component name."""
    return getattr(pipe, "sdexport_controlnets", None) or {}


def num_time_ids(pipe) -> int:
    """SDXL's micro-conditioning numbers per image: original size, crop corner and target size (6),
    or original size, crop corner and aesthetic score (5) for refiners (requires_aesthetics_score)."""
    return 5 if pipe.config.get("requires_aesthetics_score") else 6


def num_hidden_states(pipe, component: str = "text_encoder") -> int:
    """A text encoder's hidden states: the embeddings and one per layer (what clip_skip indexes); 0 when absent."""
    encoder = text_encoders(pipe).get(component)
    return encoder.config.num_hidden_layers + 1 if encoder is not None else 0


def final_layer_norm(pipe) -> dict:
    """CLIP's final LayerNorm, which diffusers applies to the hidden state clip_skip picks."""
    norm = pipe.text_encoder.text_model.final_layer_norm
    return {
        "weight": norm.weight.detach().float().numpy(),
        "bias": norm.bias.detach().float().numpy(),
        "eps": np.float32(norm.eps),
    }


def io_of(component: str, pipe):
    family = transformer_family(pipe)
    if family:
        guidance = family == "flux" and bool(pipe.transformer.config.guidance_embeds)
        hidden = 0 if component == t5_component(pipe) else num_hidden_states(pipe, component)
        return component_io(component, hidden, family=family, guidance_embeds=guidance)
    return component_io(
        component,
        num_hidden_states(pipe, component),
        text_time=is_sdxl(pipe),
        timestep_cond=pipe.unet.config.get("time_cond_proj_dim") is not None,
        residual_scales=residual_layout(pipe.unet.config)[0],
        tiny_vae=is_tiny_vae(pipe.vae),
        attention_mask=True,
    )


def dynamic_axes(component: str, fixed: dict[str, int], pipe) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for the axes the export leaves symbolic."""
    io = io_of(component, pipe)
    axes = {}
    for spec in io.inputs + io.outputs:
        named = {i: a for i, a in enumerate(spec.shape) if a in DYNAMIC_AXES and a not in fixed}
        if named:
            axes[spec.name] = named
    return axes


T5_TRACE_LENGTH = 64  # T5's sequence is dynamic: any length traces the same ops


def text_encoder_inputs(component: str, pipe, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids between BOS and EOS, as many as the tokenizer pads to (T5: random ids ending in </s>)."""
    encoder = text_encoders(pipe)[component]
    if type(encoder).__name__.startswith("T5"):
        tokenizer = t5_tokenizer(pipe)
        ids = torch.randint(3, encoder.config.vocab_size, (batch, T5_TRACE_LENGTH), generator=gen)
        ids[:, -1] = tokenizer.eos_token_id
        return {"input_ids": ids}
    tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
    ids = torch.randint(0, encoder.config.vocab_size - 2, (batch, tokenizer.model_max_length), generator=gen)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, -1] = tokenizer.eos_token_id
    if TEXT_ENCODER_MASK not in {s.name for s in io_of(component, pipe).inputs}:
        return {"input_ids": ids}
    # a mask with tokens masked out, so that the comparison with PyTorch covers the mask's path; the first
    # token stays unmasked (compel never masks it, and a query row with every key masked is undefined)
    mask = (torch.rand(ids.shape, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    return {"input_ids": ids, TEXT_ENCODER_MASK: mask}


def unet_inputs(
    component: str, pipe, batch: int, height: int, width: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    dims = model_dims(pipe)
    inputs = {
        "sample": torch.randn(batch, dims["unet_in_channels"], height, width, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * 999.0,
        "encoder_hidden_states": torch.randn(batch, dims["max_length"], dims["cross_attention_dim"], generator=gen),
    }
    optional = unet_optional_inputs(pipe)
    if "timestep_cond" in optional:
        inputs["timestep_cond"] = torch.randn(batch, dims["time_cond_proj_dim"], generator=gen)
    if "text_embeds" in optional:
        inputs.update(text_time_inputs(dims, batch, gen))
    inputs.update(residual_inputs(io_of(component, pipe).inputs[3 + len(optional) :], dims, batch, height, width, gen))
    return inputs


def text_time_inputs(dims: dict[str, int], batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """SDXL's pooled text embeddings and time ids; sizes and crop corners in pixels, as its micro-conditioning gives them."""
    return {
        "text_embeds": torch.randn(batch, dims["text_embeds_dim"], generator=gen),
        "time_ids": torch.randint(0, 1025, (batch, dims["time_ids_dim"]), generator=gen).float(),
    }


def residual_inputs(specs, dims: dict[str, int], batch: int, height: int, width: int, gen) -> dict[str, torch.Tensor]:
    """Random ControlNet residuals of the specs' shapes for a latent of height x width."""
    sizes = {**dims, "batch": batch, "height": height, "width": width}
    for axis in ("height", "width"):
        sizes.update({f"{axis}_{2**k}": -(-sizes[axis] // 2**k) for k in range(1, 6)})
    return {s.name: 0.5 * torch.randn(*(sizes[a] for a in s.shape), generator=gen) for s in specs}


def transformer_inputs(
    component: str, pipe, batch: int, height: int, width: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """SD3: latents [batch, C, h, w]; Flux: packed latents with their positions. Both: text embeddings of
    T5_TRACE_LENGTH (plus CLIP's 77 for SD3) tokens, pooled projections and timesteps as the pipelines give them."""
    dims = model_dims(pipe)
    family = transformer_family(pipe)
    text = T5_TRACE_LENGTH + (dims["max_length"] if family == "sd3" else 0)
    embeddings = torch.randn(batch, text, dims["joint_attention_dim"], generator=gen)
    pooled = torch.randn(batch, dims["pooled_projection_dim"], generator=gen)
    sigma = torch.rand(batch, generator=gen)
    if family == "sd3":
        latents = torch.randn(batch, dims["latent_channels"], height, width, generator=gen)
        return {
            "hidden_states": latents,
            "encoder_hidden_states": embeddings,
            "pooled_projections": pooled,
            "timestep": sigma * 1000.0,
        }
    rows, columns = height // 2, width // 2
    img_ids = torch.zeros(rows, columns, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(columns)[None, :]
    inputs = {
        "hidden_states": torch.randn(batch, rows * columns, dims["packed_channels"], generator=gen),
        "encoder_hidden_states": embeddings,
        "pooled_projections": pooled,
        "timestep": sigma,
        "txt_ids": torch.zeros(text, 3),
        "img_ids": img_ids.reshape(rows * columns, 3),
    }
    if pipe.transformer.config.guidance_embeds:
        inputs["guidance"] = 1.0 + 4.0 * torch.rand(batch, generator=gen)
    return inputs


def controlnet_inputs(
    component: str, pipe, batch: int, height: int, width: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    dims = model_dims(pipe)
    factor = vae_scale_factor(pipe)
    inputs = {
        "sample": torch.randn(batch, dims["latent_channels"], height, width, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * 999.0,
        "encoder_hidden_states": torch.randn(batch, dims["max_length"], dims["cross_attention_dim"], generator=gen),
        "controlnet_cond": torch.rand(batch, 3, height * factor, width * factor, generator=gen),
        "conditioning_scale": 0.5 + torch.rand(dims["residuals"], generator=gen),
    }
    if is_sdxl(pipe):
        inputs.update(text_time_inputs(dims, batch, gen))
    return inputs


def vae_decoder_inputs(
    component: str, pipe, batch: int, height: int, width: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    return {"latent_sample": torch.randn(batch, pipe.vae.config.latent_channels, height, width, generator=gen)}


def vae_encoder_inputs(
    component: str, pipe, batch: int, height: int, width: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    factor = vae_scale_factor(pipe)
    image = torch.rand(batch, model_dims(pipe)["image_channels"], height * factor, width * factor, generator=gen)
    return {"sample": image * 2.0 - 1.0}


def final_layer_norm_file(pipe, folder) -> list[str]:
    """text_encoder's extra file: CLIP's final LayerNorm, for the hidden state clip_skip picks."""
    (folder / FINAL_LAYER_NORM).parent.mkdir(parents=True, exist_ok=True)
    np.savez(folder / FINAL_LAYER_NORM, **final_layer_norm(pipe))
    return [FINAL_LAYER_NORM]


def save_diffusers_config(module, folder) -> None:
    module.save_config(folder)


def save_transformers_config(module, folder) -> None:
    module.config.save_pretrained(folder)


@dataclass(frozen=True)
class ComponentSpec:
    """One exported component: everything the exporter does differently for it."""

    name: str
    module: str  # the pipeline attribute it is traced from (both VAE parts share `vae`)
    wrapper: Callable[[object], torch.nn.Module]  # pipe -> the module with the IO table's signature
    example_inputs: Callable[..., dict[str, torch.Tensor]]  # (component, pipe, batch, h, w, generator)
    fusion_model_type: str  # ORT's optimizer model type (onnxruntime.transformers.optimizer)
    save_config: Callable[[object, object], None] = save_diffusers_config  # (module, folder): its config.json
    fp32_inputs: tuple[str, ...] = ()  # float32 in every export; their Sin/Cos embedding path stays fp32
    upcast_attention_scores: bool = False  # with the config's upcast_attention, Q.K^T and softmax stay fp32
    follows_vae_force_upcast: bool = False  # kept fp32 in fp16 exports when the VAE config says force_upcast
    traced_last: bool = False  # the largest: traced once every other module's weights are freed
    extra_files: Callable[[object, object], list[str]] | None = None  # (pipe, folder) -> files written

    def module_of(self, pipe, component: str) -> torch.nn.Module:
        """The PyTorch module a component is traced from (a ControlNet's by its component name)."""
        return controlnet_models(pipe)[component] if self.name == CONTROLNET else getattr(pipe, self.module)


def text_encoder_spec(name: str) -> ComponentSpec:
    return ComponentSpec(
        name,
        name,
        lambda pipe, component: text_encoder_wrapper(getattr(pipe, name)),
        lambda component, pipe, batch, height, width, gen: text_encoder_inputs(component, pipe, batch, gen),
        fusion_model_type="clip",
        save_config=save_transformers_config,
        extra_files=final_layer_norm_file if name == "text_encoder" else None,
    )


T5_FUSION = "t5"  # ORT's optimizer model type for T5 (RMSNorm, T5 attention with its relative position bias)
T5_OUTPUTS = ("last_hidden_state",)  # the IO table's T5 encoder has this output alone; CLIP's have more

SPECS: dict[str, ComponentSpec] = {
    "text_encoder": text_encoder_spec("text_encoder"),
    "text_encoder_2": text_encoder_spec("text_encoder_2"),
    "text_encoder_3": replace(text_encoder_spec("text_encoder_3"), fusion_model_type=T5_FUSION),  # T5 in SD3
    "unet": ComponentSpec(
        "unet",
        "unet",
        lambda pipe, component: UNet(pipe.unet, unet_optional_inputs(pipe), len(residual_layout(pipe.unet.config)[0])),
        unet_inputs,
        fusion_model_type="unet",
        fp32_inputs=("timestep", "time_ids"),  # SDXL's time_ids get a Sin/Cos embedding like the timestep's
        upcast_attention_scores=True,
        traced_last=True,
    ),
    "transformer": ComponentSpec(
        "transformer",
        "transformer",
        lambda pipe, component: (FluxTransformer if transformer_family(pipe) == "flux" else SD3Transformer)(
            pipe.transformer
        ),
        transformer_inputs,
        fusion_model_type="mmdit",
        fp32_inputs=("timestep", "guidance", "txt_ids", "img_ids"),
        traced_last=True,
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder",
        "vae",
        lambda pipe, component: VaeDecoder(pipe.vae),
        vae_decoder_inputs,
        fusion_model_type="vae",
        follows_vae_force_upcast=True,
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder",
        "vae",
        lambda pipe, component: VaeEncoder(pipe.vae),
        vae_encoder_inputs,
        fusion_model_type="vae",
        follows_vae_force_upcast=True,
    ),
    # the AutoencoderTiny `--tiny-vae` attaches (tiny_vae): its decoder, on the VAE decoder's inputs
    TINY_DECODER: ComponentSpec(
        TINY_DECODER,
        TINY_VAE_ATTRIBUTE,
        lambda pipe, component: VaeDecoder(tiny_vae(pipe)),
        vae_decoder_inputs,
        fusion_model_type="vae",
    ),
    # one per ControlNet, as "controlnet/NAME"; its module is pipe.sdexport_controlnets[component]
    CONTROLNET: ComponentSpec(
        CONTROLNET,
        CONTROLNET,
        lambda pipe, component: ControlNet(controlnet_models(pipe)[component], is_sdxl(pipe)),
        controlnet_inputs,
        fusion_model_type="unet",
        fp32_inputs=("timestep", "time_ids"),
        upcast_attention_scores=True,
    ),
}


def spec_of(component: str) -> ComponentSpec:
    """A component's spec: "controlnet/NAME" has the ControlNet's."""
    return SPECS[component_kind(component)]


def graph_spec(component: str, outputs: Sequence[str]) -> ComponentSpec:
    """The spec of a traced graph: a text encoder graph with T5's outputs is fused and kept in fp32 as T5
    (Flux's T5 is text_encoder_2, the name SDXL and SD3 give CLIP-G)."""
    spec = spec_of(component)
    if spec.fusion_model_type == "clip" and tuple(outputs) == T5_OUTPUTS:
        return replace(spec, fusion_model_type=T5_FUSION)
    return spec


def wrap(component: str, pipe) -> torch.nn.Module:
    return spec_of(component).wrapper(pipe, component).eval()


def example_inputs(component: str, pipe, batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the IO table's shapes; height and width in latent pixels."""
    generator = torch.Generator().manual_seed(seed)
    return spec_of(component).example_inputs(component, pipe, batch, height, width, generator)
