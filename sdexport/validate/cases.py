"""The inputs each component is checked on: the same arrays go to PyTorch and to ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from sdruntime.conditioning import (
    MicroConditioning,
    guidance_scale_embedding,
    img2img_time_ids,
    txt2img_time_ids,
)
from sdruntime.manifest import CONTROLNET, TINY_DECODER, UNET_RESIDUAL_INPUTS, Manifest, component_kind, latent_shape

from ..specs import is_sdxl, t5_component, t5_tokenizer, transformer_family
from ..targets import EXPORT_TARGETS
from .options import PROMPTS, image_sizes


@dataclass
class Case:
    """One set of inputs for a component; height and width in image pixels."""

    label: str
    inputs: dict[str, np.ndarray]
    batch: int
    height: int | None = None
    width: int | None = None
    timestep: float | None = None


def batch_sizes(manifest: Manifest, component: str) -> list[int]:
    """1 and 2, or the batch a static export fixes."""
    first = manifest.components[component].inputs[0].shape[0]
    return [first] if isinstance(first, int) else [1, 2]


def token_ids(pipe, prompts: list[str], component: str = "text_encoder", t5_length: int | None = None) -> np.ndarray:
    """The ids a text encoder reads, as the pipelines tokenize: CLIP's padded to its model_max_length, T5's
    (SD3's text_encoder_3, Flux's text_encoder_2) to `t5_length` (max_sequence_length), truncated alike."""
    if transformer_family(pipe) and component == t5_component(pipe):
        tokenizer, length = t5_tokenizer(pipe), t5_length
    else:
        tokenizer = pipe.tokenizer_2 if component == "text_encoder_2" else pipe.tokenizer
        length = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return tokens.input_ids.astype(np.int64)


def prompts_for(batch: int, guided: bool) -> list[str]:
    """Real prompts; guided batches put the negative (empty) prompts first, as the pipelines do."""
    if not guided or batch == 1:
        return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    half = batch // 2
    return [""] * half + [PROMPTS[i % len(PROMPTS)] for i in range(batch - half)]


def text_embeddings(pipe, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The U-Net's encoder_hidden_states for `prompts` as the pipeline computes them, and for SDXL the
    pooled `text_embeds` too (diffusers' own encode_prompt: both encoders' penultimate states)."""
    with torch.no_grad():
        if not is_sdxl(pipe):
            return pipe.text_encoder(torch.from_numpy(token_ids(pipe, prompts)))[0].float().numpy(), {}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return embeds.float().numpy(), {"text_embeds": pooled.float().numpy()}


def unet_conditioning(
    manifest: Manifest, batch: int, height: int, width: int, guidance_scale: float, component: str = "unet"
) -> dict:
    """SDXL's time_ids (the generated size, no crop; a refiner's aesthetic score 6) and an LCM U-Net's
    timestep_cond (the guidance embedding), as the pipelines make them, where the component takes them."""
    facts = manifest.pipeline
    names = {t.name for t in manifest.components[component].inputs}
    extra = {}
    if "time_ids" in names:  # the runtime's own defaults: no micro-conditioning given, no guidance batch
        default = MicroConditioning()
        if facts.requires_aesthetics_score:
            extra["time_ids"] = img2img_time_ids(default, (height, width), batch, False, aesthetic=True)
        else:
            extra["time_ids"] = txt2img_time_ids(default, (height, width), batch, False)
    if "timestep_cond" in names:
        extra["timestep_cond"] = guidance_scale_embedding([guidance_scale - 1.0] * batch, facts.time_cond_proj_dim)
    return extra


def gradient_image(height: int, width: int, flip: bool = False) -> Image.Image:
    """A deterministic RGB test picture: red across, green down, blue along the diagonal."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / max(width - 1, 1), y / max(height - 1, 1)
    if flip:
        x, y = 1.0 - x, 1.0 - y
    rgb = np.stack([x, y, 0.5 * (x + y) * (1.0 - x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def rectangle_mask(height: int, width: int) -> Image.Image:
    """A deterministic inpainting mask: white (repainted) right of the first quarter and below the first third."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(((x >= width // 4) & (y >= height // 3)).astype(np.uint8) * 255)


def image_batch(height: int, width: int, batch: int) -> np.ndarray:
    """[batch, 3, H, W] in [-1, 1]: the gradient and its mirror image."""
    images = [
        np.asarray(gradient_image(height, width, flip=i % 2 == 1), np.float32) / 127.5 - 1.0 for i in range(batch)
    ]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def input_shape(manifest: Manifest, component: str, name: str, batch: int, height: int, width: int) -> tuple:
    """An input's shape as the manifest records it, its dynamic axes sized for batch x height x width pixels."""
    sizes = manifest.axis_sizes(component, batch, height, width, guidance=False)
    return tuple(sizes[axis] if isinstance(axis, str) else axis for axis in manifest.input_spec(component, name).shape)


