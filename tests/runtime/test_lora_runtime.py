"""LoRAs applied at run time (sdruntime/adapters.py, lora.py, safetensors_io.py) against their oracles: the same LoRAs
fused at export (`sdexport convert --lora`) and diffusers' `load_lora_weights` + `fuse_lora`, on the generic, cpu and
cuda targets' graphs; the session cache; the CLI flag and the server's `loras` field.

The LoRAs are made here (tests/exporter/test_lora.py's machinery): random peft adapters saved by diffusers'
`save_lora_weights` and, under kohya-ss names, by ldm_layout.kohya_lora; SDXL's kohya file names its U-Net layers
as SGM's U-Net does (input_blocks_4_1_...), as kohya-ss's SDXL trainer writes them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402
from sdruntime import StableDiffusionPipeline  # noqa: E402
from sdruntime.adapters import AdapterSet, AdapterTarget, adapter_changes  # noqa: E402
from sdruntime.cli import main as sdruntime_main  # noqa: E402
from sdruntime.errors import InvalidArgument  # noqa: E402
from sdruntime.manifest import read_manifest  # noqa: E402
from sdruntime.onnx_proto import read_initializers  # noqa: E402
from sdruntime.request import GenerationRequest  # noqa: E402
from sdruntime.safetensors_io import SafetensorsError, read_safetensors  # noqa: E402
from sdruntime.serving import draw_batch, lora_files, model_facts, parse_request  # noqa: E402
from sdruntime.session import SessionSettings  # noqa: E402
from sdruntime.transformer_plan import _refuse_unet_fields  # noqa: E402

from tests.exporter.ldm_layout import UNET, kohya_lora, unet_to_ldm  # noqa: E402
from tests.exporter.test_lora import TEXT_TARGETS, UNET_TARGETS, random_adapter  # noqa: E402

from .test_pipeline import SCHEDULER_CLASSES, psnr  # noqa: E402

PROMPT = "a red circle on a blue background"
DRAW = {"num_inference_steps": 4, "seed": 5}
DRAWING = ["text_encoder", "unet", "vae_decoder"]
# LCM-LoRA's layers (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward and every convolution
LCM_TARGETS = [*UNET_TARGETS, "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


def quiet_convert(source, out: Path, **options) -> Path:
    from sdexport import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(str(source), out, log=lambda line: None, **options)


def fused_pipeline(pipe, loras: list[tuple[Path, float]]):
    """diffusers' own: load_lora_weights + fuse_lora for each LoRA in turn, then unloaded (plain modules)."""
    fused = copy.deepcopy(pipe)
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])
    for i, (path, scale) in enumerate(loras):
        fused.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        fused.fuse_lora(components=components, lora_scale=scale, adapter_names=[f"l{i}"])
        fused.unload_lora_weights()
    fused.set_progress_bar_config(disable=True)
    return fused


def reference_scheduler(export: Path, name: str):
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    cls_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def diffusers_picture(pipe, export: Path, scheduler: str, **kwargs) -> Image.Image:
    """The pipeline's picture with the export's scheduler config (no watermark on SDXL: the runtime adds none)."""
    xl = {"add_watermarker": False} if isinstance(pipe, diffusers.StableDiffusionXLPipeline) else {}
    pipe = type(pipe)(**{**pipe.components, "scheduler": reference_scheduler(export, scheduler)}, **xl)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(kwargs.pop("seed"))
    return pipe(generator=generator, **kwargs).images[0]


