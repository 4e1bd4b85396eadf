"""The runtime's prompt ids against transformers' CLIPTokenizer, with ftfy and with its fallback."""

from __future__ import annotations

import pytest
from sdruntime.tokenizer import PromptTokenizer, basic_cleanup, ftfy_cleanup, ftfy_fix_text

PROMPTS = [
    "a red circle on a blue background, center",
    "a “quoted” word, it’s fine",  # curly quotes: ftfy straightens them
    "ﬁsh ﬂower ﬀ ﬃ",  # ligatures
    "ＦＵＬＬ　ｗｉｄｔｈ ｔｅｘｔ１２３",  # full-width forms and an ideographic space
    "cats &amp; dogs &lt;3",  # HTML entities
    "東京の夜景, cyberpunk",  # CJK ideographs (set apart without ftfy) and kana
    "café naïve résumé ÅNGSTRÖM ¡hola!",
    "cafe\u0301 decomposed",  # NFC
    "tabs\tand\nnewlines   many  spaces ",
    "emoji 🐱🔥 cat, Ⅳ ½ ² — dash – en",
    "don't STOP, we'll see; I'd",
    "\u00a0nbsp\u00a0here and a\u200bzero width",
    "control\x07char and \ufffd replacement",
    "mojibake cafÃ©",
    "a &amp; b <|endoftext|> c &amp; d<|startoftext|>e",  # special tokens: each stretch between them is cleaned
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tiny32):
    from transformers import CLIPTokenizer

    folder = tiny32 / "tokenizer"
    return folder, CLIPTokenizer.from_pretrained(str(folder))


def reference_ids(reference, prompt: str) -> list[int]:
    return reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_ids_match_clip_tokenizer_with_ftfy(tokenizers):
    folder, reference = tokenizers
    if reference.fix_text is None:
        pytest.skip("ftfy is not installed")
    ours = PromptTokenizer(folder / "tokenizer.json", 77, 49407)
    assert ours.fix_text is not None
    for prompt in PROMPTS:
        assert ours.ids(prompt) == reference_ids(reference, prompt), prompt


def test_ids_match_clip_tokenizer_without_ftfy(tokenizers, monkeypatch):
    import sdruntime.tokenizer as tokenizer
    from transformers.models.clip.tokenization_clip import BasicTokenizer

    folder, reference = tokenizers
    monkeypatch.setattr(reference, "fix_text", None)
    monkeypatch.setattr(reference, "nlp", BasicTokenizer(strip_accents=False, do_split_on_punc=False), raising=False)
    monkeypatch.setattr(tokenizer, "ftfy_fix_text", lambda: None)
    ours = tokenizer.PromptTokenizer(folder / "tokenizer.json", 77, 49407)
    assert ours.fix_text is None
    for prompt in PROMPTS:
        assert ours.ids(prompt) == reference_ids(reference, prompt), prompt


def test_the_two_cleanups_differ_where_ftfy_repairs():
    fix_text = ftfy_fix_text()
    if fix_text is None:
        pytest.skip("ftfy is not installed")
    assert ftfy_cleanup("It’s  ＦＵＬＬ &amp;", fix_text) == "it's full &"
    assert basic_cleanup("It’s  ＦＵＬＬ &amp;") == "it’s ｆｕｌｌ &amp;"
    assert basic_cleanup("東京​") == "東 京"
