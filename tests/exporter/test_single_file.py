"""Single-file SD 1.x / 2.x checkpoints: our detection and refusals, offline loading with the shipped
or given configs, and exports that match PyTorch; 9-channel inpainting ones inpaint as diffusers'
StableDiffusionInpaintPipeline does. The checkpoints are written by tests/exporter/ldm_layout.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sdruntime.manifest import load_schema, read_manifest

from sdexport import convert
from sdexport.presets import models_dir
from sdexport.single_file import checkpoint_family

from ..conftest import build, recipe_of, sd2_style_pipeline
from .ldm_layout import (
    SDXL_CLIP,
    SDXL_OPEN_CLIP,
    clip_to_ldm,
    ldm_checkpoints,
    open_clip_to_ldm,
    pipeline_to_ldm,
    save_configs,
    unet_to_ldm,
    vae_to_ldm,
)
from .test_cli import assert_refused, run
from .test_convert import COMPONENTS, latent_sizes, run_both

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


class TrainingCallback:
    """Stands for the Lightning callbacks real .ckpt files pickle next to the weights."""


def quiet_convert(source, out, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(str(source), out, log=lambda line: None, **kw)


@pytest.fixture(scope="session")
def checkpoints(tiny_pipe, tmp_path_factory):
    return ldm_checkpoints(tmp_path_factory.getbasetemp() / "ldm-checkpoints", tiny_pipe)


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def single_file_export(request, checkpoints, tmp_path_factory):
    """(family, checkpoint entry, export folder): the SD 1.x one and the SD 2.x v-prediction one."""
    case = checkpoints[request.param]
    out = quiet_convert(
        case["file"], tmp_path_factory.mktemp("single-file") / request.param, config=str(case["configs"])
    )
    return request.param, case, out


@pytest.mark.parametrize("component", COMPONENTS)
def test_export_matches_pytorch(single_file_export, component):
    _, case, out = single_file_export
    pipe = case["pipe"]
    for batch, hw in ((1, latent_sizes(pipe)[0]), (2, latent_sizes(pipe)[1])):
        expected, got = run_both(pipe, out, component, batch, hw)
        for e, g in zip(expected, got):
            assert e.shape == g.shape
            assert np.max(np.abs(e - g)) <= 1e-4


def test_manifest_records_the_file_and_family(single_file_export):
    family, case, out = single_file_export
    manifest = read_manifest(out)
    assert manifest.source.to_json() == {
        "kind": "single_file",
        "name": str(case["file"].resolve()),
        "loras": [],
        "vae": "pipeline",
    }
    facts = manifest.pipeline
    assert facts.family == family
    assert facts.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[family]
    assert facts.pad_token_id == {"sd1": 49407, "sd2": 0}[family]  # <|endoftext|> vs "!"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(manifest.to_json(), load_schema())


def test_prediction_type_override(capsys, checkpoints, tmp_path):
    case = checkpoints["sd2"]
    code, _, err = run(
        capsys,
        "convert",
        str(case["file"]),
        "--config",
        str(case["configs"]),
        "--prediction-type",
        "epsilon",
        "--components",
        "text_encoder",
        "--no-check",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    assert read_manifest(tmp_path / "out").pipeline.prediction_type == "epsilon"
    saved = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "epsilon" and saved["_class_name"] == "DDIMScheduler"


def test_pickle_checkpoint_with_allow_pickle(checkpoints, tmp_path):
    from safetensors.torch import load_file

    case = checkpoints["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(case["file"]), "global_step": 10, "epoch": 1}, ckpt)
    out = quiet_convert(
        ckpt, tmp_path / "out", config=str(case["configs"]), allow_pickle=True, components=["text_encoder"]
    )
    expected, got = run_both(case["pipe"], out, "text_encoder", 1, (1, 1))
    assert max(np.max(np.abs(e - g)) for e, g in zip(expected, got)) <= 1e-4


@pytest.mark.parametrize(
    ("family", "shipped", "text_encoder"),
    [
        ("sd1", "sd15", clip_to_ldm),
        ("sd2", "sd21", open_clip_to_ldm),
        ("sd1", "sd15-inpainting", clip_to_ldm),
        ("sd2", "sd2-inpainting", open_clip_to_ldm),
    ],
)
def test_shipped_configs_take_full_size_layouts(family, shipped, text_encoder):
    """SD 1.5 / 2.1-sized models (and the 9-channel inpainting ones) on the meta device, written in the
    original layout: our detection says the family, and diffusers' own converters turn every key back
    into the shipped configs' shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdexport.single_file import check_fits, config_folder, is_inpainting

    folder = models_dir() / "configs" / shipped
    configs = {
        name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoder(text)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert checkpoint_family(shapes, "model") == family
    assert is_inpainting(shapes) == shipped.endswith("-inpainting")
    assert config_folder(family, None, is_inpainting(shapes)) == folder
    check_fits(shapes, family, folder, custom=False)
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text": convert_ldm_clip_checkpoint(state) if family == "sd1" else convert_open_clip_checkpoint(text, state),
    }
    for name, model in (("unet", unet), ("vae", vae), ("text", text)):
        got = {k: tuple(v.shape) for k, v in converted[name].items() if not k.endswith("position_ids")}
        assert got == {k: tuple(v.shape) for k, v in model.state_dict().items()}, name


