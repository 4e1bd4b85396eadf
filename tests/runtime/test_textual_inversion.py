"""Textual inversion at run time (sdruntime/textual_inversion.py, torch_pickle.py) against diffusers'
load_textual_inversion: the files read without torch equal what torch saved, the prompt ids equal transformers'
tokenizer's after diffusers adds the tokens, and the pictures equal diffusers' (>= 45 dB) for SD 1.x and SDXL."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdruntime import torch_pickle  # noqa: E402
from sdruntime.errors import InvalidArgument  # noqa: E402
from sdruntime.textual_inversion import (  # noqa: E402
    EmbeddingSpec,
    read_embedding,
    resolve_embeddings,
)
from sdruntime.tokenizer import PromptTokenizer  # noqa: E402

WIDTH = 32  # tiny-sd's and sdxl-tiny's text encoders


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def a1111_pt(path, tensor: torch.Tensor, name: str):
    """A1111's embedding file, as its Embedding.save writes it."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor.clone().requires_grad_()},
        "name": name,
        "step": 1200,
        "sd_checkpoint": "7460a6fa",
        "sd_checkpoint_name": "model",
    }
    torch.save(data, path)
    return path


def diffusers_bin(path, token: str, tensor: torch.Tensor):
    """diffusers' learned_embeds.bin, as its training script saves it: a slice of the whole table (so the saved
    storage is the table's, read from an offset)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    table = torch.cat([torch.randn(7, tensor.shape[-1]), rows, torch.randn(2, tensor.shape[-1])])
    torch.save({token: table[7] if tensor.ndim == 1 else table[7 : 7 + len(rows)]}, path)
    return path


def emb_params(path, tensor: torch.Tensor):
    safetensors_torch.save_file({"emb_params": tensor.contiguous()}, str(path))
    return path


def diffusers_safetensors(path, token: str, tensor: torch.Tensor):
    safetensors_torch.save_file({token: tensor.contiguous()}, str(path))
    return path


def sdxl_file(path, clip_l: torch.Tensor, clip_g: torch.Tensor):
    safetensors_torch.save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


@pytest.fixture(scope="module")
def tokenizers(tiny32):
    return {"text_encoder": PromptTokenizer(tiny32 / "tokenizer" / "tokenizer.json", 77, 49407)}


# -- reading files without torch ------------------------------------------------------------------------------


def test_every_format_reads_as_torch_saved_it(tmp_path):
    v3, v1 = vectors(3), vectors(1, seed=1)
    cases = [
        (a1111_pt(tmp_path / "a.pt", v3, "<a1111>"), "<a1111>", v3),
        (diffusers_bin(tmp_path / "learned_embeds.bin", "<cat-toy>", v1[0]), "<cat-toy>", v1),
        (emb_params(tmp_path / "civitai.safetensors", v3), None, v3),
        (diffusers_safetensors(tmp_path / "learned_embeds.safetensors", "<toy>", v3), "<toy>", v3),
    ]
    for path, token, expected in cases:
        embedding = read_embedding(path)
        assert embedding.token == token, path.name
        np.testing.assert_array_equal(embedding.vectors[None], expected.numpy(), err_msg=path.name)
    sdxl = read_embedding(sdxl_file(tmp_path / "xl.safetensors", v3, vectors(3, 48, seed=2)))
    assert sdxl.token is None
    np.testing.assert_array_equal(sdxl.vectors["text_encoder"], v3.numpy())
    np.testing.assert_array_equal(sdxl.vectors["text_encoder_2"], vectors(3, 48, seed=2).numpy())


def test_torch_pickle_reads_views_dtypes_and_the_legacy_format(tmp_path):
    base = torch.randn(6, 5)
    saved = {
        "slice": base[2:4],  # an offset into a larger storage
        "transposed": base.t(),  # strides that are not C order
        "half": torch.nn.Parameter(base.half(), requires_grad=False),  # a parameter, fp16
        "bf16": base.bfloat16(),
        "nested": [(base[0], {"k": base[:, 1]})],
    }
    expected = {
        "slice": base[2:4].numpy(),
        "transposed": base.t().numpy(),
        "half": base.half().numpy(),
        "bf16": base.bfloat16().float().numpy(),
    }
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.pt"
        torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
        loaded = torch_pickle.load(path)
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype, key
            np.testing.assert_array_equal(loaded[key], value, err_msg=f"{key} legacy={legacy}")
        np.testing.assert_array_equal(loaded["nested"][0][0], base[0].numpy())
        np.testing.assert_array_equal(loaded["nested"][0][1]["k"], base[:, 1].numpy())


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_pickle_refuses_any_other_global_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": RunsACommand(marker)}, "name": "x"}, path)
    with pytest.raises(torch_pickle.TorchFileError) as refused:
        torch_pickle.load(path)
    message = str(refused.value)
    assert "system" in message and "refusing" in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(InvalidArgument):  # through the embedding reader too
        read_embedding(path)
    assert not marker.exists()


# -- tokens and refusals ------------------------------------------------------------------------------------------


def test_refusals_name_the_problem_in_one_line(tmp_path, tokenizers):
    widths = {"text_encoder": WIDTH}
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not an embedding at all")
    cases = {
        "48 wide": [a1111_pt(tmp_path / "wide.pt", vectors(2, 48), "<wide>")],
        "'cat' is already": [diffusers_bin(tmp_path / "cat.bin", "cat", vectors(1)[0])],
        "'<x>_1' is already": [
            diffusers_bin(tmp_path / "x.bin", "<x>", vectors(2)),
            ("<x>_1", diffusers_bin(tmp_path / "y.bin", "<y>", vectors(1))),
        ],
        "taken by another": [
            a1111_pt(tmp_path / "p.pt", vectors(1), "<p>"),
            a1111_pt(tmp_path / "q.pt", vectors(1), "<p>"),
        ],
        "names no token": [emb_params(tmp_path / "nameless.safetensors", vectors(2))],
        "cannot be read": [tmp_path / "missing.pt"],
        "not a readable": [junk],
        "SDXL's": [("<xl>", sdxl_file(tmp_path / "xl.safetensors", vectors(1), vectors(1)))],
    }
    for expected, specs in cases.items():
        with pytest.raises(InvalidArgument) as refused:
            resolve_embeddings(specs, tokenizers, widths)
        assert expected in str(refused.value) and "\n" not in str(refused.value), (expected, str(refused.value))
    # a name of its own is not needed when the user gives one
    resolved = resolve_embeddings([f"<named>={tmp_path / 'nameless.safetensors'}"], tokenizers, widths)
    assert resolved.added["text_encoder"].tokens == ("<named>", "<named>_1")


def test_spec_parsing(tmp_path):
    odd = tmp_path / "a=b.pt"
    odd.write_bytes(b"")
    assert EmbeddingSpec.parse("tok=emb.pt") == EmbeddingSpec(Path("emb.pt"), "tok")
    assert EmbeddingSpec.parse(str(odd)) == EmbeddingSpec(odd, None)  # a file whose name holds "="
    assert EmbeddingSpec.parse(("t", str(odd))) == EmbeddingSpec(odd, "t")
    assert EmbeddingSpec.parse(odd) == EmbeddingSpec(odd, None)


PROMPTS = [
    "A <Cat-Toy> backpack, <Cat-Toy>!",  # a 3-vector token, twice
    "a <cat-toy> is not the token (case matters)",
    "a<Cat-Toy>b sksy SKS dog",  # inside words; upper-case text around
    "an explicit <Cat-Toy>_1 and my tok,  my  tok",  # a token with a space; runs of spaces
    "<|startoftext|>sks<|endoftext|> café “q” &amp; 東京sks",
    "sks " * 40,  # truncated after expansion
    "",
]


def test_prompt_ids_match_transformers_after_diffusers_adds_the_tokens(tmp_path, tiny32, tokenizers):
    from transformers import CLIPTokenizer

    specs = [
        a1111_pt(tmp_path / "toy.pt", vectors(3), "<Cat-Toy>"),
        ("sks", diffusers_safetensors(tmp_path / "s.safetensors", "ignored", vectors(1))),
        ("my tok", emb_params(tmp_path / "m.safetensors", vectors(2))),
    ]
    resolved = resolve_embeddings(specs, tokenizers, {"text_encoder": WIDTH})
    ours = resolved.tokenizer("text_encoder", tokenizers["text_encoder"])
    reference = CLIPTokenizer.from_pretrained(str(tiny32 / "tokenizer"))
    mixin = diffusers.loaders.TextualInversionLoaderMixin()
    for token in resolved.added["text_encoder"].tokens:  # what load_textual_inversion does to the tokenizer
        reference.add_tokens(token)
    assert [reference.convert_tokens_to_ids(t) for t in resolved.added["text_encoder"].tokens] == list(
        range(49408, 49414)
    )
    for prompt in PROMPTS:
        converted = mixin.maybe_convert_prompt(prompt, reference)
        expected = reference(converted, padding="max_length", max_length=77, truncation=True).input_ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long prompt's truncation warning
            assert ours.ids(prompt) == expected, prompt
    assert tokenizers["text_encoder"].ids("sks")[1] == 48136  # the base tokenizer is unchanged


def test_table_places_each_vector_at_its_token_id(tmp_path, tokenizers):
    v = vectors(3)
    resolved = resolve_embeddings([a1111_pt(tmp_path / "t.pt", v, "<t>")], tokenizers, {"text_encoder": WIDTH})
    added = resolved.added["text_encoder"]
    base = np.random.default_rng(0).standard_normal((49408, WIDTH)).astype(np.float16)
    table = added.table(base)
    assert table.shape == (49411, WIDTH) and table.dtype == np.float16
    np.testing.assert_array_equal(table[:49408], base)
    ids = added.tokenizer.ids("<t>")[1:4]
    np.testing.assert_array_equal(table[ids], v.numpy().astype(np.float16))


# -- pictures against diffusers' load_textual_inversion ---------------------------------------------------------

PROMPT = "a photo of <Cat-Toy> on a table, sks style"
NEGATIVE = "blurry <Cat-Toy>"  # diffusers converts negative prompts too
SD_DRAW = {"num_inference_steps": 3, "height": 32, "width": 32}


def reference_sd(tiny_pipe, export, files):
    """diffusers' StableDiffusionPipeline on copies of tiny-sd's modules (load_textual_inversion changes them),
    each (file, token) loaded by load_textual_inversion in order, the runtime's euler scheduler."""
    from .test_pipeline import reference_scheduler

    parts = {**tiny_pipe.components, "scheduler": reference_scheduler(export, "euler")}
    parts["text_encoder"] = copy.deepcopy(tiny_pipe.text_encoder)
    parts["tokenizer"] = copy.deepcopy(tiny_pipe.tokenizer)
    ref = diffusers.StableDiffusionPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    for path, token in files:
        ref.load_textual_inversion(str(path), token=token)
    return ref


