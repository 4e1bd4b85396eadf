"""CLIP tokenization from the exported `tokenizer.json`, with the `tokenizers` package only.

The text is first cleaned up as transformers' `CLIPTokenizer` (what diffusers' pipelines use) does
it: with `ftfy` when ftfy is installed, which straightens curly quotes, splits ligatures, narrows
full-width forms and unescapes HTML entities as CLIP's own tokenizer does; otherwise with BERT's
basic cleanup, which drops control and format characters and sets CJK ideographs apart. Either
way the ids are those diffusers gets in the same environment.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .manifest import ExportError

# CJK Unified Ideographs and their extensions and compatibility blocks (BERT's list)
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


def ftfy_cleanup(text: str, fix_text: Callable[[str], str]) -> str:
    """transformers' CLIPTokenizer with ftfy: fix_text, whitespace runs to one space, lower case."""
    return re.sub(r"\s+", " ", fix_text(text)).strip().lower()


def basic_cleanup(text: str) -> str:
    """transformers' CLIPTokenizer without ftfy: BasicTokenizer(strip_accents=False, do_split_on_punc=False)."""
    chars = []
    for char in text:
        code, category = ord(char), unicodedata.category(char)
        if code in (0, 0xFFFD) or (category.startswith("C") and char not in "\t\n\r"):
            continue
        if char in " \t\n\r" or category == "Zs":
            chars.append(" ")
        elif any(low <= code <= high for low, high in CJK_RANGES):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    return " ".join(word.lower() for word in unicodedata.normalize("NFC", "".join(chars)).split())


class PromptTokenizer:
    """Pads to `max_length` with the manifest's pad id and truncates like transformers does.

    Truncation keeps the start token, the first max_length - 2 prompt tokens and the end token,
    and warns with the number of tokens dropped. `fix_text` None picks ftfy when it is installed.
    """

    def __init__(self, path: Path, max_length: int, pad_id: int, fix_text: Callable[[str], str] | None = None):
        if not path.is_file():
            raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a file it cannot parse
            reason = " ".join(str(e).split())[:200]
            raise ExportError(
                f"{path} cannot be read ({reason}): run `sdexport convert` again to rewrite the export"
            ) from e
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_id = pad_id
        self.fix_text = fix_text or ftfy_fix_text()
        added = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
        self.added_tokens = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None

    def clean(self, prompt: str) -> str:
        """The cleanup of each stretch of text between special tokens, which stay as they are (as in transformers)."""
        pieces = self.added_tokens.split(prompt) if self.added_tokens else [prompt]
        return " ".join(
            piece if i % 2 else (ftfy_cleanup(piece, self.fix_text) if self.fix_text else basic_cleanup(piece))
            for i, piece in enumerate(pieces)
        )

    def ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(self.clean(prompt)).ids
        if len(ids) > self.max_length:
            dropped = len(ids) - self.max_length
            warnings.warn(
                f"the prompt is {len(ids)} tokens long; CLIP reads {self.max_length}, so the last "
                f"{dropped} were dropped: {prompt[-60:]!r}",
                stacklevel=3,
            )
            ids = ids[: self.max_length - 1] + ids[-1:]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([self.ids(p) for p in prompts], dtype=np.int64)
