"""The runtime's T5 prompt ids against transformers' T5TokenizerFast, called as diffusers' SD3 and Flux call it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sdruntime.manifest import ExportError
from sdruntime.t5_tokenizer import T5PromptTokenizer

FOLDER = Path(__file__).resolve().parents[2] / "models" / "t5-tokenizer-tiny"
LONG = " ".join(f"a red circle number {i} on a blue background, top left;" for i in range(90))
PROMPTS = [
    "a red circle on a blue background, center",
    "a photograph of an astronaut riding a horse",
    "A",
    "",
    " ",
    "   leading and trailing spaces   ",
    "many    spaces\tand\ttabs\nand\n\nnewlines",
    "UPPER case Words, MiXeD",
    "punctuation!!! ?? ... ;:,. (brackets) [square] {curly} \"quotes\" 'single' -- dashes",
    "café naïve résumé ÅNGSTRÖM ¡hola!",
    "ＦＵＬＬ　ｗｉｄｔｈ ｔｅｘｔ１２３ and ﬁsh ﬂower",  # NFKC folds these
    "東京の夜景, cyberpunk city at night",
    "emoji 🐱🔥 cat, Ⅳ ½ ² — dash – en",
    "\u00a0nbsp\u00a0here and a\u200bzero width",
    "numbers 1234567890 3.14 1,000,000 $5 50%",
    "a <extra_id_0> in the middle and </s> and <pad> and <unk> typed",
    "hyphen-ated under_scored slash/separated dots.in.words",
    "x" * 300,
    " ".join(["word"] * 75),
    " ".join(["word"] * 76),
    " ".join(["word"] * 77),
    LONG[:1200],
    LONG,
    LONG + " " + LONG,
]


# the normalizer and pre-tokenizer transformers 4.57 writes when it converts a sentencepiece T5 model
CONVERTED_FORM = {
    "normalizer": {
        "type": "Sequence",
        "normalizers": [
            {"type": "NFKC"},
            {"type": "Strip", "strip_left": False, "strip_right": True},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"},
        ],
    },
    "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
}


@pytest.fixture(scope="module")
def reference():
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(FOLDER))


@pytest.fixture(scope="module", params=["as shipped by SD3 and Flux", "as converted by transformers"])
def folder_and_reference(request, reference, tmp_path_factory):
    """The committed folder (WhitespaceSplit then Metaspace), and a copy in the newer converter's form."""
    if request.param.startswith("as shipped"):
        return FOLDER, reference
    from transformers import T5TokenizerFast

    folder = tmp_path_factory.mktemp("t5-converted-form")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((FOLDER / name).read_bytes())
    data = json.loads((FOLDER / "tokenizer.json").read_text(encoding="utf-8")) | CONVERTED_FORM
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return folder, T5TokenizerFast.from_pretrained(str(folder))


def diffusers_ids(reference, prompts: list[str], max_length: int) -> np.ndarray:
    """The call in diffusers 0.39's SD3 and Flux `_get_t5_prompt_embeds`, with NumPy for torch."""
    return reference(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="np",
    ).input_ids


def test_the_prompts_reach_past_each_max_length(reference):
    lengths = [len(reference(p).input_ids) for p in PROMPTS]
    assert max(lengths) > 512 and sum(n > 256 for n in lengths) >= 2 and sum(n > 77 for n in lengths) >= 4
    assert reference("").input_ids == [1] and reference.pad_token_id == 0


def test_the_two_forms_differ(folder_and_reference, reference):
    """Checking both is worth it: the converter's form keeps a tab as a character, WhitespaceSplit drops it."""
    folder, other = folder_and_reference
    same = other("a\tb").input_ids == reference("a\tb").input_ids
    assert same == (folder == FOLDER)


@pytest.mark.parametrize("max_length", [77, 256, 512])
def test_ids_match_t5_tokenizer_fast(folder_and_reference, max_length, recwarn):
    folder, reference = folder_and_reference
    ours = T5PromptTokenizer(folder / "tokenizer.json", max_length)
    got = ours(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), max_length)
    want = diffusers_ids(reference, PROMPTS, max_length)
    for prompt, row, expected in zip(PROMPTS, got, want):
        assert row.tolist() == expected.tolist(), prompt
    for prompt in PROMPTS:
        assert ours([prompt])[0].tolist() == diffusers_ids(reference, [prompt], max_length)[0].tolist(), prompt


def test_truncation_keeps_eos_last_and_warns():
    ours = T5PromptTokenizer(FOLDER / "tokenizer.json", 77)
    with pytest.warns(UserWarning, match="longer than the 77 tokens"):
        ids = ours([LONG])[0]
    assert ids[-1] == 1 and 0 not in ids and (ids == 1).sum() == 1


@pytest.mark.parametrize("saved_padding", [{"Fixed": 8}, "BatchLongest"])
def test_saved_padding_and_truncation_are_overridden(tmp_path, reference, saved_padding):
    data = json.loads((FOLDER / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Left", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {
        "strategy": saved_padding,
        "direction": "Left",
        "pad_to_multiple_of": None,
        "pad_id": 2,
        "pad_type_id": 0,
        "pad_token": "<unk>",
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    got = T5PromptTokenizer(path, 77)(PROMPTS[:6])
    assert got.tolist() == diffusers_ids(reference, PROMPTS[:6], 77).tolist()


def test_missing_and_non_t5_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="is missing: run `sdexport convert` again"):
        T5PromptTokenizer(tmp_path / "tokenizer.json", 77)
    data = json.loads((FOLDER / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ExportError, match="does not end a prompt with </s>"):
        T5PromptTokenizer(path, 77)


def test_module_imports_no_torch_or_transformers():
    script = (
        "import sys; from sdruntime.t5_tokenizer import T5PromptTokenizer; "
        f"T5PromptTokenizer(__import__('pathlib').Path({str(FOLDER / 'tokenizer.json')!r}), 77)(['a cat']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers', 'onnx')))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