def draw_reference(ref, seed: int = 0, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return ref(PROMPT, negative_prompt=NEGATIVE, generator=generator, **SD_DRAW, **kwargs).images[0]


@pytest.fixture(scope="module")
def sd_ours(tiny32):
    from sdruntime import StableDiffusionPipeline

    return StableDiffusionPipeline.load(tiny32)


def draw_ours(pipe, embeddings, seed: int = 0):
    return pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=seed, scheduler="euler", embeddings=embeddings, **SD_DRAW
    ).images[0]


SD_FILES = {
    # name: (writer, the file's token or None, the token the prompt writes)
    "a1111-pt-multi": lambda p: (a1111_pt(p / "toy.pt", vectors(3), "<Cat-Toy>"), None),
    "diffusers-bin-single": lambda p: (diffusers_bin(p / "learned_embeds.bin", "<Cat-Toy>", vectors(1)[0]), None),
    "emb-params-safetensors": lambda p: (emb_params(p / "civitai.safetensors", vectors(2)), "<Cat-Toy>"),
    "diffusers-safetensors-multi": lambda p: (
        diffusers_safetensors(p / "l.safetensors", "<x>", vectors(4)),
        "<Cat-Toy>",
    ),
}


@pytest.mark.parametrize("kind", list(SD_FILES))
def test_sd_picture_matches_diffusers(kind, tmp_path, tiny_pipe, tiny32, sd_ours):
    from .test_pipeline import psnr

    path, token = SD_FILES[kind](tmp_path)
    sks = diffusers_safetensors(tmp_path / "sks.safetensors", "sks", vectors(1, seed=5))  # a second file, after
    theirs = draw_reference(reference_sd(tiny_pipe, tiny32, [(path, token), (sks, None)]))
    spec = f"{token}={path}" if token else str(path)
    mine = draw_ours(sd_ours, [spec, str(sks)])
    assert psnr(theirs, mine) >= 45.0
    plain = draw_ours(sd_ours, None)  # the same prompt without the embeddings: another picture
    assert psnr(plain, mine) < 45.0


