"""Which Stable Diffusion families the exporter handles, and which family a loaded pipeline is."""

from __future__ import annotations

from .errors import SdexportError

SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "OnnxStableDiffusionPipeline",
    "LatentConsistencyModelPipeline",
}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}
FLUX_PIPELINES = {"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"}
TRANSFORMER_PIPELINES = SD3_PIPELINES | FLUX_PIPELINES
SUPPORTED_PIPELINES = SD_PIPELINES | SDXL_PIPELINES | TRANSFORMER_PIPELINES


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}


def index_family(model_index: dict) -> str | None:
    """sd3 or flux for a transformer pipeline's model_index.json, else None (a U-Net pipeline)."""
    cls = model_index.get("_class_name", "")
    if cls in SD3_PIPELINES or cls.startswith("ORTStableDiffusion3"):
        return "sd3"
    if cls in FLUX_PIPELINES or cls.startswith("ORTFlux"):
        return "flux"
    return None


def is_sdxl_index(model_index: dict, unet_config: dict) -> bool:
    cls = model_index.get("_class_name", "")
    if index_family(model_index):
        return False
    return "XL" in cls or "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time"


def check_supported(model_index: dict, unet_config: dict, where: str) -> None:
    """Refuse pipeline families the exporter does not handle yet, naming what was found."""
    cls = model_index.get("_class_name", "")
    if cls in TRANSFORMER_PIPELINES:
        return
    if "controlnet" in model_index or "ControlNet" in cls:
        raise SdexportError(f"{where} is a ControlNet pipeline ({cls}): ControlNet is not supported yet")
    embed = unet_config.get("addition_embed_type")
    if embed not in (None, "text_time"):
        raise SdexportError(
            f"{where} has a U-Net with addition_embed_type '{embed}': only SDXL's 'text_time' is supported"
        )
    if unet_config.get("class_embed_type") is not None:
        raise SdexportError(
            f"{where} has a U-Net with class_embed_type '{unet_config['class_embed_type']}' "
            "(an upscaler or unCLIP): not supported"
        )
    if cls and cls not in SUPPORTED_PIPELINES:
        raise SdexportError(
            f"{where} is a {cls}: only Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux text-to-image, image-to-image "
            "and inpainting pipelines are supported"
        )
    if is_sdxl_index(model_index, unet_config) and embed != "text_time" and unet_config:
        raise SdexportError(f"{where} is an SDXL pipeline whose U-Net lacks addition_embed_type 'text_time'")


def pipeline_family(pipe) -> str:
    """sd3 or flux for the transformer pipelines; sdxl for SDXL's text_time U-Nets; sd2 for SD 2.x-shaped
    U-Nets (linear projections, per-block head dims), else sd1."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return "flux" if type(transformer).__name__ == "FluxTransformer2DModel" else "sd3"
    config = pipe.unet.config
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return (
        "sd2" if config.get("use_linear_projection") or isinstance(config.attention_head_dim, (list, tuple)) else "sd1"
    )
