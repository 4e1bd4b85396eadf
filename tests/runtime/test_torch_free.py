"""The runtime installs and draws in a fresh venv holding only `runtime/` and pytest: no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"

SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    for heavy in ("torch", "diffusers", "transformers", "onnx", "optimum"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            continue
        raise SystemExit(f"{heavy} is importable in the runtime-only venv")
    from sdruntime import StableDiffusionPipeline
    from sdruntime.schedulers import SCHEDULERS
    pipe = StableDiffusionPipeline.load(sys.argv[1])
    for name in SCHEDULERS:
        result = pipe("a red circle on a blue background", num_inference_steps=3, seed=0, scheduler=name)
        result.save(f"{sys.argv[2]}/{name}.png")
    pipe("a red circle", image=f"{sys.argv[2]}/pndm.png", strength=0.5, num_inference_steps=4, seed=1)
    # LoRAs at run time (adapters.py): two files, diffusers and kohya format, read and applied without torch
    base = pipe("a red circle", num_inference_steps=2, seed=0)
    lora = pipe("a red circle", num_inference_steps=2, seed=0, loras=[(sys.argv[3], 0.8), sys.argv[4]])
    assert abs(base.latents - lora.latents).max() > 1e-2, "the LoRAs changed nothing"
    assert pipe.adapters.sessions_created == 2
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
    assert not loaded, loaded
    print("drew", len(SCHEDULERS), "images")
    """
)


TINY_DECODER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from sdruntime import StableDiffusionPipeline
    previews = []
    pipe = StableDiffusionPipeline.load(sys.argv[1])
    result = pipe("a red circle", num_inference_steps=3, scheduler="euler", seed=4, decoder="tiny",
                  preview_callback=previews.append)
    assert [p.step for p in previews] == [0, 1, 2], [p.step for p in previews]
    assert np.array_equal(np.asarray(previews[-1].images[0]), np.asarray(result.images[0]))
    result.save(f"{sys.argv[3]}/tiny.png")
    replaced = StableDiffusionPipeline.load(sys.argv[2])
    replaced("a red circle", image=f"{sys.argv[3]}/tiny.png", strength=0.5, num_inference_steps=4, seed=1,
             scheduler="euler").save(f"{sys.argv[3]}/img2img.png")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
    assert not loaded, loaded
    """
)


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(RUNTIME), "pytest"], check=True, timeout=600)
    return venv


def test_runtime_venv_has_no_torch_and_draws_with_every_scheduler(runtime_venv, tiny32, runtime_loras, tmp_path):
    python = runtime_venv / "bin" / "python"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert not names & {"torch", "diffusers", "transformers", "onnx", "optimum", "sdexport"}
    for heavy in ("torch", "diffusers", "transformers"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
    loras = [str(runtime_loras["a"]["diffusers"]), str(runtime_loras["b"]["kohya"])]
    run = subprocess.run(
        [str(python), "-c", SCRIPT, str(tiny32), str(tmp_path), *loras], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "drew 8 images" in run.stdout
    assert len(list(tmp_path.glob("*.png"))) == 8


def test_sdruntime_cli_in_runtime_venv(runtime_venv, tiny32, runtime_loras, tmp_path):
    out = tmp_path / "cli.png"
    run = subprocess.run(
        [
            str(runtime_venv / "bin" / "sdruntime"),
            "generate",
            str(tiny32),
            "a green star",
            "--steps",
            "2",
            "--seed",
            "3",
            "--lora",
            f"{runtime_loras['a']['kohya']}:0.5",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file()


def test_tiny_decoders_and_tiny_vaes_draw_without_torch(runtime_venv, tiny_taesd32, tiny_vae_replaced32, tmp_path):
    """decoders.py in the runtime-only venv: decoder="tiny" with previews, and image-to-image through a tiny VAE's
    encoder, the same pixels as in this environment, whose pictures match diffusers (test_tiny_decoder.py)."""
    import numpy as np
    from PIL import Image
    from sdruntime import StableDiffusionPipeline

    script = [str(runtime_venv / "bin" / "python"), "-c", TINY_DECODER_SCRIPT]
    run = subprocess.run(
        [*script, str(tiny_taesd32), str(tiny_vae_replaced32), str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    draw = {"num_inference_steps": 3, "scheduler": "euler", "seed": 4}
    tiny = StableDiffusionPipeline.load(tiny_taesd32)("a red circle", decoder="tiny", **draw)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tiny.png")), np.asarray(tiny.images[0]))
    draw = {"num_inference_steps": 4, "scheduler": "euler", "seed": 1, "strength": 0.5}
    replaced = StableDiffusionPipeline.load(tiny_vae_replaced32)("a red circle", image=tmp_path / "tiny.png", **draw)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "img2img.png")), np.asarray(replaced.images[0]))


EMBEDDING_SCRIPT = textwrap.dedent(
    """
    import sys
    from sdruntime import StableDiffusionPipeline
    from sdruntime.textual_inversion import read_embedding
    folder, pt, safetensors, out = sys.argv[1:5]
    embedding = read_embedding(pt)  # torch.save's zip, read by torch_pickle's restricted unpickler
    assert embedding.token == "<Cat-Toy>" and embedding.vectors[None].shape == (3, 32), embedding
    assert read_embedding(safetensors).vectors[None].shape == (1, 32)
    pipe = StableDiffusionPipeline.load(folder)
    draw = dict(num_inference_steps=3, scheduler="euler", seed=4, height=32, width=32)
    result = pipe("a <Cat-Toy> on a table, sks style", embeddings=[pt, f"sks={safetensors}"], **draw)
    result.save(out)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
    assert not loaded, loaded
    """
)


def test_textual_inversion_embeddings_read_and_draw_without_torch(runtime_venv, tiny32, tmp_path):
    """A1111's .pt (a pickle, read without torch) and a .safetensors embedding in the runtime-only venv: the same
    pixels as in this environment, whose pictures match diffusers' load_textual_inversion
    (test_textual_inversion.py)."""
    import numpy as np
    from PIL import Image
    from sdruntime import StableDiffusionPipeline

    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    generator = torch.Generator().manual_seed(0)
    pt, safetensors = tmp_path / "cat_toy.pt", tmp_path / "sks.safetensors"
    torch.save({"string_to_param": {"*": torch.randn(3, 32, generator=generator)}, "name": "<Cat-Toy>"}, pt)
    safetensors_torch.save_file({"emb_params": torch.randn(1, 32, generator=generator)}, str(safetensors))
    out = tmp_path / "embedded.png"
    script = [str(runtime_venv / "bin" / "python"), "-c", EMBEDDING_SCRIPT]
    run = subprocess.run([*script, str(tiny32), str(pt), str(safetensors), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    draw = {"num_inference_steps": 3, "scheduler": "euler", "seed": 4, "height": 32, "width": 32}
    here = StableDiffusionPipeline.load(tiny32)(
        "a <Cat-Toy> on a table, sks style", embeddings=[pt, ("sks", safetensors)], **draw
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(here.images[0]))


PROMPT_SYNTAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sdruntime import StableDiffusionPipeline
    sd, xl = StableDiffusionPipeline.load(sys.argv[1]), StableDiffusionPipeline.load(sys.argv[2])
    prompts, out = json.loads(sys.argv[3]), {}
    for syntax, texts in prompts.items():
        out[f"sd-{syntax}"] = sd.encode_prompt(texts, texts[::-1], 1, prompt_syntax=syntax)
        out[f"xl-{syntax}"], out[f"xl-pooled-{syntax}"] = xl.encode_prompt_xl(texts, None, 1, prompt_syntax=syntax)
        out[f"sd-remove-{syntax}"] = sd.encode_prompt(texts, None, 1, prompt_syntax=syntax, downweight="remove")
    out["latents"] = sd(texts[0], prompt_syntax=syntax, num_inference_steps=2, seed=1).latents
    np.savez(sys.argv[4], **out)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
    assert not loaded, loaded
    """
)