def one_row_off(table):
    """A planted bug: the vectors placed one row past their ids (each token reads its predecessor's vector)."""

    def placed(self, base):
        rows = table(self, base)
        rows = np.concatenate([rows, np.zeros_like(rows[:1])])
        rows[self.first_id + 1 : self.first_id + len(self.tokens) + 1] = self.rows.astype(base.dtype)
        rows[self.first_id] = 0
        return rows

    return placed


def vectors_rolled(table):
    """A planted bug: a multi-vector embedding's vectors in the wrong order (TOKEN reads TOKEN_2's, ...)."""

    def placed(self, base):
        rows = table(self, base)
        rows[self.first_id : self.first_id + len(self.tokens)] = np.roll(self.rows, 1, axis=0).astype(base.dtype)
        return rows

    return placed


@pytest.mark.parametrize("bug", [one_row_off, vectors_rolled])
def test_sd_planted_placement_bug_is_caught(bug, tmp_path, tiny_pipe, tiny32, sd_ours, monkeypatch):
    from sdruntime import textual_inversion

    from .test_pipeline import psnr

    path = a1111_pt(tmp_path / "toy.pt", vectors(3), "<Cat-Toy>")
    draw = {"prompt": "<Cat-Toy>", "guidance_scale": 15.0, **SD_DRAW}  # the token alone: its vectors weigh most
    ref = reference_sd(tiny_pipe, tiny32, [(path, None)])
    theirs = ref(**draw, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert psnr(theirs, sd_ours(**draw, seed=0, scheduler="euler", embeddings=[str(path)]).images[0]) >= 45.0
    monkeypatch.setattr(textual_inversion.AddedTokens, "table", bug(textual_inversion.AddedTokens.table))
    again = tmp_path / "again.pt"  # another file (the cached set's sessions hold the right table)
    again.write_bytes(path.read_bytes())
    assert psnr(theirs, sd_ours(**draw, seed=0, scheduler="euler", embeddings=[str(again)]).images[0]) < 45.0


def test_sdxl_two_encoder_file_matches_diffusers(tmp_path, sdxl_pipe, sdxl32):
    from sdruntime import StableDiffusionPipeline

    from .test_pipeline import psnr
    from .test_sdxl_pipeline import reference_scheduler

    clip_l, clip_g = vectors(2, seed=7), vectors(2, seed=8)
    path = sdxl_file(tmp_path / "xl.safetensors", clip_l, clip_g)
    parts = {**sdxl_pipe.components, "scheduler": reference_scheduler(sdxl32, "euler")}
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        parts[name] = copy.deepcopy(sdxl_pipe.components[name])
    ref = diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    state = safetensors_torch.load_file(str(path))  # as diffusers' docs load SDXL embeddings: once per encoder
    ref.load_textual_inversion(state["clip_l"], token="<xl>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(
        state["clip_g"], token="<xl>", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2
    )
    prompt, draw = "a <xl> house", {"num_inference_steps": 3, "height": 32, "width": 32}
    theirs = ref(prompt, negative_prompt="<xl>", generator=torch.Generator("cpu").manual_seed(2), **draw).images[0]
    ours = StableDiffusionPipeline.load(sdxl32)
    mine = ours(prompt, negative_prompt="<xl>", seed=2, scheduler="euler", embeddings=[f"<xl>={path}"], **draw)
    assert psnr(theirs, mine.images[0]) >= 45.0
    swapped = sdxl_file(tmp_path / "swapped.safetensors", clip_g, clip_l)  # each encoder given the other's vectors
    wrong = ours(prompt, negative_prompt="<xl>", seed=2, scheduler="euler", embeddings=[f"<xl>={swapped}"], **draw)
    assert psnr(theirs, wrong.images[0]) < 45.0


# -- CLI and server -----------------------------------------------------------------------------------------------


def test_cli_embedding_flag_draws_the_python_apis_picture(tmp_path, tiny32, sd_ours, capsys):
    from PIL import Image
    from sdruntime.cli import main as sdruntime_main

    toy = a1111_pt(tmp_path / "toy.pt", vectors(3), "<Cat-Toy>")
    sks = emb_params(tmp_path / "sks.safetensors", vectors(1, seed=5))
    out = tmp_path / "x.png"
    args = ["generate", str(tiny32), PROMPT, "--negative-prompt", NEGATIVE, "--steps", "3", "--seed", "4"]
    args += ["--height", "32", "--width", "32", "--scheduler", "euler", "-o", str(out)]
    assert sdruntime_main([*args, "--embedding", str(toy), "--embedding", f"sks={sks}"]) == 0
    expected = sd_ours(
        PROMPT, negative_prompt=NEGATIVE, seed=4, scheduler="euler", embeddings=[toy, ("sks", sks)], **SD_DRAW
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))
    digests = [hashlib.sha256(path.read_bytes()).hexdigest()[:10] for path in (toy, sks)]
    assert (
        f'TI hashes: "toy: {digests[0]}, sks: {digests[1]}"' in expected.parameters[0]
    )  # A1111's names: file or token
    capsys.readouterr()
    for bad, says in [(str(tmp_path / "none.pt"), "not found: check the path"), (str(sks), "names no token")]:
        assert sdruntime_main([*args, "--embedding", bad]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("sdruntime: error: embedding ") and says in line, line


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embedding-dir")
    a1111_pt(folder / "cat_toy.pt", vectors(3), "<Cat-Toy>")
    emb_params(folder / "sks.safetensors", vectors(1, seed=5))
    (folder / "notes.txt").write_text("not an embedding")
    return folder


def test_server_embeddings_field_draws_generates_picture(sd_ours, embedding_dir):
    from PIL import Image
    from sdruntime.serving import draw_batch, embedding_files, model_facts, parse_request

    offered = embedding_files(embedding_dir)
    assert list(offered) == ["cat_toy", "sks"]
    facts = model_facts(sd_ours, embeddings=offered)
    assert facts.card()["embeddings"] == ["cat_toy", "sks"]
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "seed": 4, "size": "32x32", "scheduler": "euler"}
    for field in (["cat_toy", "sks=sks"], ["cat_toy.pt", {"name": "sks", "token": "sks"}]):
        request = parse_request({**body, "embeddings": field}, facts)
        assert request.embeddings == ((None, "cat_toy"), ("sks", "sks"))
    [result] = draw_batch(sd_ours, [request], 4, None, None, offered)
    expected = sd_ours(
        PROMPT,
        negative_prompt=NEGATIVE,
        seed=4,
        scheduler="euler",
        embeddings=[embedding_dir / "cat_toy.pt", ("sks", embedding_dir / "sks.safetensors")],
        **SD_DRAW,
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.images[0].png))), np.asarray(expected.images[0]))
    plain = parse_request(body, facts)
    assert plain.batch_key != request.batch_key  # one set of embeddings per U-Net batch
    [refused] = draw_batch(sd_ours, [parse_request({**body, "embeddings": ["sks"]}, facts)], 4, None, None, offered)
    assert refused.user_error and "names no token" in refused.error  # the file's own check, answered 400


