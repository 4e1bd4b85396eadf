"""CLIP tokenization from the exported `tokenizer.json`, with the `tokenizers` package only."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .manifest import ExportError


class PromptTokenizer:
    """Pads to `max_length` with the manifest's pad id and truncates like transformers does.

    Truncation keeps the start token, the first max_length - 2 prompt tokens and the end token,
    and warns with the number of tokens dropped.
    """

    def __init__(self, path: Path, max_length: int, pad_id: int):
        if not path.is_file():
            raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_id = pad_id

    def ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
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
