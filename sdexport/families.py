"""Which Stable Diffusion families the exporter handles, and which family a loaded pipeline is."""

from __future__ import annotations

from .errors import SdexportError

SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline"}


def check_supported(model_index: dict, unet_config: dict, where: str) -> None:
    """Refuse pipeline families the exporter does not handle yet, naming what was found."""
    cls = model_index.get("_class_name", "")
    if "XL" in cls or "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        raise SdexportError(f"{where} is an SDXL pipeline ({cls or 'text_time U-Net'}): SDXL is not supported yet")
    if "controlnet" in model_index or "ControlNet" in cls:
        raise SdexportError(f"{where} is a ControlNet pipeline ({cls}): ControlNet is not supported yet")
    if unet_config.get("in_channels", 4) == 9 or "Inpaint" in cls:
        raise SdexportError(
            f"{where} is an inpainting pipeline (9-channel U-Net): inpainting is not supported yet"
        )
    if unet_config.get("time_cond_proj_dim") is not None:
        raise SdexportError(
            f"{where} has an LCM U-Net with timestep_cond (time_cond_proj_dim="
            f"{unet_config['time_cond_proj_dim']}): LCM-distilled U-Nets are not supported yet"
        )
    if cls and cls not in SUPPORTED_PIPELINES:
        raise SdexportError(
            f"{where} is a {cls}: only Stable Diffusion 1.x/2.x text-to-image pipelines are supported"
        )


def pipeline_family(pipe) -> str:
    """sd2 for SD 2.x-shaped U-Nets (linear projections, per-block head dims), else sd1."""
    config = pipe.unet.config
    return "sd2" if config.get("use_linear_projection") or isinstance(config.attention_head_dim, (list, tuple)) else "sd1"
