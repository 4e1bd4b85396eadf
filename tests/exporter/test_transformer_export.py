"""SD3 and Flux exports: the transformer, T5 and 16-channel VAE in optimum's layout, their facts in the
manifest, graphs that stay dynamic in every size and sequence, and folders as well as presets as sources."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sdruntime.manifest import read_manifest

from sdexport import convert, specs
from sdexport.errors import SdexportError
from sdexport.presets import build_from_recipe, resolve_preset


def _convert(source, out: Path, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(str(source), out, log=lambda line: None, **options)


@pytest.fixture
def sd3_export(sd3_32) -> Path:
    return sd3_32


@pytest.fixture
def flux_export(flux32) -> Path:
    return flux32


def _inputs(manifest, component: str) -> list[str]:
    return [spec.name for spec in manifest.components[component].inputs]


def test_sd3_export_is_optimums_layout(sd3_export):
    manifest = read_manifest(sd3_export)
    facts = manifest.pipeline
    assert list(manifest.components) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae_decoder",
        "vae_encoder",
    ]
    assert (facts.family, facts.prediction_type, facts.latent_channels, facts.patch_size) == ("sd3", "flow", 16, 2)
    recipe = json.loads((resolve_preset("sd3-tiny") / "recipe.json").read_text())
    assert facts.vae_shift_factor == recipe["vae"]["shift_factor"]
    assert facts.vae_scaling_factor == recipe["vae"]["scaling_factor"]
    assert (facts.max_sequence_length, facts.t5_pad_token_id, facts.guidance_embeds) == (256, 0, None)
    assert manifest.size_multiple == facts.vae_scale_factor * facts.patch_size
    assert _inputs(manifest, "transformer") == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
    ]
    assert [o.name for o in manifest.components["text_encoder"].outputs][:2] == ["text_embeds", "last_hidden_state"]
    assert [o.name for o in manifest.components["text_encoder_3"].outputs] == ["last_hidden_state"]
    index = json.loads((sd3_export / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert "tokenizer_3/tokenizer.json" in [f.path for f in manifest.config_files]


def test_flux_export_is_optimums_layout(flux_export):
    manifest = read_manifest(flux_export)
    facts = manifest.pipeline
    assert "text_encoder_3" not in manifest.components
    assert (facts.family, facts.guidance_embeds, facts.max_sequence_length) == ("flux", True, 512)
    assert _inputs(manifest, "transformer") == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "txt_ids",
        "img_ids",
        "guidance",
    ]
    transformer = manifest.components["transformer"]
    assert transformer.input("hidden_states").shape == ("batch", "packed_sequence", 64)
    assert transformer.input("img_ids").dtype == "float32"
    assert [o.name for o in manifest.components["text_encoder_2"].outputs] == ["last_hidden_state"]
    assert json.loads((flux_export / "model_index.json").read_text())["_class_name"] == "ORTFluxPipeline"


def test_flux_schnell_has_no_guidance_input(tmp_path):
    manifest = read_manifest(_convert("flux-schnell-tiny", tmp_path / "out", components=["transformer"]))
    assert manifest.pipeline.guidance_embeds is False
    assert "guidance" not in _inputs(manifest, "transformer")


@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
def test_transformer_and_t5_graphs_are_dynamic(preset, sd3_export, flux_export):
    """Traced at one size and sequence, the graphs match PyTorch at others: a non-square latent, three
    images, 17 T5 tokens and 40 text tokens (Flux's rotary positions, SD3's cropped position embedding)."""
    out = sd3_export if preset == "sd3-tiny" else flux_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = build_from_recipe(resolve_preset(preset))
    for component in ("transformer", specs.t5_component(pipe)):
        inputs = specs.example_inputs(component, pipe, 3, 12, 20, seed=5)
        if component == "transformer":
            inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :40]
            if "txt_ids" in inputs:
                inputs["txt_ids"] = inputs["txt_ids"][:40]
        else:
            inputs = {"input_ids": inputs["input_ids"][:, :17]}
        with torch.no_grad():
            expected = specs.wrap(component, pipe)(*inputs.values()).numpy()
        session = ort.InferenceSession(str(out / component / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4, component


def test_sd3_folder_without_t5_exports_without_it(tmp_path):
    """diffusers lets SD3 run without T5 (text_encoder_3=None): the folder converts, the export has no T5."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = build_from_recipe(resolve_preset("sd3-tiny"))
        type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None}).save_pretrained(tmp_path / "src")
    manifest = read_manifest(_convert(tmp_path / "src", tmp_path / "out"))
    assert "text_encoder_3" not in manifest.components
    assert manifest.pipeline.t5_max_length is None
    assert not (tmp_path / "out" / "tokenizer_3").exists()


def test_flux_folder_converts_like_its_preset(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_from_recipe(resolve_preset("flux-schnell-tiny")).save_pretrained(tmp_path / "src")
    folder = read_manifest(_convert(tmp_path / "src", tmp_path / "a", components=["transformer"]))
    preset = read_manifest(_convert("flux-schnell-tiny", tmp_path / "b", components=["transformer"]))
    assert folder.pipeline == preset.pipeline
    assert folder.components["transformer"].files[-1].sha256 == preset.components["transformer"].files[-1].sha256


def test_static_transformer_exports_are_refused(tmp_path):
    with pytest.raises(SdexportError, match="--static is not supported for SD3 exports"):
        _convert("sd3-tiny", tmp_path / "out", static=True)
    assert not (tmp_path / "out").exists()


def test_loras_and_controlnets_are_refused_for_transformer_families(tmp_path, sd3_export):
    from sdexport.adding import add_controlnet

    with pytest.raises(SdexportError, match="--controlnet is not supported for SD3 pipelines yet"):
        _convert("sd3-tiny", tmp_path / "a", controlnets=["tiny-controlnet"])
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4)}, lora)
    with pytest.raises(SdexportError, match="--lora is not supported for Flux pipelines yet"):
        _convert("flux-tiny", tmp_path / "b", loras=[str(lora)])
    with pytest.raises(SdexportError, match="an export of SD3, for which ControlNets are not supported"):
        add_controlnet(sd3_export, "tiny-controlnet")
    with pytest.MonkeyPatch.context() as patch:  # refused before anything is exported
        patch.setattr("sdexport.converting.export_all", lambda *a: pytest.fail("exported before refusing"))
        with pytest.raises(SdexportError, match="--quantize supports U-Net pipelines"):
            _convert("sd3-tiny", tmp_path / "c", quantize="int8")
    assert not any((tmp_path / name).exists() for name in "abc")
