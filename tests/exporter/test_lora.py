"""`--lora FILE[:SCALE]`: LoRAs in diffusers and kohya-ss format fused before export, on single-file checkpoints.

The tests make their own LoRAs: a peft adapter with random non-zero weights on the U-Net and the text
encoder, saved with diffusers' `save_lora_weights` and, under kohya-ss names, by ldm_layout.kohya_lora.
The PyTorch reference fuses them by hand (W += scale * alpha / rank * up @ down), not through diffusers.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sdruntime.manifest import read_manifest

from .ldm_layout import kohya_lora, ldm_checkpoints
from .test_cli import assert_refused
from .test_convert import latent_sizes, run_both

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LORA_COMPONENTS = ["text_encoder", "unet"]  # the VAE has no LoRA layers


def random_adapter(module, targets: list[str], rank: int, alpha: float, gen: torch.Generator):
    """A peft LoRA on a copy of `module` with random non-zero weights: (its state dict, its config as a
    dict, {module name: (down, up, alpha)})."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(module)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model.add_adapter(config)
    for name, param in model.named_parameters():
        if "lora_" in name:  # peft starts lora_B at zero: a LoRA that changes nothing
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    state = get_peft_model_state_dict(model)
    layers = {
        key[: -len(".lora_A.weight")]: (value, state[key.replace("lora_A", "lora_B")], alpha)
        for key, value in state.items()
        if key.endswith(".lora_A.weight")
    }
    return state, config.to_dict(), layers


