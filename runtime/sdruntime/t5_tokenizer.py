"""T5 tokenization from an export's `tokenizer.json`, with the `tokenizers` package only.

Matches transformers' `T5TokenizerFast` as diffusers' SD3 (`tokenizer_3`) and Flux (`tokenizer_2`)
pipelines call it: `padding="max_length", max_length=max_sequence_length, truncation=True`, special
tokens added. T5TokenizerFast does no text cleanup of its own: the file's normalizer, pre-tokenizer
and post-processor (which appends </s>) are the whole of it, so they are used as saved. Padding and
truncation are set here, since a saved file may carry other settings that transformers overrides.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .manifest import ExportError

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"


def read_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a file it cannot parse
        reason = " ".join(str(e).split())[:200]
        raise ExportError(
            f"{path} cannot be read ({reason}): run `sdexport convert` again to rewrite the export"
        ) from e


class T5PromptTokenizer:
    """Ids [n, max_length]: the prompt's tokens, </s>, then <pad> to max_length.

    A longer prompt keeps its first max_length - 1 tokens and </s> last, as transformers truncates
    it, with a warning naming how many tokens were dropped.
    """

    def __init__(self, path: Path, max_length: int):
        self.tokenizer = read_tokenizer(path)
        pad_id, eos_id = self.tokenizer.token_to_id(PAD_TOKEN), self.tokenizer.token_to_id(EOS_TOKEN)
        if pad_id is None or eos_id is None:
            raise ExportError(
                f"{path} has no {PAD_TOKEN} or {EOS_TOKEN} token, so it is not a T5 tokenizer: "
                "export the model again from a source with T5's tokenizer"
            )
        # a saved padding or truncation would change this probe's ids; both are set below
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if self.tokenizer.encode("").ids != [eos_id]:
            raise ExportError(
                f"{path} does not end a prompt with {EOS_TOKEN} as T5's tokenizer does: "
                "export the model again from a source with T5's tokenizer"
            )
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id
        # transformers' "max_length" padding and truncation=True (longest_first, on the right)
        self.tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        self.tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=PAD_TOKEN, length=max_length)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        for prompt, encoding in zip(prompts, encodings):
            if encoding.overflowing:
                dropped = sum(o.special_tokens_mask.count(0) for o in encoding.overflowing)
                warnings.warn(
                    f"the prompt is longer than the {self.max_length} tokens T5 reads here, so its end was "
                    f"dropped ({dropped} tokens): {prompt[-60:]!r}",
                    stacklevel=2,
                )
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_length)