def residual_names(manifest: Manifest) -> list[str]:
    """The U-Net's ControlNet residual inputs (none in an export that predates them)."""
    down, mid = UNET_RESIDUAL_INPUTS
    names = [t.name for t in manifest.components["unet"].inputs]
    return [name for name in names if name.startswith(down.format("")) or name == mid]


def residuals(manifest: Manifest, case: Case, gen: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """The U-Net's residual inputs for a case: random ones (as a ControlNet adds), or zeros when `gen` is None."""
    shapes = {
        name: input_shape(manifest, "unet", name, case.batch, case.height, case.width)
        for name in residual_names(manifest)
    }
    if gen is None:
        return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    return {name: 0.5 * torch.randn(shape, generator=gen).numpy() for name, shape in shapes.items()}


def full_inputs(manifest: Manifest, component: str, case: Case) -> dict[str, np.ndarray]:
    """A case's inputs with the residuals it leaves to the U-Net's defaults given as the zeros they are
    (for a graph without defaults: the tensorrt target's, or a fresh trace)."""
    if component != "unet":
        return case.inputs
    return {**residuals(manifest, case), **case.inputs}


def denoiser_case(
    component: str, manifest: Manifest, given: dict[str, np.ndarray], label: str, batch: int, size: tuple, t: float
) -> Case:
    """A U-Net or ControlNet case: the inputs it takes, in the manifest's order (the wrappers take them so)."""
    case = Case(label, {}, batch, size[0], size[1], t)
    if component == "unet" and not EXPORT_TARGETS[manifest.target].residual_defaults:
        given = {**residuals(manifest, case), **given}  # no defaults: zeros fed, as the runtime feeds them
    case.inputs = {spec.name: given[spec.name] for spec in manifest.components[component].inputs if spec.name in given}
    return case


def unet_cases(
    pipe, manifest: Manifest, batch: int, size: tuple[int, int], timesteps: list[float], gen, guidance_scale: float
) -> list[Case]:
    """One case per timestep: fresh noise, PyTorch's embeddings of real prompts, the conditioning the U-Net
    takes, the ControlNet residuals left to their defaults (zeros); then the first timestep again with random
    residuals, as a ControlNet adds them."""
    height, width = size
    embeddings, pooled = text_embeddings(pipe, prompts_for(batch, True))
    extra = {**pooled, **unet_conditioning(manifest, batch, height, width, guidance_scale)}
    label = f"b{batch} {height}x{width}"
    cases = []
    for t in timesteps:
        given = {
            "sample": torch.randn(input_shape(manifest, "unet", "sample", batch, height, width), generator=gen).numpy(),
            "timestep": np.full(batch, t, np.float32),
            "encoder_hidden_states": embeddings,
            **extra,
        }
        cases.append(denoiser_case("unet", manifest, given, f"{label} t={t:g}", batch, size, t))
    if residual_names(manifest):
        first = cases[0]
        given = {**first.inputs, **residuals(manifest, first, gen)}
        cases.append(denoiser_case("unet", manifest, given, f"{first.label} +residuals", batch, size, first.timestep))
    return cases


def controlnet_cases(
    component: str, pipe, manifest: Manifest, batch: int, size: tuple[int, int], timesteps: list[float], gen
) -> list[Case]:
    """One case per timestep: fresh latents, PyTorch's embeddings of real prompts, the gradient picture as
    the control image (RGB in [0, 1]) and guess mode's ramp of scales (a different factor per residual)."""
    height, width = size
    embeddings, pooled = text_embeddings(pipe, prompts_for(batch, True))
    # SDXL's time_ids as the U-Net's; a ControlNet takes no timestep_cond, so the guidance scale is moot
    extra = {**pooled, **unet_conditioning(manifest, batch, height, width, 1.0, component)}
    scales = input_shape(manifest, component, "conditioning_scale", batch, height, width)
    cases = []
    for t in timesteps:
        given = {
            "sample": torch.randn(
                input_shape(manifest, component, "sample", batch, height, width), generator=gen
            ).numpy(),
            "timestep": np.full(batch, t, np.float32),
            "encoder_hidden_states": embeddings,
            "controlnet_cond": (image_batch(height, width, batch) + 1.0) / 2.0,
            "conditioning_scale": np.logspace(-1, 0, scales[0]).astype(np.float32),
            **extra,
        }
        cases.append(denoiser_case(component, manifest, given, f"b{batch} {height}x{width} t={t:g}", batch, size, t))
    return cases


def transformer_text(pipe, manifest: Manifest, prompts: list[str]) -> dict[str, np.ndarray]:
    """The transformer's text inputs for `prompts` as diffusers' own encode_prompt makes them: SD3's CLIP-L, CLIP-G
    and T5 states joined, Flux's T5 states and their zero txt_ids; both with the pooled projections."""
    length = manifest.pipeline.max_sequence_length
    with torch.no_grad():
        if transformer_family(pipe) == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=length
            )
            return {"encoder_hidden_states": embeds.float().numpy(), "pooled_projections": pooled.float().numpy()}
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=length)
    return {
        "encoder_hidden_states": embeds.float().numpy(),
        "pooled_projections": pooled.float().numpy(),
        "txt_ids": text_ids.float().numpy(),
    }