# --- refusals: one line, exit code 2, nothing written -------------------------------------------------------


def tensors(**shapes) -> dict[str, torch.Tensor]:
    return {key.replace("__", "."): torch.zeros(shape) for key, shape in shapes.items()}


SD1_TEXT = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}
SD_VAE = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (
            {
                **tensors(
                    conditioner__embedders__0__transformer__text_model__embeddings__position_embedding__weight=(77, 8)
                ),
                CONV_IN: torch.zeros(8, 4, 3, 3),
                **SD_VAE,
            },
            "is an SDXL checkpoint without its second text encoder (conditioner.embedders.1.model.* keys)",
        ),
        (
            {
                **tensors(conditioner__embedders__0__model__text_projection=(8, 8)),
                CONV_IN: torch.zeros(8, 4, 3, 3),
                **SD_VAE,
            },
            "is an SDXL refiner checkpoint",
        ),
        (
            {
                **tensors(
                    conditioner__embedders__0__transformer__text_model__embeddings__position_embedding__weight=(77, 8),
                    conditioner__embedders__1__model__text_projection=(8, 8),
                ),
                CONV_IN: torch.zeros(8, 9, 3, 3),
                **SD_VAE,
            },
            "is an SDXL inpainting checkpoint (9-channel U-Net): SDXL inpainting is not supported yet",
        ),
        ({CONV_IN: torch.zeros(8, 8, 3, 3), **SD_VAE, **SD1_TEXT}, "8 input channels"),
        (
            {
                "control_model.time_embed.0.weight": torch.zeros(8, 4),
                "control_model.input_hint_block.0.weight": torch.zeros(4),
            },
            "not a pipeline: pass a base model as SOURCE and this file with --controlnet",
        ),
        (
            {"encoder.layers.0.weight": torch.zeros(4), "head.weight": torch.zeros(4)},
            "expected the original (LDM) layout: model.diffusion_model.*",
        ),
        ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4)}, "found down_blocks.* (1 key)"),
        ({CONV_IN: torch.zeros(8, 4, 3, 3), **SD_VAE}, "has no text encoder weights"),
        ({CONV_IN: torch.zeros(8, 4, 3, 3), **SD1_TEXT}, "has no VAE weights"),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)},
            "is a LoRA, not a model",
        ),
    ],
    ids=[
        "sdxl-one-encoder",
        "sdxl-refiner",
        "sdxl-inpainting",
        "pix2pix",
        "controlnet",
        "unknown",
        "diffusers-layout",
        "no-text-encoder",
        "no-vae",
        "lora",
    ],
)
def test_detection_refusals(capsys, tmp_path, keys, says):
    save_file(keys, tmp_path / "model.safetensors")
    assert_refused(capsys, tmp_path / "out", str(tmp_path / "model.safetensors"), says=says)