@pytest.mark.parametrize(
    ("field", "says"),
    [
        (["../cat_toy"], "without a path"),
        (["<t>=/etc/passwd"], "without a path"),
        ([{"name": "sub/sks"}], "without a path"),
        (["nope"], "unknown embedding 'nope' in 'embeddings[0]': this server offers cat_toy, sks"),
        (["notes"], "unknown embedding 'notes'"),
        ([{"name": "sks", "token": ""}], "token must be a non-empty string"),
        ("cat_toy", "must be a list"),
    ],
)
def test_server_refuses_embeddings_outside_its_folder(sd_ours, embedding_dir, field, says):
    from sdruntime.serving import embedding_files, model_facts, parse_request

    facts = model_facts(sd_ours, embeddings=embedding_files(embedding_dir))
    with pytest.raises(InvalidArgument) as caught:
        parse_request({"prompt": PROMPT, "embeddings": field}, facts)
    assert says in str(caught.value)


def test_server_without_embedding_dir_refuses_the_field(sd_ours, tiny32, tmp_path, capsys):
    from sdruntime.cli import main as sdruntime_main
    from sdruntime.serving import model_facts, parse_request

    with pytest.raises(InvalidArgument, match="this server takes no embeddings: .* --embedding-dir"):
        parse_request({"prompt": PROMPT, "embeddings": ["sks"]}, model_facts(sd_ours))
    assert sdruntime_main(["serve", str(tiny32), "--embedding-dir", str(tmp_path / "none")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is not a folder" in line


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_refuse_embeddings(family):
    from sdruntime.request import GenerationRequest
    from sdruntime.transformer_plan import _refuse_unet_fields

    with pytest.raises(InvalidArgument, match=f"this {family} export does not take .*embeddings"):
        _refuse_unet_fields(GenerationRequest("a cat", embeddings=["x.pt"]), family)


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        (None, "records no weight map for its text_encoder (it predates run-time embeddings): re-export"),
        ({"x.weight": {"initializer": "x"}}, "no token table to extend (the weight map does not list it)"),
    ],
)
def test_an_export_without_the_token_table_in_its_weight_map_is_refused(tmp_path, tiny32, weights, says):
    import json
    import shutil

    from sdruntime import StableDiffusionPipeline

    folder = shutil.copytree(tiny32, tmp_path / "old")
    manifest = json.loads((folder / "sdexport.json").read_text())
    manifest["components"]["text_encoder"].pop("weights", None)
    if weights is not None:
        manifest["components"]["text_encoder"]["weights"] = weights
    (folder / "sdexport.json").write_text(json.dumps(manifest))
    path = a1111_pt(tmp_path / "toy.pt", vectors(1), "<t>")
    with pytest.raises(InvalidArgument) as refused:
        StableDiffusionPipeline.load(folder, verify=False)("a <t>", embeddings=[path], **SD_DRAW)
    assert says in str(refused.value) and "\n" not in str(refused.value)
