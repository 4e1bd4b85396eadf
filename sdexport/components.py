"""PyTorch modules with the fixed signatures of the IO table in `sdruntime.manifest`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from sdruntime.manifest import DYNAMIC_AXES, axis_sizes, component_io

ATTENTION_FORMS = ("sdpa", "plain")


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0 if form == "sdpa" else AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    pipe.text_encoder.set_attn_implementation("sdpa" if form == "sdpa" else "eager")


def wrap(component: str, pipe) -> torch.nn.Module:
    modules = {
        "text_encoder": lambda: TextEncoder(pipe.text_encoder),
        "unet": lambda: UNet(pipe.unet),
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
    return {
        "max_length": pipe.tokenizer.model_max_length,
        "text_hidden_size": pipe.text_encoder.config.hidden_size,
        "latent_channels": pipe.unet.config.in_channels,
        "out_channels": pipe.unet.config.out_channels,
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "image_channels": pipe.vae.config.in_channels,
        "latent_parameters": 2 * pipe.vae.config.latent_channels,
    }


def static_dims(component: str, batch_size: int, height: int, width: int, factor: int, max_length: int) -> dict[str, int]:
    """Concrete values of the dynamic axes for a static export of N images of H x W pixels
    (sdruntime.manifest.axis_sizes, for a VAE factor and tokenizer length not yet in a manifest)."""
    return axis_sizes(SimpleNamespace(vae_scale_factor=factor, tokenizer_max_length=max_length),
                      component, batch_size, height, width)


def num_hidden_states(pipe) -> int:
    """The text encoder's hidden states: the embeddings and one per layer (what clip_skip indexes)."""
    return pipe.text_encoder.config.num_hidden_layers + 1


def final_layer_norm(pipe) -> dict:
    """CLIP's final LayerNorm, which diffusers applies to the hidden state clip_skip picks."""
    norm = pipe.text_encoder.text_model.final_layer_norm
    return {
        "weight": norm.weight.detach().float().numpy(),
        "bias": norm.bias.detach().float().numpy(),
        "eps": np.float32(norm.eps),
    }


def io_of(component: str, pipe):
    return component_io(component, num_hidden_states(pipe))


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
    if component == "text_encoder":
        ids = torch.randint(0, pipe.text_encoder.config.vocab_size - 2, (batch, dims["max_length"]), generator=gen)
        ids[:, 0] = pipe.tokenizer.bos_token_id
        ids[:, -1] = pipe.tokenizer.eos_token_id
        return {"input_ids": ids}
    if component == "unet":
        return {
            "sample": torch.randn(batch, dims["latent_channels"], height, width, generator=gen),
            "timestep": torch.rand(batch, generator=gen) * 999.0,
            "encoder_hidden_states": torch.randn(batch, dims["max_length"], dims["cross_attention_dim"], generator=gen),
        }
    if component == "vae_decoder":
        return {"latent_sample": torch.randn(batch, pipe.vae.config.latent_channels, height, width, generator=gen)}
    if component == "vae_encoder":
        image = torch.rand(batch, dims["image_channels"], height * factor, width * factor, generator=gen)
        return {"sample": image * 2.0 - 1.0}
    raise KeyError(component)
