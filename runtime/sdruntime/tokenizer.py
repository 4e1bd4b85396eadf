"""CLIP tokenization from the exported `tokenizer.json`, with the `tokenizers` package only.

The text is first cleaned up as transformers' `CLIPTokenizer` (what diffusers' pipelines use) does
it: with `ftfy` when ftfy is installed, which straightens curly quotes, splits ligatures, narrows
full-width forms and unescapes HTML entities as CLIP's own tokenizer does; otherwise with BERT's
basic cleanup, which drops control and format characters and sets CJK ideographs apart. Either
way the ids are those diffusers gets in the same environment.
"""

from __future__ import annotations

import copy
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
        self.textual_inversion_ids: dict[str, int] = {}  # with_added_tokens
        self._vocabulary: frozenset[str] | None = None
        self._split_on_added_tokens()

    def _split_on_added_tokens(self) -> None:
        """The pattern that sets added tokens apart, longest first, as transformers' trie matches them."""
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        added = sorted({*added, *self.textual_inversion_ids}, key=len, reverse=True)
        self.added_contents = frozenset(added)
        self.added_tokens = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None

    @property
    def vocabulary_size(self) -> int:
        """The tokenizer's size with its added tokens: the id the next added token takes (transformers' len())."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True) + len(self.textual_inversion_ids)

    def has_token(self, token: str) -> bool:
        """Whether `token` is in the vocabulary or among the added tokens (transformers' get_vocab())."""
        if self._vocabulary is None:
            self._vocabulary = frozenset(self.tokenizer.get_vocab(with_added_tokens=True))
        return token in self._vocabulary or token in self.textual_inversion_ids

    def with_added_tokens(self, tokens: tuple[str, ...]) -> PromptTokenizer:
        """A copy with `tokens` (new ones) added as diffusers' load_textual_inversion adds them
        (`tokenizer.add_tokens`): ids from vocabulary_size on, matched as they are written (case and all) anywhere
        in a prompt, even inside a word, before the text around them is cleaned up and lower-cased. This
        tokenizer stays as it is."""
        extended = copy.copy(self)
        first = self.vocabulary_size
        extended.textual_inversion_ids = {**self.textual_inversion_ids, **{t: first + i for i, t in enumerate(tokens)}}
        extended._split_on_added_tokens()
        return extended

    def expand_multi_vector(self, prompt: str) -> str:
        """diffusers' maybe_convert_prompt: each added TOKEN in the prompt that has TOKEN_1, ... added too is
        replaced (as text, everywhere) by "TOKEN TOKEN_1 ...", so that each of its vectors gets a place."""
        for token in dict.fromkeys(self.added_tokens.findall(prompt)):
            replacement, i = token, 1
            while f"{token}_{i}" in self.added_contents:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
        return prompt

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids with the start and end tokens, untruncated. With textual-inversion tokens, each
        stretch between added tokens is cleaned up and encoded alone, as transformers' slow tokenizer does."""
        if not self.textual_inversion_ids:
            return self.tokenizer.encode(self.clean(prompt)).ids
        body = []
        for i, piece in enumerate(self.added_tokens.split(self.expand_multi_vector(prompt))):
            if i % 2 and piece in self.textual_inversion_ids:
                body.append(self.textual_inversion_ids[piece])
            else:
                body += self.tokenizer.encode(piece if i % 2 else self.clean(piece), add_special_tokens=False).ids
        start, end = self.tokenizer.encode("").ids  # the post-processor's frame: CLIP's start and end tokens
        return [start, *body, end]

    def clean(self, prompt: str) -> str:
        """The cleanup of each stretch of text between special tokens, which stay as they are (as in transformers)."""
        pieces = self.added_tokens.split(prompt) if self.added_tokens else [prompt]
        return " ".join(
            piece if i % 2 else (ftfy_cleanup(piece, self.fix_text) if self.fix_text else basic_cleanup(piece))
            for i, piece in enumerate(pieces)
        )

    def ids(self, prompt: str) -> list[int]:
        ids = self.encode(prompt)
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