def test_not_a_safetensors_file(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_refused(
        capsys, tmp_path / "out", str(tmp_path / "model.safetensors"), says="is not a readable safetensors file"
    )


def test_pickle_needs_allow_pickle(capsys, tmp_path):
    torch.save({"state_dict": {CONV_IN: torch.zeros(1)}}, tmp_path / "model.ckpt")
    assert_refused(capsys, tmp_path / "out", str(tmp_path / "model.ckpt"), says="pass --allow-pickle")


def test_pickle_with_objects_is_refused_under_allow_pickle(capsys, tmp_path):
    torch.save(
        {"state_dict": {CONV_IN: torch.zeros(8, 4, 3, 3)}, "callbacks": [TrainingCallback()]}, tmp_path / "model.ckpt"
    )
    assert_refused(
        capsys,
        tmp_path / "out",
        str(tmp_path / "model.ckpt"),
        "--allow-pickle",
        says="pickles more than tensors (an object of type tests.exporter.test_single_file.TrainingCallback",
    )


def test_shipped_configs_do_not_fit_a_tiny_checkpoint(capsys, checkpoints, tmp_path):
    assert_refused(
        capsys, tmp_path / "out", str(checkpoints["sd1"]["file"]), says="does not fit the shipped sd1 configs"
    )


def test_config_of_another_family(capsys, checkpoints, tmp_path):
    assert_refused(
        capsys,
        tmp_path / "out",
        str(checkpoints["sd2"]["file"]),
        "--config",
        str(checkpoints["sd1"]["configs"]),
        says="its text encoder is 48 wide, the config says 32",
    )


def test_config_folder_without_configs(capsys, checkpoints, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(
        capsys,
        tmp_path / "out",
        str(checkpoints["sd1"]["file"]),
        "--config",
        str(tmp_path / "empty"),
        says="has no model_index.json",
    )


def test_checkpoint_missing_weights(capsys, checkpoints, tmp_path):
    from safetensors.torch import load_file

    case = checkpoints["sd1"]
    state = {k: v for k, v in load_file(case["file"]).items() if "middle_block.1." not in k}
    save_file(state, tmp_path / "partial.safetensors")
    assert_refused(
        capsys,
        tmp_path / "out",
        str(tmp_path / "partial.safetensors"),
        "--config",
        str(case["configs"]),
        says="lacks weights that the configs in",
    )


@pytest.mark.parametrize(
    ("flag", "value"), [("--config", "models/configs/sd15"), ("--prediction-type", "epsilon"), ("--allow-pickle", None)]
)
def test_single_file_options_on_other_sources(capsys, tmp_path, flag, value):
    args = [flag] + ([value] if value else [])
    assert_refused(capsys, tmp_path / "out", "tiny-sd", *args, says=f"{flag} applies to single-file checkpoints only")


# --- SDXL -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sdxl_single_file(tmp_path_factory):
    """(file, configs folder, pipeline): sdxl-tiny with a 48-wide second text encoder (SDXL's two encoders
    differ in width, 768 and 1280, and diffusers tells them apart by it) in the original SGM layout."""
    root = tmp_path_factory.mktemp("sdxl-single-file")
    tiny = recipe_of("sdxl-tiny")
    encoder_2 = {**tiny["text_encoder_2"], "hidden_size": 48}
    unet = {**tiny["unet"], "cross_attention_dim": 32 + 48}
    pipe = build({**tiny, "text_encoder_2": encoder_2, "unet": unet}, root / "recipe")
    file = root / "sdxl.safetensors"
    save_file(pipeline_to_ldm(pipe, "sdxl"), file)
    return file, save_configs(pipe, root / "configs"), pipe


def test_sdxl_single_file_loads_every_weight(sdxl_single_file):
    from sdexport.single_file import load_single_file

    file, configs, pipe = sdxl_single_file
    loaded, family = load_single_file(file, str(configs))
    assert family == "sdxl" and type(loaded).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(pipe, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert set(got) == set(expected), name
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    assert loaded.tokenizer.pad_token_id == 49407 and loaded.tokenizer_2.pad_token_id == 0  # "!", as OpenCLIP pads


def test_sdxl_single_file_exports(sdxl_single_file, tmp_path):
    file, configs, _ = sdxl_single_file
    out = quiet_convert(file, tmp_path / "out", config=str(configs))
    manifest = read_manifest(out)
    assert manifest.source.kind == "single_file" and manifest.pipeline.family == "sdxl"
    assert manifest.pipeline.text_encoder_2_hidden_size == 48 and manifest.pipeline.tokenizer_2_pad_token_id == 0
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    for component, entry in manifest.components.items():
        assert entry.export_relative_l2 is not None and entry.export_relative_l2 <= 1e-4, component


def test_sdxl_shipped_configs_take_the_full_size_layout():
    """SDXL base 1.0-sized, on the meta device, written in the original layout: detected as SDXL, fits the
    shipped configs, and diffusers' converters turn every key back into those configs' shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdexport.single_file import check_fits, config_folder

    folder = models_dir() / "configs" / "sdxl"
    configs = {
        name: json.loads((folder / name / "config.json").read_text())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    state = {
        **unet_to_ldm(unet),
        **vae_to_ldm(vae),
        **clip_to_ldm(text, SDXL_CLIP),
        **open_clip_to_ldm(text_2, SDXL_OPEN_CLIP),
    }
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert checkpoint_family(shapes, "model") == "sdxl"
    assert config_folder("sdxl", None) == folder
    check_fits(shapes, "sdxl", folder, custom=False)
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text": convert_ldm_clip_checkpoint(state, SDXL_CLIP),
        "text_2": convert_open_clip_checkpoint(text_2, state, prefix=SDXL_OPEN_CLIP),
    }
    for name, model in (("unet", unet), ("vae", vae), ("text", text), ("text_2", text_2)):
        got = {k: tuple(v.shape) for k, v in converted[name].items() if not k.endswith("position_ids")}
        assert got == {k: tuple(v.shape) for k, v in model.state_dict().items()}, name


def test_sdxl_checkpoint_with_sd_configs(capsys, sdxl_single_file, checkpoints, tmp_path):
    file, _, _ = sdxl_single_file
    assert_refused(
        capsys,
        tmp_path / "out",
        str(file),
        "--config",
        str(checkpoints["sd1"]["configs"]),
        says="has no text_encoder_2",
    )


def test_sd_checkpoint_with_sdxl_configs(capsys, checkpoints, tmp_path):
    assert_refused(
        capsys,
        tmp_path / "out",
        str(checkpoints["sd1"]["file"]),
        "--config",
        str(models_dir() / "configs" / "sdxl"),
        says="holds an SDXL pipeline, but the checkpoint is SD 1.x",
    )


# --- inpainting (9-channel U-Nets) ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def inpaint_single_file(tmp_path_factory):
    """(file, configs folder, pipeline, export): the tiny-sd-inpaint preset in the original layout, converted."""
    from sdexport.presets import build_from_recipe, resolve_preset

    root = tmp_path_factory.mktemp("inpaint-single-file")
    pipe = build_from_recipe(resolve_preset("tiny-sd-inpaint"))
    file = root / "inpaint.safetensors"
    save_file(pipeline_to_ldm(pipe, "sd1"), file)
    configs = save_configs(pipe, root / "configs")
    return file, configs, pipe, quiet_convert(file, root / "out", config=str(configs))


def test_inpainting_single_file_records_nine_channels(inpaint_single_file):
    from sdexport.artifacts import model_index

    file, _, pipe, out = inpaint_single_file
    manifest = read_manifest(out)
    assert manifest.source.kind == "single_file" and manifest.pipeline.family == "sd1"
    assert (manifest.pipeline.latent_channels, manifest.pipeline.unet_in_channels) == (4, 9)
    sample = next(t for t in manifest.components["unet"].inputs if t.name == "sample")
    assert sample.shape[1] == 9
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == model_index(pipe)["_class_name"]  # what the preset's own export writes


def test_inpainting_single_file_loads_as_inpaint_pipeline(inpaint_single_file):
    from sdexport.single_file import load_single_file

    file, configs, pipe, _ = inpaint_single_file
    loaded, family = load_single_file(file, str(configs))
    assert family == "sd1" and type(loaded).__name__ == "StableDiffusionInpaintPipeline"
    assert loaded.unet.config.in_channels == 9
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


@pytest.mark.parametrize("component", ["unet", "vae_encoder"])
def test_inpainting_single_file_matches_pytorch(inpaint_single_file, component):
    _, _, pipe, out = inpaint_single_file
    for batch, hw in ((1, latent_sizes(pipe)[0]), (2, latent_sizes(pipe)[1])):
        expected, got = run_both(pipe, out, component, batch, hw)
        for e, g in zip(expected, got):
            assert e.shape == g.shape
            assert np.max(np.abs(e - g)) <= 1e-4


def test_inpainting_single_file_inpaints_like_diffusers(inpaint_single_file):
    pytest.importorskip("ftfy")  # the reference tokenizer must read prompts as CLIP does
    import diffusers
    from PIL import Image
    from sdruntime import StableDiffusionPipeline

    _, _, pipe, out = inpaint_single_file
    y, x = np.mgrid[0:64, 0:64]
    image = Image.fromarray(np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8))
    mask = Image.fromarray((((x > 20) & (x < 50) & (y > 12)) * 255).astype(np.uint8))
    prompt, args = "a red circle on a blue background", {"num_inference_steps": 6, "guidance_scale": 7.5}
    reference = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt, image=image, mask_image=mask, generator=torch.Generator().manual_seed(3), **args)
    mine = StableDiffusionPipeline.load(out)(prompt, image=image, mask_image=mask, seed=3, **args)
    a, b = np.asarray(theirs.images[0], np.float64), np.asarray(mine.images[0], np.float64)
    mse = np.mean((a - b) ** 2)
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 45.0


def test_sd2_inpainting_single_file_loads(tmp_path):
    """SD 2's 512-inpainting layout: OpenCLIP text, a 9-channel U-Net with linear projections."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from sdexport.single_file import load_single_file

    base = sd2_style_pipeline("epsilon")
    torch.manual_seed(9)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    save_file(pipeline_to_ldm(pipe, "sd2"), tmp_path / "sd2-inpaint.safetensors")
    loaded, family = load_single_file(tmp_path / "sd2-inpaint.safetensors", str(save_configs(pipe, tmp_path / "c")))
    assert family == "sd2" and type(loaded).__name__ == "StableDiffusionInpaintPipeline"
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(got[key], value) for key, value in expected.items()), name


def test_inpainting_checkpoint_with_text_to_image_configs(capsys, inpaint_single_file, checkpoints, tmp_path):
    file, _, _, _ = inpaint_single_file
    assert_refused(
        capsys,
        tmp_path / "out",
        str(file),
        "--config",
        str(checkpoints["sd1"]["configs"]),
        says="its U-Net's input (9 channels to inpaint, else 4) is 9 wide, the config says 4",
    )
