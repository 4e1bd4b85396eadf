"""Session-scoped test models: each is built and exported once per test session."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "clip-tokenizer"


def sd2_style_pipeline(prediction_type: str):
    """A pipeline with another block layout than tiny-sd: SD 2.x-style linear projections,
    per-block head dims, upcast attention, three U-Net levels, a 4x VAE and "!" padding."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(7)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=48,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=48,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    tokenizer = CLIPTokenizer(
        str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), pad_token="!", model_max_length=77
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _quiet_convert(source, out, **kw):
    from sdexport import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(str(source), out, log=lambda line: None, **kw)


@pytest.fixture(scope="session")
def tiny_pipe():
    from sdexport.presets import build_from_recipe, resolve_preset

    return build_from_recipe(resolve_preset("tiny-sd"))


@pytest.fixture(scope="session")
def runtime_loras(tiny_pipe, tmp_path_factory) -> dict:
    """Two LoRAs on tiny-sd's U-Net and text encoder, each written in diffusers and kohya-ss format
    (tests/exporter/test_lora.py make_lora): "a" rank 4, alpha 2; "b" rank 2, alpha 2."""
    from tests.exporter.test_lora import make_lora

    root = tmp_path_factory.mktemp("runtime-loras")
    return {
        "a": make_lora(tiny_pipe, root / "a", seed=1, rank=4, alpha=2),
        "b": make_lora(tiny_pipe, root / "b", seed=2, rank=2, alpha=2),
    }


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory) -> Path:
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("exports") / "tiny32")


@pytest.fixture(scope="session")
def tiny_inpaint32(tmp_path_factory) -> Path:
    """The tiny-sd-inpaint preset (a 9-channel U-Net), exported fp32."""
    return _quiet_convert("tiny-sd-inpaint", tmp_path_factory.mktemp("exports") / "tiny_inpaint32")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint32(tmp_path_factory) -> Path:
    """The tiny-sdxl-inpaint preset (SDXL with a 9-channel U-Net), exported fp32."""
    return _quiet_convert("tiny-sdxl-inpaint", tmp_path_factory.mktemp("exports") / "tiny_sdxl_inpaint32")


@pytest.fixture(scope="session")
def tiny_controlnet32(tmp_path_factory) -> Path:
    """tiny-sd with the tiny-controlnet preset as the ControlNet "edges", exported fp32."""
    folder = tmp_path_factory.mktemp("exports") / "tiny_controlnet32"
    return _quiet_convert("tiny-sd", folder, controlnets=["edges=tiny-controlnet"])


@pytest.fixture(scope="session")
def tiny16(tmp_path_factory) -> Path:
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("exports") / "tiny16", dtype="fp16")


@pytest.fixture(scope="session")
def tiny_cpu32(tmp_path_factory) -> Path:
    """tiny-sd for the cpu target (ORT's offline optimization: NCHWc-blocked convolutions), fp32."""
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("exports") / "tiny_cpu32", target="cpu")


@pytest.fixture(scope="session")
def tiny_cuda16(tmp_path_factory) -> Path:
    """tiny-sd for the cuda target (NhwcConv, packed Q/K/V and K/V attention), fp16."""
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("exports") / "tiny_cuda16", target="cuda", dtype="fp16")


@pytest.fixture(scope="session")
def tiny_taesd32(tmp_path_factory) -> Path:
    """tiny-sd with the tiny-taesd preset (a small AutoencoderTiny) exported beside its VAE as vae_decoder_tiny."""
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("exports") / "tiny_taesd32", tiny_vae="tiny-taesd")


@pytest.fixture(scope="session")
def tiny_vae_folder(tmp_path_factory) -> Path:
    """A saved AutoencoderTiny for tiny-sd's latents whose scaling factor is 0.5, not TAESD's 1.0: a decode or
    encode that skips or swaps scaling factors shows."""
    from sdexport.presets import build_tiny_vae, tiny_vae_presets

    recipe = json.loads((tiny_vae_presets()["tiny-taesd"] / "recipe.json").read_text())
    config = {**recipe["config"], "scaling_factor": 0.5}
    folder = tmp_path_factory.mktemp("tiny-vae") / "taesd-half"
    build_tiny_vae(config, seed=9).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae_replaced32(tmp_path_factory, tiny_vae_folder) -> Path:
    """tiny-sd with its VAE replaced outright by tiny_vae_folder's AutoencoderTiny (`--vae`), fp32."""
    out = tmp_path_factory.mktemp("exports") / "tiny_vae_replaced32"
    return _quiet_convert("tiny-sd", out, vae=str(tiny_vae_folder))


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory) -> Path:
    """The shipped shapes model (trained, 22 MB): pictures whose content a test can check."""
    return _quiet_convert("shapes", tmp_path_factory.mktemp("exports") / "shapes32")


@pytest.fixture(scope="session", params=["epsilon", "v_prediction"])
def sd2_case(request, tmp_path_factory):
    """(pipeline folder, PyTorch pipeline, fp32 export) for each prediction type."""
    root = tmp_path_factory.mktemp(f"sd2-{request.param}")
    pipe = sd2_style_pipeline(request.param)
    pipe.save_pretrained(root / "pipeline")
    out = _quiet_convert(root / "pipeline", root / "export")
    return root / "pipeline", pipe, out