def sgm_kohya_lora(pipe, layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """kohya-ss's SDXL names: the U-Net's layers by their SGM (LDM) paths, the text encoders as lora_te1_/lora_te2_."""
    ptr = {v.data_ptr(): k for k, v in pipe.unet.state_dict().items()}
    ldm = {ptr[v.data_ptr()]: k for k, v in unet_to_ldm(pipe.unet).items() if v.data_ptr() in ptr}
    out = {}
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for module, (down, up, alpha) in layers[component].items():
            name = ldm[f"{module}.weight"].removeprefix(UNET).removesuffix(".weight") if component == "unet" else module
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


# -- shared exports and LoRAs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(runtime_loras):
    """A (rank 4, alpha 2: diffusers and kohya files) and B (rank 2, alpha 2), on tiny-sd's U-Net and text encoder."""
    return runtime_loras


@pytest.fixture(scope="module")
def two(loras) -> list[tuple[Path, float]]:
    return [(loras["a"]["diffusers"], 0.7), (loras["b"]["kohya"], 1.0)]


@pytest.fixture(scope="module")
def fused_export(two, tmp_path_factory) -> Path:
    """tiny-sd with both LoRAs fused at export: `sdexport convert tiny-sd --lora A:0.7 --lora B` (what draws)."""
    out = tmp_path_factory.mktemp("lora") / "fused"
    return quiet_convert("tiny-sd", out, loras=[f"{p}:{s}" for p, s in two], components=DRAWING)


@pytest.fixture(scope="module")
def ours(tiny32):
    return StableDiffusionPipeline.load(tiny32)


# -- the pictures -----------------------------------------------------------------------------------------


def test_loras_at_run_time_draw_the_fused_exports_and_diffusers_pictures(tiny_pipe, tiny32, ours, two, fused_export):
    fused = StableDiffusionPipeline.load(fused_export)(PROMPT, **DRAW)
    mine = ours(PROMPT, loras=two, **DRAW)
    assert psnr(fused.images[0], mine.images[0]) >= 45.0
    assert np.max(np.abs(fused.latents - mine.latents)) <= 1e-3
    theirs = diffusers_picture(fused_pipeline(tiny_pipe, two), tiny32, "pndm", prompt=PROMPT, **DRAW)
    assert psnr(theirs, mine.images[0]) >= 45.0
    base = ours(PROMPT, **DRAW)  # the LoRAs change the picture; without them it is the base's again
    assert psnr(base.images[0], mine.images[0]) < 30.0


def test_loras_on_the_cpu_targets_graphs(tiny_cpu32, two, fused_export):
    """The cpu target lays convolutions out in ORT's blocked NCHWc form: the weight map places the deltas there."""
    fused = StableDiffusionPipeline.load(fused_export)(PROMPT, **DRAW)
    pipe = StableDiffusionPipeline.load(tiny_cpu32)
    mine = pipe(PROMPT, loras=two, **DRAW)
    assert psnr(fused.images[0], mine.images[0]) >= 45.0
    assert np.max(np.abs(fused.latents - mine.latents)) <= 1e-3
    assert psnr(pipe(PROMPT, **DRAW).images[0], mine.images[0]) < 30.0


def test_patched_cuda_graphs_equal_the_fused_cuda_export(tiny_cuda16, two, tmp_path):
    """The cuda target packs Q/K/V, lays convolutions out NHWC and is fp16; its graphs run on CUDA only, so the
    patched initializers are compared with those of the same LoRAs fused at export (`--target cuda --dtype fp16
    --lora ...`): the same initializers change, to within fp16 rounding (the export rounds W + deltas once, the
    runtime adds the deltas to the rounded W)."""
    parts = {"target": "cuda", "dtype": "fp16", "components": ["text_encoder", "unet"]}
    fused = quiet_convert("tiny-sd", tmp_path / "fused", loras=[f"{p}:{s}" for p, s in two], **parts)
    changes = adapter_changes(AdapterTarget(read_manifest(tiny_cuda16)), AdapterSet.of(two))
    packed = 0
    for component in ("text_encoder", "unet"):
        before = read_initializers(tiny_cuda16 / component / "model.onnx")
        after = read_initializers(fused / component / "model.onnx")
        patched = changes.initializers[component]
        changed = {name for name in after if not np.array_equal(before[name], after[name])}
        assert changed == set(patched), component  # every initializer the fused export changed, and no other
        for name in changed:
            assert patched[name].dtype == after[name].dtype and patched[name].shape == after[name].shape
            got, want = patched[name].astype(np.float32), after[name].astype(np.float32)
            largest = np.maximum(np.maximum(np.abs(got), np.abs(want)), np.abs(before[name].astype(np.float32)))
            step = np.spacing(largest.astype(after[name].dtype)).astype(np.float32)
            # W rounded, then W + d rounded, against W + d rounded once: at most 1.5 steps apart
            assert np.all(np.abs(got - want) <= 1.5 * step), name
        weights = read_manifest(tiny_cuda16).components[component].weights
        packed += sum(1 for entry in weights.values() if entry.get("at"))
    assert packed  # some weights sit in packed initializers (Q/K/V), several deltas in one array


def test_sdxl_kohya_lora_in_sgm_names_on_the_unet_and_both_text_encoders(sdxl_pipe, sdxl32, tmp_path):
    gen = torch.Generator().manual_seed(4)
    layers = {
        "unet": random_adapter(sdxl_pipe.unet, LCM_TARGETS, 4, 4, gen)[2],
        "text_encoder": random_adapter(sdxl_pipe.text_encoder, TEXT_TARGETS, 4, 2, gen)[2],
        "text_encoder_2": random_adapter(sdxl_pipe.text_encoder_2, TEXT_TARGETS, 4, 2, gen)[2],
    }
    file = tmp_path / "sdxl.safetensors"
    save_file(sgm_kohya_lora(sdxl_pipe, layers), file)
    assert any(key.startswith("lora_unet_input_blocks_") for key in read_safetensors(file)[0])
    pipe = StableDiffusionPipeline.load(sdxl32)
    draw = {"num_inference_steps": 4, "seed": 3, "scheduler": "euler", "height": 64, "width": 64}
    mine = pipe(PROMPT, loras=[(file, 0.8)], **draw)
    theirs = diffusers_picture(fused_pipeline(sdxl_pipe, [(file, 0.8)]), sdxl32, prompt=PROMPT, **draw)
    assert psnr(theirs, mine.images[0]) >= 45.0
    assert psnr(pipe(PROMPT, **draw).images[0], mine.images[0]) < 30.0
    changed = set(pipe.adapters.get(AdapterSet.of([(file, 0.8)])).components)
    assert changed == {"unet", "text_encoder", "text_encoder_2"}


def test_kohya_lora_on_an_sd2_layout(sd2_case, tmp_path):
    """SD 2.x's layout: linear proj_in/proj_out (Gemm/MatMul weights, not 1x1 convolutions), per-block head counts,
    an upcast attention and "!" padding, in both prediction types; a kohya file on the U-Net and text encoder."""
    _, sd2_pipe, export = sd2_case
    gen = torch.Generator().manual_seed(6)
    unet = random_adapter(sd2_pipe.unet, UNET_TARGETS, 4, 2, gen)[2]
    text = random_adapter(sd2_pipe.text_encoder, TEXT_TARGETS, 4, 2, gen)[2]
    assert any(name.endswith("proj_in") for name in unet)
    file = tmp_path / "sd2.safetensors"
    save_file(kohya_lora(unet, text), file)
    pipe = StableDiffusionPipeline.load(export)
    draw = {"num_inference_steps": 4, "seed": 8, "scheduler": "ddim"}
    mine = pipe(PROMPT, loras=[(file, 0.9)], **draw)
    theirs = diffusers_picture(fused_pipeline(sd2_pipe, [(file, 0.9)]), export, prompt=PROMPT, **draw)
    assert psnr(theirs, mine.images[0]) >= 45.0
    assert psnr(pipe(PROMPT, **draw).images[0], mine.images[0]) < 30.0


def test_lcm_lora_shaped_file_with_lcm_scheduler(tiny_pipe, tiny32, ours, tmp_path):
    """LCM-LoRA is a diffusers-format U-Net LoRA over attention, feed-forward and every convolution, drawn with
    the LCM scheduler, 4 steps, guidance 1; its file has no adapter metadata (alpha: the rank)."""
    _, _, layers = random_adapter(tiny_pipe.unet, LCM_TARGETS, 8, 8, torch.Generator().manual_seed(9))
    state = {
        f"{module}.{kind}.weight": w
        for module, (a, b, _) in layers.items()
        for kind, w in (("lora_A", a), ("lora_B", b))
    }
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert not read_safetensors(file)[1].get("lora_adapter_metadata")
    draw = {"num_inference_steps": 4, "seed": 2, "guidance_scale": 1.0}
    mine = ours(PROMPT, loras=[file], scheduler="lcm", **draw)
    theirs = diffusers_picture(fused_pipeline(tiny_pipe, [(file, 1.0)]), tiny32, "lcm", prompt=PROMPT, **draw)
    assert psnr(theirs, mine.images[0]) >= 45.0
    assert psnr(ours(PROMPT, scheduler="lcm", **draw).images[0], mine.images[0]) < 30.0


# -- the cache -------------------------------------------------------------------------------------------


def test_switching_back_to_a_cached_set_makes_no_session(tiny32, loras):
    pipe = StableDiffusionPipeline.load(tiny32)
    a, b = [(loras["a"]["kohya"], 1.0)], [(loras["b"]["diffusers"], 0.5)]
    first = pipe(PROMPT, loras=a, **DRAW)
    made = pipe.adapters.sessions_created
    assert made == 2  # the U-Net's and the text encoder's
    pipe(PROMPT, loras=b, **DRAW)
    assert pipe.adapters.sessions_created == 2 * made
    again = pipe(PROMPT, loras=a, **DRAW)
    assert pipe.adapters.sessions_created == 2 * made  # A's sessions were still there
    assert np.array_equal(first.latents, again.latents)
    assert pipe.component("unet") is pipe._components["unet"]  # outside a generation: the base sessions


def test_the_cache_bound_evicts_the_least_recently_used_set(tiny32, loras):
    pipe = StableDiffusionPipeline.load(tiny32, settings=SessionSettings(adapter_sets=1))
    a, b = [(loras["a"]["kohya"], 1.0)], [(loras["b"]["diffusers"], 0.5)]
    for lora in (a, b, a):
        pipe(PROMPT, loras=lora, num_inference_steps=1, seed=0)
    assert pipe.adapters.sessions_created == 6 and len(pipe.adapters.cached()) == 1
    pipe(PROMPT, loras=[(loras["a"]["kohya"], 0.5)], num_inference_steps=1, seed=0)  # a new scale is a new set
    assert pipe.adapters.sessions_created == 8


def test_an_edited_file_is_read_again(tiny32, loras, tmp_path):
    pipe = StableDiffusionPipeline.load(tiny32)
    file = tmp_path / "style.safetensors"
    file.write_bytes(loras["a"]["kohya"].read_bytes())
    first = pipe(PROMPT, loras=[file], **DRAW)
    file.write_bytes(loras["b"]["kohya"].read_bytes())
    second = pipe(PROMPT, loras=[file], **DRAW)
    assert psnr(first.images[0], second.images[0]) < 30.0
    assert np.array_equal(second.latents, pipe(PROMPT, loras=[loras["b"]["kohya"]], **DRAW).latents)


def test_parameters_record_the_loras_as_a1111_does(ours, loras):
    path = loras["a"]["kohya"]
    text = ours(PROMPT, loras=[(path, 0.7)], **DRAW).parameters[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert text.splitlines()[0] == f"{PROMPT} <lora:{path.stem}:0.7>"
    assert f'Lora hashes: "{path.stem}: {digest}"' in text


# -- refusals --------------------------------------------------------------------------------------------


def refused(pipe, lora, says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        pipe(PROMPT, loras=[lora], num_inference_steps=1, seed=0)
    message = str(caught.value)
    assert "\n" not in message and says in message, message


def test_loras_that_do_not_fit_are_refused_in_one_line(ours, loras, tmp_path, sdxl_pipe):
    layers = loras["a"]["layers"]
    save_file(kohya_lora({"x" + k: v for k, v in layers["unet"].items()}, {}), tmp_path / "other.safetensors")
    refused(ours, tmp_path / "other.safetensors", "none of its 56 layers matches a module of this export")
    renamed = {k.replace("down_blocks", "side_blocks"): v for k, v in layers["unet"].items()}
    save_file(kohya_lora(renamed, {}), tmp_path / "some.safetensors")
    refused(ours, tmp_path / "some.safetensors", "14 of its 56 layers match no module of this export")
    _, _, xl = random_adapter(sdxl_pipe.unet, ["to_k"], 2, 2, torch.Generator().manual_seed(0))
    cross = {k: v for k, v in xl.items() if "transformer_blocks.0.attn2" in k}  # modules tiny-sd has, 64 wide, not 32
    save_file(kohya_lora(cross, {}), tmp_path / "xl.safetensors")
    refused(ours, tmp_path / "xl.safetensors", "does not fit this export: its unet ")
    assert ours(PROMPT, num_inference_steps=1, seed=0).images  # a refusal leaves the pipeline drawing


def test_files_that_are_not_loras_are_refused_in_one_line(ours, loras, tmp_path):
    refused(ours, tmp_path / "missing.safetensors", "missing.safetensors not found")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 40)
    refused(ours, tmp_path / "bad.safetensors", "is not a readable .safetensors file")
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    refused(ours, tmp_path / "plain.safetensors", "has no LoRA weights")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    refused(ours, tmp_path / "loha.safetensors", "LyCORIS")
    refused(ours, f"{loras['a']['kohya']}:nan", "not a finite number")


def test_safetensors_reader_matches_the_safetensors_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(2, 3, 2).bfloat16(),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"note": "x"})
    read, metadata = read_safetensors(tmp_path / "t.safetensors")
    assert metadata == {"note": "x"}
    for name, value in tensors.items():
        assert np.array_equal(read[name], value.float().numpy().astype(read[name].dtype)), name
    assert read["f16"].dtype == np.float16 and read["bf16"].dtype == np.float32
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match="lie outside the file"):
        read_safetensors(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_refuse_loras(family):
    with pytest.raises(InvalidArgument, match=f"this {family} export does not take LoRAs"):
        _refuse_unet_fields(GenerationRequest("a cat", loras=["x.safetensors"]), family)


# -- CLI and server --------------------------------------------------------------------------------------


def test_cli_lora_flag_draws_the_python_apis_picture(tiny32, ours, loras, tmp_path, capsys):
    a, b = loras["a"]["kohya"], loras["b"]["diffusers"]
    out = tmp_path / "x.png"
    args = ["generate", str(tiny32), PROMPT, "--steps", "4", "--seed", "5", "-o", str(out)]
    assert sdruntime_main([*args, "--lora", f"{a}:0.7", "--lora", str(b)]) == 0
    expected = ours(PROMPT, loras=[(a, 0.7), (b, 1.0)], **DRAW).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    capsys.readouterr()
    assert sdruntime_main([*args, "--lora", str(tmp_path / "none.safetensors")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sdruntime: error: LoRA ") and line.endswith("not found: check the path")


@pytest.fixture(scope="module")
def lora_dir(loras, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora-dir")
    (folder / "style.safetensors").write_bytes(loras["a"]["kohya"].read_bytes())
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def test_server_loras_field_draws_generates_picture(ours, lora_dir):
    offered = lora_files(lora_dir)
    assert list(offered) == ["style"]
    facts = model_facts(ours, offered)
    assert facts.card()["loras"] == ["style"]
    for field in ([{"name": "style", "scale": 0.7}], ["style:0.7"], ["style.safetensors:0.7"]):
        request = parse_request({"prompt": PROMPT, "steps": 4, "seed": 5, "loras": field}, facts)
        assert request.loras == (("style", 0.7),)
    [result] = draw_batch(ours, [request], 4, None, offered)
    expected = ours(PROMPT, loras=[(lora_dir / "style.safetensors", 0.7)], **DRAW).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.images[0].png))), np.asarray(expected))
    plain = parse_request({"prompt": PROMPT, "steps": 4, "seed": 5}, facts)
    assert plain.batch_key != request.batch_key  # one LoRA set per U-Net batch


@pytest.mark.parametrize(
    ("field", "says"),
    [
        (["../style"], "without a path"),
        (["/etc/passwd"], "without a path"),
        ([{"name": "sub/style"}], "without a path"),
        ([".hidden"], "without a path"),
        (["nope"], "unknown LoRA 'nope' in 'loras[0]': this server offers style"),
        (["style:nan"], "scale must be a number"),
        ([{"name": "style", "scale": 11}], "scale must be a number"),
        ("style", "must be a list"),
    ],
)
def test_server_refuses_loras_outside_its_folder(ours, lora_dir, field, says):
    facts = model_facts(ours, lora_files(lora_dir))
    with pytest.raises(InvalidArgument) as caught:
        parse_request({"prompt": PROMPT, "loras": field}, facts)
    assert says in str(caught.value)


def test_server_without_lora_dir_refuses_the_field(ours, tiny32, tmp_path, capsys):
    with pytest.raises(InvalidArgument, match="this server takes no LoRAs: .* --lora-dir"):
        parse_request({"prompt": PROMPT, "loras": ["style"]}, model_facts(ours))
    assert sdruntime_main(["serve", str(tiny32), "--lora-dir", str(tmp_path / "none")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is not a folder" in line
