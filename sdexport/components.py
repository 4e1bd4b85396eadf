"""PyTorch modules with the fixed signatures of the IO table in `sdruntime.manifest`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from sdruntime.manifest import COMPONENTS, DYNAMIC_AXES, axis_sizes, component_io

ATTENTION_FORMS = ("sdpa", "plain")


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


class TextEncoderWithProjection(torch.nn.Module):
    """SDXL's second text encoder: the projected pooled output, the last hidden state and every hidden state."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return (out.text_embeds, out.last_hidden_state, *out.hidden_states)


class UNet(torch.nn.Module):
    """The U-Net with the IO table's inputs; the optional ones (sdruntime.manifest.UNET_OPTIONAL_INPUTS)
    follow encoder_hidden_states in the order `optional` names them."""

    def __init__(self, unet, optional: tuple[str, ...] = ()):
        super().__init__()
        self.unet = unet
        self.optional = optional

    def forward(self, sample, timestep, encoder_hidden_states, *conditioning):
        given = dict(zip(self.optional, conditioning))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=given.get("timestep_cond"),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]


class VaeDecoder(torch.nn.Module):
    """Latents (already divided by the scaling factor) to pixels in [-1, 1] (unclamped)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Pixels in [-1, 1] to the diagonal Gaussian's parameters (mean, logvar); sampling stays outside."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments


def set_attention(pipe, form: str) -> None:
    """Use SDPA or diffusers' plain attention everywhere (U-Net, VAE and CLIP)."""

    processor = AttnProcessor2_0 if form == "sdpa" else AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    for encoder in text_encoders(pipe).values():
        encoder.set_attn_implementation("sdpa" if form == "sdpa" else "eager")


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (an SDXL refiner has text_encoder_2 only)."""
    found = {name: getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")}
    return {name: module for name, module in found.items() if module is not None}


def pipeline_components(pipe) -> tuple[str, ...]:
    """The IO table's components this pipeline has."""
    return tuple(c for c in COMPONENTS if not c.startswith("text_encoder") or c in text_encoders(pipe))


def is_sdxl(pipe) -> bool:
    return pipe.unet.config.get("addition_embed_type") == "text_time"


def unet_optional_inputs(pipe) -> tuple[str, ...]:
    """The U-Net's optional inputs, in the IO table's order."""
    return tuple(s.name for s in io_of("unet", pipe).inputs[3:])


def first_tokenizer(pipe):
    """tokenizer, or tokenizer_2 for a pipeline without the first (an SDXL refiner)."""
    return pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2


def wrap(component: str, pipe) -> torch.nn.Module:
    modules = {
        "text_encoder": lambda: TextEncoder(pipe.text_encoder),
        "text_encoder_2": lambda: TextEncoderWithProjection(pipe.text_encoder_2),
        "unet": lambda: UNet(pipe.unet, unet_optional_inputs(pipe)),
        "vae_decoder": lambda: VaeDecoder(pipe.vae),
        "vae_encoder": lambda: VaeEncoder(pipe.vae),
    }
    return modules[component]().eval()


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def size_multiple(pipe) -> int:
    """Pixel height and width must be multiples of this: traced graphs bake in the upsample sizes."""
    upsamplers = len(pipe.unet.config.block_out_channels) - 1
    return vae_scale_factor(pipe) * 2**upsamplers


def model_dims(pipe) -> dict[str, int]:
    """The IO table's fixed axes, read from the pipeline's configs."""
    unet = pipe.unet.config
    dims = {
        "max_length": first_tokenizer(pipe).model_max_length,
        "latent_channels": unet.in_channels,
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
    return dims


def num_time_ids(pipe) -> int:
    """SDXL's micro-conditioning numbers per image: original size, crop corner and target size (6),
    or original size, crop corner and aesthetic score (5) for refiners (requires_aesthetics_score)."""
    return 5 if pipe.config.get("requires_aesthetics_score") else 6


def static_dims(
    component: str, batch_size: int, height: int, width: int, factor: int, max_length: int
) -> dict[str, int]:
    """Concrete values of the dynamic axes for a static export of N images of H x W pixels
    (sdruntime.manifest.axis_sizes, for a VAE factor and tokenizer length not yet in a manifest)."""
    return axis_sizes(
        SimpleNamespace(vae_scale_factor=factor, tokenizer_max_length=max_length), component, batch_size, height, width
    )


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
    return component_io(
        component,
        num_hidden_states(pipe, component),
        text_time=is_sdxl(pipe),
        timestep_cond=pipe.unet.config.get("time_cond_proj_dim") is not None,
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


def example_inputs(component: str, pipe, batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the IO table's shapes; height and width in latent pixels."""
    gen = torch.Generator().manual_seed(seed)
    dims = model_dims(pipe)
    factor = vae_scale_factor(pipe)
    if component in ("text_encoder", "text_encoder_2"):
        tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
        encoder = text_encoders(pipe)[component]
        ids = torch.randint(0, encoder.config.vocab_size - 2, (batch, tokenizer.model_max_length), generator=gen)
        ids[:, 0] = tokenizer.bos_token_id
        ids[:, -1] = tokenizer.eos_token_id
        return {"input_ids": ids}
    if component == "unet":
        inputs = {
            "sample": torch.randn(batch, dims["latent_channels"], height, width, generator=gen),
            "timestep": torch.rand(batch, generator=gen) * 999.0,
            "encoder_hidden_states": torch.randn(batch, dims["max_length"], dims["cross_attention_dim"], generator=gen),
        }
        optional = unet_optional_inputs(pipe)
        if "timestep_cond" in optional:
            inputs["timestep_cond"] = torch.randn(batch, dims["time_cond_proj_dim"], generator=gen)
        if "text_embeds" in optional:
            inputs["text_embeds"] = torch.randn(batch, dims["text_embeds_dim"], generator=gen)
            # sizes and crop corners in pixels, as SDXL's micro-conditioning gives them
            inputs["time_ids"] = torch.randint(0, 1025, (batch, dims["time_ids_dim"]), generator=gen).float()
        return inputs
    if component == "vae_decoder":
        return {"latent_sample": torch.randn(batch, pipe.vae.config.latent_channels, height, width, generator=gen)}
    if component == "vae_encoder":
        image = torch.rand(batch, dims["image_channels"], height * factor, width * factor, generator=gen)
        return {"sample": image * 2.0 - 1.0}
    raise KeyError(component)