def transformer_latents(pipe, manifest: Manifest, batch: int, size: tuple[int, int], gen) -> dict[str, np.ndarray]:
    """Fresh noise at `size` as the transformer reads it: SD3's latents as they are, Flux's packed into 2x2
    patches with their img_ids, by FluxPipeline's own helpers."""
    latents = torch.randn(latent_shape(manifest.pipeline, batch, *size), generator=gen)
    if transformer_family(pipe) == "sd3":
        return {"hidden_states": latents.numpy()}
    _, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    return {"hidden_states": packed.numpy(), "img_ids": ids.numpy()}


def transformer_cases(
    pipe, manifest: Manifest, batch: int, size: tuple[int, int], timesteps: list[float], gen, guidance_scale: float
) -> list[Case]:
    """One case per timestep (SD3's sigma x 1000, Flux's sigma): fresh noise, diffusers' embeddings of real
    prompts (SD3's guided batch puts the empty negative first; Flux guides by embedding the scale instead,
    Flux dev's `guidance`)."""
    family = transformer_family(pipe)
    text = transformer_text(pipe, manifest, prompts_for(batch, family == "sd3"))
    extra = {"guidance": np.full(batch, guidance_scale, np.float32)} if manifest.pipeline.guidance_embeds else {}
    label = f"b{batch} {size[0]}x{size[1]}"
    cases = []
    for t in timesteps:
        given = {
            **transformer_latents(pipe, manifest, batch, size, gen),
            **text,
            "timestep": np.full(batch, t, np.float32),
            **extra,
        }
        cases.append(denoiser_case("transformer", manifest, given, f"{label} t={t:g}", batch, size, t))
    return cases


def decoder_latents(manifest: Manifest, batch: int, size: tuple[int, int], gen) -> np.ndarray:
    """What the pipelines give the VAE decoder: latents / scaling factor (+ SD3's and Flux's shift factor)."""
    facts = manifest.pipeline
    latents = torch.randn(latent_shape(facts, batch, *size), generator=gen).numpy()
    return (latents / facts.vae_scaling_factor + (facts.vae_shift_factor or 0.0)).astype(np.float32)


def component_cases(
    component: str,
    pipe,
    manifest: Manifest,
    timesteps: list[float],
    seed: int,
    guidance_scale: float,
    size: tuple[int, int],
) -> list[Case]:
    """The same inputs PyTorch and ONNX Runtime get: every batch x size (`size`, the end-to-end runs', and a
    non-square one) x timestep for the U-Net, the transformer and the ControlNets."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for batch in batch_sizes(manifest, component):
        if component.startswith("text_encoder"):
            ids = token_ids(pipe, prompts_for(batch, False), component, manifest.pipeline.max_sequence_length)
            cases.append(Case(f"b{batch} prompts", {"input_ids": ids}, batch))
            continue
        for height, width in image_sizes(manifest, size):
            label = f"b{batch} {height}x{width}"
            if component == "unet":
                cases += unet_cases(pipe, manifest, batch, (height, width), timesteps, gen, guidance_scale)
            elif component == "transformer":
                cases += transformer_cases(pipe, manifest, batch, (height, width), timesteps, gen, guidance_scale)
            elif component_kind(component) == CONTROLNET:
                cases += controlnet_cases(component, pipe, manifest, batch, (height, width), timesteps, gen)
            elif component in ("vae_decoder", TINY_DECODER):
                latents = decoder_latents(manifest, batch, (height, width), gen)
                cases.append(Case(label, {"latent_sample": latents}, batch, height, width))
            else:
                cases.append(Case(label, {"sample": image_batch(height, width, batch)}, batch, height, width))
    return cases