# -- SDXL and LCM ------------------------------------------------------------------------------------


def recipe_of(preset: str) -> dict:
    return json.loads((REPO / "models" / preset / "recipe.json").read_text())


def build(recipe: dict, folder: Path):
    """A pipeline from a recipe written to `folder` (tokenizers by absolute path)."""
    from sdexport.presets import build_from_recipe

    folder.mkdir(parents=True, exist_ok=True)
    recipe = {**recipe, "tokenizer": str(TOKENIZER), "tokenizer_2": str(TOKENIZER)}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_from_recipe(folder)


def saved(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def sdxl_pipe():
    from sdexport.presets import build_from_recipe, resolve_preset

    return build_from_recipe(resolve_preset("sdxl-tiny"))


@pytest.fixture(scope="session")
def sdxl32(tmp_path_factory) -> Path:
    return _quiet_convert("sdxl-tiny", tmp_path_factory.mktemp("sdxl") / "fp32")


@pytest.fixture(scope="session")
def sdxl16(tmp_path_factory) -> Path:
    return _quiet_convert("sdxl-tiny", tmp_path_factory.mktemp("sdxl") / "fp16", dtype="fp16")


@pytest.fixture(scope="session")
def refiner_case(tmp_path_factory):
    """(folder, pipeline, export) of a tiny SDXL refiner saved as a diffusers folder: text_encoder_2
    only, aesthetic-score time ids (5 x 8 + 32 = 72 added-embedding inputs), cross-attention on
    text_encoder_2's 32 widths."""
    root = tmp_path_factory.mktemp("refiner")
    tiny = recipe_of("sdxl-tiny")
    unet = {**tiny["unet"], "projection_class_embeddings_input_dim": 72, "cross_attention_dim": 32}
    recipe = {k: v for k, v in tiny.items() if k != "text_encoder"}
    pipe = build(
        {**recipe, "unet": unet, "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False},
        root / "recipe",
    )
    folder = saved(pipe, root / "pipeline")
    return folder, pipe, _quiet_convert(folder, root / "export")


@pytest.fixture(scope="session")
def turbo_case(tmp_path_factory):
    """(pipeline, export) of sdxl-tiny with SDXL-Turbo's scheduler: Euler ancestral, trailing spacing."""
    root = tmp_path_factory.mktemp("turbo")
    tiny = recipe_of("sdxl-tiny")
    scheduler = {**tiny["scheduler"], "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
    pipe = build({**tiny, "scheduler": scheduler}, root / "recipe")
    return pipe, _quiet_convert(saved(pipe, root / "pipeline"), root / "export")


@pytest.fixture(scope="session")
def lcm_case(tmp_path_factory):
    """(folder, pipeline, export) of tiny-sd with an LCM-distilled U-Net (time_cond_proj_dim)."""
    root = tmp_path_factory.mktemp("lcm")
    tiny = recipe_of("tiny-sd")
    pipe = build({**tiny, "unet": {**tiny["unet"], "time_cond_proj_dim": 32}}, root / "recipe")
    folder = saved(pipe, root / "pipeline")
    return folder, pipe, _quiet_convert(folder, root / "export")


# -- SD3 and Flux ------------------------------------------------------------------------------------


def _transformer_pipe(preset: str):
    """The diffusers pipeline of a transformer preset (seeded random weights), quiet while it builds."""
    from sdexport.presets import build_from_recipe, models_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = build_from_recipe(models_dir() / preset)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd3_pipe():
    return _transformer_pipe("sd3-tiny")


@pytest.fixture(scope="session")
def sd3_32(tmp_path_factory) -> Path:
    """sd3-tiny, every component, fp32."""
    return _quiet_convert("sd3-tiny", tmp_path_factory.mktemp("sd3") / "fp32")


@pytest.fixture(scope="session")
def sd3_no_t5_32(tmp_path_factory) -> Path:
    """sd3-tiny without T5 (text_encoder_3), as diffusers draws SD3 with text_encoder_3=None."""
    parts = ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    return _quiet_convert("sd3-tiny", tmp_path_factory.mktemp("sd3") / "no_t5", components=parts)


@pytest.fixture(scope="session")
def flux_pipe():
    return _transformer_pipe("flux-tiny")


@pytest.fixture(scope="session")
def flux32(tmp_path_factory) -> Path:
    """flux-tiny (dev: embedded guidance, dynamic shifting), every component, fp32."""
    return _quiet_convert("flux-tiny", tmp_path_factory.mktemp("flux") / "fp32")


@pytest.fixture(scope="session")
def flux_schnell_pipe():
    return _transformer_pipe("flux-schnell-tiny")


@pytest.fixture(scope="session")
def flux_schnell32(tmp_path_factory) -> Path:
    """flux-schnell-tiny for text-to-image (no VAE encoder), fp32."""
    parts = ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    return _quiet_convert("flux-schnell-tiny", tmp_path_factory.mktemp("flux") / "schnell", components=parts)
