"""SDXL and LCM exports: graphs against PyTorch, the IO names and manifest facts, optimum's
ORTStableDiffusionXL pipelines against diffusers, fp16 with an fp32 VAE, --vae, refused families."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from sdruntime.manifest import facts_io, load_schema, read_manifest

from sdexport.errors import SdexportError
from sdexport.families import check_supported

from ..conftest import _quiet_convert
from .test_convert import latent_sizes, run_both

SDXL_COMPONENTS = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]


# the tiny U-Nets' ControlNet residual inputs: conv_in's, one resnet's and the downsampler's, the second
# block's resnet's, then the mid block's
RESIDUALS = [f"down_block_additional_residual_{i}" for i in range(4)] + ["mid_block_additional_residual"]


def max_abs(expected, got) -> float:
    return max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got))


@pytest.mark.parametrize("component", SDXL_COMPONENTS)
def test_sdxl_graphs_match_pytorch(sdxl_pipe, sdxl32, component):
    for batch in (1, 2):
        for hw in latent_sizes(sdxl_pipe):
            expected, got = run_both(sdxl_pipe, sdxl32, component, batch, hw)
            assert [e.shape for e in expected] == [g.shape for g in got]
            assert max_abs(expected, got) <= 1e-4


def test_sdxl_io_names_follow_optimum(sdxl32):
    manifest = read_manifest(sdxl32)
    assert list(manifest.components) == SDXL_COMPONENTS

    def names(entries):
        return [t.name for t in entries]

    hidden = [f"hidden_states.{i}" for i in range(6)]  # embeddings + 5 layers
    te2 = manifest.components["text_encoder_2"]
    assert names(te2.inputs) == ["input_ids", "attention_mask"]  # optimum feeds input_ids: the mask defaults to ones
    assert names(te2.outputs) == ["text_embeds", "last_hidden_state", *hidden]
    assert names(manifest.components["text_encoder"].outputs) == ["last_hidden_state", "pooler_output", *hidden]
    unet = manifest.components["unet"]
    assert names(unet.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", *RESIDUALS]
    shapes = {t.name: t.shape for t in unet.inputs}
    assert shapes["text_embeds"] == ("batch", 32) and shapes["time_ids"] == ("batch", 6)
    assert shapes["encoder_hidden_states"] == ("batch", "sequence", 64)  # both encoders' widths, concatenated
    for component, entry in manifest.components.items():
        graph = onnx.load(str(sdxl32 / entry.path)).graph
        assert [i.name for i in graph.input] == names(entry.inputs), component
        assert [o.name for o in graph.output] == names(entry.outputs), component
        io = facts_io(manifest.pipeline, component)
        assert [s.name for s in io.inputs + io.outputs] == names(entry.inputs + entry.outputs), component


def test_sdxl_manifest_facts_and_folder(sdxl32):
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads((sdxl32 / "sdexport.json").read_text())
    jsonschema.validate(data, load_schema())
    facts = read_manifest(sdxl32).pipeline
    assert facts.family == "sdxl"
    assert (facts.pad_token_id, facts.tokenizer_2_pad_token_id) == (49407, 0)  # <|endoftext|> and "!"
    assert facts.tokenizer_max_length == facts.tokenizer_2_max_length == 77
    assert facts.force_zeros_for_empty_prompt is True and facts.requires_aesthetics_score is False
    assert (facts.addition_time_embed_dim, facts.projection_class_embeddings_input_dim) == (8, 80)
    assert facts.num_time_ids == 6 and facts.text_encoder_2_projection_dim == 32
    assert (facts.num_hidden_states, facts.num_hidden_states_2, facts.text_encoder_2_hidden_size) == (6, 6, 32)
    assert facts.vae_scaling_factor == pytest.approx(0.13025) and facts.vae_force_upcast is True
    assert facts.time_cond_proj_dim is None
    assert read_manifest(sdxl32).source.vae == "pipeline"
    index = json.loads((sdxl32 / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    for part in ("tokenizer", "tokenizer_2"):
        assert (sdxl32 / part / "tokenizer.json").is_file()
    padding = json.loads((sdxl32 / "tokenizer_2" / "tokenizer.json").read_text())["padding"]
    assert padding["pad_id"] == 0 and padding["pad_token"] == "!"
    hashed = {f["path"] for f in data["config_files"]}
    assert {"tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"} <= hashed


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def generate_both(reference, ort_pipe, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.set_progress_bar_config(disable=True)
        ort_pipe.set_progress_bar_config(disable=True)
        a = reference(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
        b = ort_pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    return a, b


@pytest.mark.parametrize(
    "options",
    [{"negative_prompt": None}, {"negative_prompt": "blurry", "prompt_2": "oil painting"}, {"clip_skip": 1}],
    ids=["zeroed-negative", "negative-and-prompt-2", "clip-skip"],
)
def test_optimum_sdxl_pipeline_matches_diffusers(sdxl_pipe, sdxl32, options):
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    ort_pipe = ORTStableDiffusionXLPipeline.from_pretrained(sdxl32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected, got = generate_both(
        sdxl_pipe,
        ort_pipe,
        prompt="a red panda",
        latents=latents,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        **options,
    )
    assert expected.shape == got.shape == (1, 32, 32, 3)
    assert np.max(np.abs(expected - got)) <= 1e-4 and psnr(expected, got) >= 45


def test_fp16_keeps_the_sdxl_vae_fp32(sdxl_pipe, sdxl16):
    manifest = read_manifest(sdxl16)
    dtypes = {name: entry.dtype for name, entry in manifest.components.items()}
    assert dtypes == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",
        "vae_encoder": "fp32",
    }
    for component in ("vae_decoder", "vae_encoder"):
        graph = onnx.load(str(sdxl16 / component / "model.onnx")).graph
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input)
    unet = manifest.components["unet"]
    assert {t.name: t.dtype for t in unet.inputs} == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
        "text_embeds": "float16",
        "time_ids": "float32",
        **dict.fromkeys(RESIDUALS, "float16"),
    }
    model = onnx.load(str(sdxl16 / "unet" / "model.onnx"))
    sin_cos = [n.name for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(sin_cos) == 4 and set(sin_cos) <= set(unet.fp32_nodes)  # timestep's and time_ids' embeddings
    for component in ("text_encoder_2", "unet"):
        expected, got = run_both(sdxl_pipe, sdxl16, component, 2, latent_sizes(sdxl_pipe)[0])
        for e, g in zip(expected, got):
            assert np.isfinite(g).all() and np.linalg.norm(e - g) / np.linalg.norm(e) <= 1e-2


def test_refiner_exports_with_text_encoder_2_only(refiner_case):
    _, pipe, out = refiner_case
    manifest = read_manifest(out)
    assert list(manifest.components) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert not (out / "text_encoder").exists() and not (out / "tokenizer").exists()
    facts = manifest.pipeline
    assert facts.requires_aesthetics_score is True and facts.force_zeros_for_empty_prompt is False
    assert facts.num_time_ids == 5 and facts.num_hidden_states is None
    assert (facts.tokenizer_max_length, facts.pad_token_id) == (77, 0)  # tokenizer_2's: there is no first one
    assert {t.name: t.shape for t in manifest.components["unet"].inputs}["time_ids"] == ("batch", 5)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]
    for component in manifest.components:
        for hw in latent_sizes(pipe):
            expected, got = run_both(pipe, out, component, 2, hw)
            assert max_abs(expected, got) <= 1e-4, component


def test_optimum_refiner_matches_diffusers(refiner_case):
    from optimum.onnxruntime import ORTStableDiffusionXLImg2ImgPipeline

    _, pipe, out = refiner_case
    ort_pipe = ORTStableDiffusionXLImg2ImgPipeline.from_pretrained(out)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected, got = generate_both(
        pipe,
        ort_pipe,
        prompt="a red panda",
        image=image,
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=5.0,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
    )
    assert expected.shape == got.shape
    assert np.max(np.abs(expected - got)) <= 1e-4 and psnr(expected, got) >= 45


def test_lcm_unet_exports_with_timestep_cond(lcm_case):
    _, pipe, out = lcm_case
    manifest = read_manifest(out)
    assert manifest.pipeline.family == "sd1" and manifest.pipeline.time_cond_proj_dim == 32
    unet = manifest.components["unet"]
    assert [(t.name, t.dtype, t.shape) for t in unet.inputs][3:4] == [("timestep_cond", "float32", ("batch", 32))]
    assert [t.name for t in unet.inputs][4:] == RESIDUALS
    for batch in (1, 2):
        expected, got = run_both(pipe, out, "unet", batch, latent_sizes(pipe)[0])
        assert max_abs(expected, got) <= 1e-4
    # timestep_cond reaches the output: the guidance-scale embedding is not traced away
    from sdexport.specs import example_inputs

    feeds = {k: v.numpy() for k, v in example_inputs("unet", pipe, 1, 8, 8).items()}
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    changed = dict(feeds, timestep_cond=feeds["timestep_cond"] + 1.0)
    assert np.max(np.abs(session.run(None, feeds)[0] - session.run(None, changed)[0])) > 1e-4


def test_vae_option_replaces_the_vae(tmp_path, sdxl_pipe):
    from diffusers import AutoencoderKL

    torch.manual_seed(11)
    fixed = AutoencoderKL.from_config({**dict(sdxl_pipe.vae.config), "force_upcast": False})
    fixed.save_pretrained(tmp_path / "fp16-fix-vae")
    out = _quiet_convert(
        "sdxl-tiny", tmp_path / "out", dtype="fp16", components=["vae_decoder"], vae=str(tmp_path / "fp16-fix-vae")
    )
    manifest = read_manifest(out)
    assert manifest.source.vae == str((tmp_path / "fp16-fix-vae").resolve())
    assert manifest.components["vae_decoder"].dtype == "fp16"  # this VAE does not ask for an upcast
    assert manifest.pipeline.vae_force_upcast is False
    assert json.loads((out / "vae_decoder" / "config.json").read_text())["force_upcast"] is False
    import onnxruntime as ort

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = fixed.decode(latents).sample.numpy()
    session = ort.InferenceSession(str(out / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"latent_sample": latents.numpy().astype(np.float16)})[0].astype(np.float32)
    assert np.linalg.norm(expected - got) / np.linalg.norm(expected) <= 1e-2


def test_vae_option_refuses_what_is_not_a_vae(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdexportError, match="no config.json there") as info:
        _quiet_convert("tiny-sd", tmp_path / "out", components=["vae_decoder"], vae=str(tmp_path / "empty"))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_a_component_the_pipeline_lacks_is_refused(tmp_path):
    with pytest.raises(SdexportError, match="this pipeline has no text_encoder_2: choose --components from"):
        _quiet_convert("tiny-sd", tmp_path / "out", components=["text_encoder_2", "unet"])


def test_validate_checks_sdxl_per_component_and_end_to_end(sdxl32):
    from sdexport.validate import validate

    report = validate("sdxl-tiny", sdxl32, steps=4)
    assert report["ok"], report["failures"]
    assert set(report["components"]) == set(SDXL_COMPONENTS)
    for mode in ("text2img", "img2img"):
        assert report["end_to_end"][mode]["psnr_db"] >= 45.0


def test_validate_a_refiner_from_an_image(refiner_case):
    from sdexport.validate import validate

    folder, _, export = refiner_case
    report = validate(str(folder), export, steps=4)
    assert report["ok"], report["failures"]
    assert report["end_to_end"]["text2img"]["skipped"] == "an SDXL refiner draws from an image only"
    assert report["end_to_end"]["img2img"]["psnr_db"] >= 45.0


def test_validate_an_lcm_unet(lcm_case):
    from sdexport.validate import validate

    folder, _, export = lcm_case
    report = validate(str(folder), export, steps=4, scheduler="lcm")
    assert report["ok"], report["failures"]
    assert report["end_to_end"]["text2img"]["psnr_db"] >= 45.0


def test_convert_validate_sdxl_fp16(tmp_path):
    # a failed validation raises ValidationFailed; the fallback re-exports failing parts in fp32
    out = _quiet_convert("sdxl-tiny", tmp_path / "out", dtype="fp16", validate=True, auto_fp32_fallback=True)
    manifest = read_manifest(out)
    assert manifest.components["vae_decoder"].dtype == "fp32"  # force_upcast
    assert manifest.components["text_encoder_2"].dtype in ("fp16", "fp32")


@pytest.mark.parametrize(
    ("class_name", "unet", "extra", "says"),
    [
        (
            "StableDiffusionXLControlNetPipeline",
            {"addition_embed_type": "text_time"},
            {"controlnet": ["diffusers", "ControlNetModel"]},
            "ControlNet is not supported yet",
        ),
        (
            "KandinskyV22Pipeline",
            {"addition_embed_type": "image"},
            {},
            "addition_embed_type 'image': only SDXL's 'text_time' is supported",
        ),
        ("StableDiffusionUpscalePipeline", {"class_embed_type": "timestep"}, {}, "(an upscaler or unCLIP)"),
        ("PixArtAlphaPipeline", {}, {}, "only Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux"),
        (
            "StableDiffusionXLPipeline",
            {"cross_attention_dim": 2048},
            {"text_encoder_2": ["transformers", "X"]},
            "lacks addition_embed_type 'text_time'",
        ),
    ],
)
def test_families_refuse_what_is_unsupported(class_name, unet, extra, says):
    with pytest.raises(SdexportError, match=None) as info:
        check_supported({"_class_name": class_name, **extra}, unet, "/models/x")
    assert says in str(info.value) and "\n" not in str(info.value) and "/models/x" in str(info.value)


@pytest.mark.parametrize(
    ("class_name", "unet"),
    [
        ("StableDiffusionXLPipeline", {"addition_embed_type": "text_time"}),
        ("StableDiffusionXLImg2ImgPipeline", {"addition_embed_type": "text_time"}),
        ("StableDiffusionPipeline", {"time_cond_proj_dim": 256}),
        ("LatentConsistencyModelPipeline", {"time_cond_proj_dim": 256}),
        ("StableDiffusionXLPipeline", {"addition_embed_type": "text_time", "time_cond_proj_dim": 256}),
    ],
)
def test_families_accept_sdxl_and_lcm(class_name, unet):
    check_supported({"_class_name": class_name}, unet, "/models/x")


def test_sdxl_random_preset_has_sdxl_base_sizes():
    """Built from configs only; its U-Net is counted on the meta device, never exported here."""
    from diffusers import UNet2DConditionModel

    from sdexport.presets import available_presets, recipe_configs

    folder = available_presets()["sdxl-random"]
    configs = recipe_configs(folder, json.loads((folder / "recipe.json").read_text()))
    assert set(configs) == {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
    assert 2.5e9 < sum(p.numel() for p in unet.parameters()) < 2.7e9
    te2 = configs["text_encoder_2"]
    assert configs["unet"]["projection_class_embeddings_input_dim"] == 6 * 256 + te2["projection_dim"]
    assert configs["unet"]["cross_attention_dim"] == configs["text_encoder"]["hidden_size"] + te2["hidden_size"]


@pytest.mark.parametrize("target", ["cpu", "cuda", "tensorrt"])
def test_sdxl_exports_for_every_target(sdxl_pipe, tmp_path, target):
    """The written graphs type-check (and, where this machine runs them, match PyTorch)."""
    out = _quiet_convert("sdxl-tiny", tmp_path / target, target=target, components=["text_encoder_2", "unet"])
    manifest = read_manifest(out)
    assert manifest.target == target and list(manifest.components) == ["text_encoder_2", "unet"]
    if target != "cuda":  # cuda graphs hold CUDA-only fused ops
        for component in manifest.components:
            expected, got = run_both(sdxl_pipe, out, component, 2, latent_sizes(sdxl_pipe)[0])
            assert max_abs(expected, got) <= 1e-4, component


def test_sdxl_static_export(sdxl_pipe, tmp_path):
    out = _quiet_convert("sdxl-tiny", tmp_path / "static", static=True, batch_size=1, height=32, width=48)
    manifest = read_manifest(out)
    shapes = {t.name: t.shape for t in manifest.components["unet"].inputs}
    assert shapes == {
        "sample": (2, 4, 16, 24),
        "timestep": (2,),
        "encoder_hidden_states": (2, 77, 64),
        "text_embeds": (2, 32),
        "time_ids": (2, 6),
        # a ControlNet's residuals, at the latents' size and halved after the down block's downsampler
        "down_block_additional_residual_0": (2, 32, 16, 24),
        "down_block_additional_residual_1": (2, 32, 16, 24),
        "down_block_additional_residual_2": (2, 32, 8, 12),
        "down_block_additional_residual_3": (2, 64, 8, 12),
        "mid_block_additional_residual": (2, 64, 8, 12),
    }
    assert manifest.components["text_encoder_2"].inputs[0].shape == (2, 77)
    expected, got = run_both(sdxl_pipe, out, "unet", 2, (16, 24))
    assert max_abs(expected, got) <= 1e-4


def sdxl_lora(pipe, folder, seed: int, rank: int = 4, alpha: float = 4.0, text: bool = True) -> dict:
    """A diffusers-format SDXL LoRA with random non-zero weights on the U-Net (and both text encoders);
    returns {path, layers: {component: {module: (down, up, alpha)}}} as test_lora.make_lora does."""
    from diffusers import StableDiffusionXLPipeline

    from .test_lora import TEXT_TARGETS, random_adapter

    gen = torch.Generator().manual_seed(seed)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]}
    if text:
        targets.update(text_encoder=TEXT_TARGETS, text_encoder_2=TEXT_TARGETS)
    saved, layers = {}, {}
    for component, modules in targets.items():
        saved[component], _, layers[component] = random_adapter(getattr(pipe, component), modules, rank, alpha, gen)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=saved["unet"],
        text_encoder_lora_layers=saved.get("text_encoder"),
        text_encoder_2_lora_layers=saved.get("text_encoder_2"),
    )
    return {"path": folder / "pytorch_lora_weights.safetensors", "layers": layers}


@pytest.mark.parametrize("text", [True, False], ids=["unet-and-text-encoders", "unet-only"])
def test_lora_on_sdxl_fuses_into_every_adapted_component(sdxl_pipe, tmp_path, text):
    """An SDXL LoRA (an LCM-LoRA adapts the U-Net alone) fuses into the U-Net and both text encoders."""
    from .test_lora import fused_by_hand

    lora = sdxl_lora(sdxl_pipe, tmp_path / "lora", seed=5, text=text)
    out = _quiet_convert("sdxl-tiny", tmp_path / "out", loras=[f"{lora['path']}:0.7"])
    reference = fused_by_hand(sdxl_pipe, [(lora, 0.7)])
    assert [entry.scale for entry in read_manifest(out).source.loras] == [0.7]
    for component in lora["layers"]:
        expected, got = run_both(reference, out, component, 2, (16, 16))
        plain, _ = run_both(sdxl_pipe, out, component, 2, (16, 16))
        assert max_abs(expected, got) <= 1e-4
        assert np.max(np.abs(plain[0] - got[0])) > 1e-3  # the LoRA changed it