def test_weighted_prompts_parse_and_weigh_without_torch(runtime_venv, tiny32, sdxl32, tmp_path):
    """prompt_syntax.py and prompt_weighting.py in the runtime-only venv, both syntaxes, long prompts, SD and SDXL,
    weights below 1 masked out (the default) and removed: the embeddings this environment computes, which match
    compel's (test_prompt_weighting.py)."""
    import json

    import numpy as np
    from sdruntime import StableDiffusionPipeline

    long = "a small red circle and a large blue square on a green background. " * 3
    prompts = {
        "compel": ["a (red circle)1.3 on a blue-- background", long * 2 + " (green)0.6", '("a", "b").blend(0.6, 0.4)'],
        "a1111": ["a (red:1.3) circle on a [blue] background", long + " BREAK ((green))", "\\(red\\) circle"],
    }
    out = tmp_path / "embeddings.npz"
    script = [str(runtime_venv / "bin" / "python"), "-c", PROMPT_SYNTAX_SCRIPT]
    run = subprocess.run(
        [*script, str(tiny32), str(sdxl32), json.dumps(prompts), str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    there = np.load(out)
    sd, xl = StableDiffusionPipeline.load(tiny32), StableDiffusionPipeline.load(sdxl32)
    for syntax, texts in prompts.items():
        assert np.allclose(
            there[f"sd-{syntax}"], sd.encode_prompt(texts, texts[::-1], 1, prompt_syntax=syntax), atol=1e-5
        )
        embeddings, pooled = xl.encode_prompt_xl(texts, None, 1, prompt_syntax=syntax)
        assert np.allclose(there[f"xl-{syntax}"], embeddings, atol=1e-5)
        assert np.allclose(there[f"xl-pooled-{syntax}"], pooled, atol=1e-5)
        removed = sd.encode_prompt(texts, None, 1, prompt_syntax=syntax, downweight="remove")
        assert np.allclose(there[f"sd-remove-{syntax}"], removed, atol=1e-5)
        assert not np.allclose(there[f"sd-remove-{syntax}"], there[f"sd-{syntax}"][len(texts) :], atol=1e-3)
    latents = sd(prompts["a1111"][0], prompt_syntax="a1111", num_inference_steps=2, seed=1).latents
    assert np.allclose(there["latents"], latents, atol=1e-5)