def make_lora(pipe, folder: Path, seed: int, rank: int, alpha: float) -> dict:
    """Write one LoRA in both formats; returns {diffusers, kohya: path, layers: {component: {module: (down, up, alpha)}}}."""
    from diffusers import StableDiffusionPipeline

    gen = torch.Generator().manual_seed(seed)
    saved, metadata, layers = {}, {}, {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        saved[component], metadata[component], layers[component] = random_adapter(
            getattr(pipe, component), targets, rank, alpha, gen
        )
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=saved["unet"],
        text_encoder_lora_layers=saved["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
    )
    kohya = folder / "kohya.safetensors"
    save_file(kohya_lora(layers["unet"], layers["text_encoder"]), kohya)
    return {"diffusers": folder / "pytorch_lora_weights.safetensors", "kohya": kohya, "layers": layers}


def fused_by_hand(pipe, loras: list[tuple[dict, float]]):
    fused = copy.deepcopy(pipe)
    for lora, scale in loras:
        for component, layers in lora["layers"].items():
            modules = dict(getattr(fused, component).named_modules())
            for name, (down, up, alpha) in layers.items():
                weight = modules[name].weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
                weight.data += scale * alpha / down.shape[0] * delta
    return fused


@pytest.fixture(scope="session")
def checkpoints(tiny_pipe, tmp_path_factory):
    return ldm_checkpoints(tmp_path_factory.getbasetemp() / "ldm-checkpoints", tiny_pipe)


@pytest.fixture(scope="session")
def loras(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    sd1 = checkpoints["sd1"]["pipe"]
    return {
        "sd1-a": make_lora(sd1, root / "sd1-a", seed=1, rank=4, alpha=2),
        "sd1-b": make_lora(sd1, root / "sd1-b", seed=2, rank=2, alpha=2),
        "sd2": make_lora(checkpoints["sd2"]["pipe"], root / "sd2", seed=3, rank=4, alpha=8),
    }


def convert_with(source, out, config, lora_args):
    from sdexport import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(
            str(source), out, config=str(config), loras=lora_args, components=LORA_COMPONENTS, log=lambda line: None
        )


def assert_matches_fused(base, reference, out):
    for component in LORA_COMPONENTS:
        for batch, hw in ((1, latent_sizes(base)[0]), (2, latent_sizes(base)[1])):
            expected, got = run_both(reference, out, component, batch, hw)
            plain, _ = run_both(base, out, component, batch, hw)
            for e, g in zip(expected, got):
                assert np.max(np.abs(e - g)) <= 1e-4  # matches PyTorch with the LoRA fused
            # and the LoRA changed it (the plain export matches `base` to 1e-4; the embeddings, a text
            # encoder's extra first hidden state, have no LoRA layers)
            assert np.max(np.abs(plain[0] - got[0])) > 1e-2


def test_sd1_two_loras_diffusers_and_kohya(checkpoints, loras, tmp_path):
    case, a, b = checkpoints["sd1"], loras["sd1-a"], loras["sd1-b"]
    out = convert_with(case["file"], tmp_path / "out", case["configs"], [f"{a['diffusers']}:0.7", str(b["kohya"])])
    assert_matches_fused(case["pipe"], fused_by_hand(case["pipe"], [(a, 0.7), (b, 1.0)]), out)
    assert read_manifest(out).source.to_json()["loras"] == [
        {"path": str(a["diffusers"].resolve()), "scale": 0.7},
        {"path": str(b["kohya"].resolve()), "scale": 1.0},
    ]


def test_sd2_v_prediction_with_kohya_lora(checkpoints, loras, tmp_path):
    case, lora = checkpoints["sd2"], loras["sd2"]
    out = convert_with(case["file"], tmp_path / "out", case["configs"], [(lora["kohya"], 0.5)])
    assert_matches_fused(case["pipe"], fused_by_hand(case["pipe"], [(lora, 0.5)]), out)
    manifest = read_manifest(out)
    assert manifest.pipeline.prediction_type == "v_prediction"
    assert manifest.source.to_json()["loras"] == [{"path": str(lora["kohya"].resolve()), "scale": 0.5}]


def test_kohya_and_diffusers_files_fuse_the_same(checkpoints, loras):
    """Both files of one LoRA give the hand-fused weights through diffusers' loader (no export needed)."""
    from sdexport.lora import fuse_loras

    case, lora = checkpoints["sd1"], loras["sd1-a"]
    reference = fused_by_hand(case["pipe"], [(lora, 1.5)])
    for path in (lora["diffusers"], lora["kohya"]):
        pipe = copy.deepcopy(case["pipe"])
        fuse_loras(pipe, [(path, 1.5)], log=lambda line: None)
        for component in LORA_COMPONENTS:
            got, want = getattr(pipe, component).state_dict(), getattr(reference, component).state_dict()
            assert got.keys() == want.keys()  # plain modules again, no LoRA layers left
            assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-6


# --- refusals: one line, exit code 2, nothing written -------------------------------------------------------


def refuse(capsys, tmp_path, *lora_args, says, source="tiny-sd"):
    args = [a for spec in lora_args for a in ("--lora", str(spec))]
    assert_refused(capsys, tmp_path / "out", source, "--components", "text_encoder", "--no-check", *args, says=says)


def test_missing_lora(capsys, tmp_path):
    refuse(capsys, tmp_path, tmp_path / "nope.safetensors", says="nope.safetensors not found")


def test_lora_that_is_not_safetensors(capsys, tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "lora.safetensors")
    refuse(capsys, tmp_path, tmp_path / "lora.safetensors", says="is not a safetensors file")


def test_lora_without_lora_weights(capsys, checkpoints, tmp_path):
    refuse(capsys, tmp_path, checkpoints["sd1"]["file"], says="has no LoRA weights")


@pytest.mark.parametrize(
    ("rename", "says"),
    [
        (lambda name: name.replace("down_blocks", "side_blocks"), "14 of its 56 layers match no module of this model"),
        (lambda name: "x" + name, "matches no module of this model (none of its 56 layers)"),
    ],
    ids=["some", "all"],
)
def test_lora_keys_that_match_no_module(capsys, loras, tmp_path, rename, says):
    layers = loras["sd1-a"]["layers"]["unet"]
    save_file(kohya_lora({rename(name): value for name, value in layers.items()}, {}), tmp_path / "other.safetensors")
    refuse(capsys, tmp_path, tmp_path / "other.safetensors", says=says)


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_lora_for_another_model(capsys, loras, tmp_path, kind):
    refuse(capsys, tmp_path, loras["sd2"][kind], says="does not fit this model: its ")


def test_bad_scale(capsys, loras, tmp_path):
    refuse(capsys, tmp_path, f"{loras['sd1-a']['kohya']}:nan", says="not a finite number")


def test_validate_reloads_the_single_file_with_its_loras(checkpoints, loras, tmp_path):
    """Standalone validate rebuilds the reference as the export was made: configs and fused LoRAs."""
    from sdexport.validate import validate

    case, lora = checkpoints["sd1"], loras["sd1-a"]
    out = convert_with(case["file"], tmp_path / "out", case["configs"], [f"{lora['kohya']}:0.8"])
    report = validate(str(case["file"]), out, config=str(case["configs"]), end_to_end=False)
    assert report["ok"], report["failures"]
    unet = report["components"]["unet"]
    assert unet["max_abs"] <= 1e-4
