"""Embeddings of weighted and long prompts (prompt_syntax.py's structure) from the export's text encoders,
in NumPy, with compel's math (compel 2.1.1, `embeddings_provider.py` and `compel.py`,
`truncate_long_prompts=False`, `downweight_mode=DownweightMode.REMOVE`):

- Tokens: each fragment tokenized alone, the ids joined, each token carrying its fragment's weight.
- Chunks: 75 tokens at most, each framed by the start and end tokens and padded to 77; a prompt past 75
  tokens is cut at the last "." within the 75, else the last "," "." ";" ":", else the last word end
  (compel's SplitLongTextMode.SENTENCES).
- Weights: per chunk, `empty + (E(chunk) - empty) * w` per token, `empty` the encoding of an empty chunk.
- Weights below 1: the embedding is lerped towards the prompt's embedding with that fragment removed
  (re-tokenized without it), with lerp weight tan((1 - w) * pi / 2) against 1 for the prompt itself, the
  weights normalized to sum 1. compel's default, DownweightMode.MASK, masks the fragment out with an
  attention mask instead; an exported text encoder takes no attention mask, so this is the mode it can run.
  Where removing a fragment changes the chunk count (compel fails there) the shorter is padded as below.
- `.blend()`: the texts' embeddings summed with their weights (divided by their sum unless no_normalize).
- `.and()` and BREAK: the parts' embeddings joined along the token axis, each part first lerped from the
  empty prompt's by its weight.
- Prompts of different lengths (a prompt and its negative) are padded with the empty prompt's
  embedding (compel's pad_conditioning_tensors_to_same_length); the U-Net reads any sequence length.
- SDXL: both encoders' embeddings joined on features; the pooled embedding is the second encoder's for
  the prompt's raw text, truncated to one chunk, as compel's get_pooled_embeddings computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .prompt_syntax import Blend, Fragment, ParsedPrompt, WeightedText
from .tokenizer import PromptTokenizer

SENTENCE_ENDS = frozenset({".</w>"})
PHRASE_ENDS = frozenset({".</w>", ",</w>", ";</w>", ":</w>"})
SMALLEST_WEIGHT = 1e-5  # compel's floor before tan(): weight 0 would lerp by infinity


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder as the weighting reads it: `embed` maps ids [N, L] to embeddings [N, L, D] (the hidden
    state the family takes), `pool` (SDXL's second encoder) maps ids to pooled embeddings [N, P]."""

    tokenizer: PromptTokenizer
    embed: Callable[[np.ndarray], np.ndarray]
    pool: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class Chunks:
    """Token ids [C, L] (C chunks of the tokenizer's max length) and each token's weight [C, L]."""

    ids: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class TextPlan:
    """A weighted text's chunks, and for each fragment weighted below 1 the chunks without it and its lerp weight."""

    base: Chunks
    without: tuple[tuple[Chunks, float], ...]


@dataclass(frozen=True)
class BlendPlan:
    texts: tuple[TextPlan, ...]
    weights: tuple[float, ...]
    normalize: bool


PromptPlan = tuple[tuple[TextPlan | BlendPlan, float], ...]  # a ParsedPrompt's parts and their weights


# -- tokens and chunks --------------------------------------------------------------------------------


def frame(tokenizer: PromptTokenizer) -> tuple[int, int]:
    """The start and end tokens."""
    ids = tokenizer.encode("")
    return ids[0], ids[-1]


def split_point(tokenizer: PromptTokenizer, ids: list[int], limit: int) -> int:
    """Where the next chunk ends: all of `ids` when they fit, else after the last sentence end within `limit`
    tokens, else the last phrase end, else the last word end (compel's _find_next_best_split_point)."""
    if len(ids) <= limit:
        return limit
    texts = [tokenizer.tokenizer.id_to_token(i) or "" for i in ids[:limit]]
    for ends in (SENTENCE_ENDS.__contains__, PHRASE_ENDS.__contains__, lambda token: token.endswith("</w>")):
        for index in range(len(texts) - 1, -1, -1):
            if ends(texts[index]):
                return index + 1
    return limit


def chunk(tokenizer: PromptTokenizer, ids: list[int], weights: list[float]) -> Chunks:
    """Ids and their weights cut into chunks, each framed and padded to max_length (weight 1 outside the text)."""
    length = tokenizer.max_length
    start, end = frame(tokenizer)
    rows, row_weights = [], []
    while True:
        cut = split_point(tokenizer, ids, length - 2)
        body, ids = ids[:cut], ids[cut:]
        body_weights, weights = weights[:cut], weights[cut:]
        pad = length - 2 - len(body)
        rows.append([start, *body, end] + [tokenizer.pad_id] * pad)
        row_weights.append([1.0, *body_weights, 1.0] + [1.0] * pad)
        if not ids:
            return Chunks(np.asarray(rows, np.int64), np.asarray(row_weights, np.float32))


def fragment_chunks(tokenizer: PromptTokenizer, fragments: Sequence[Fragment]) -> Chunks:
    """Each fragment tokenized alone, the ids joined, each token with its fragment's weight, then chunked."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment in fragments or (Fragment(""),):
        body = tokenizer.encode(fragment.text)[1:-1]
        ids += body
        weights += [float(fragment.weight)] * len(body)
    return chunk(tokenizer, ids, weights)


def text_plan(tokenizer: PromptTokenizer, text: WeightedText) -> TextPlan:
    """The chunks of a weighted text and, for each fragment below weight 1, of the text without it."""
    fragments = text.fragments
    without = []
    for i, fragment in enumerate(fragments):
        if fragment.weight < 1:
            lerp = math.tan((1.0 - max(SMALLEST_WEIGHT, fragment.weight)) * math.pi / 2)
            without.append((fragment_chunks(tokenizer, fragments[:i] + fragments[i + 1 :]), lerp))
    return TextPlan(fragment_chunks(tokenizer, fragments), tuple(without))


def prompt_plan(tokenizer: PromptTokenizer, prompt: ParsedPrompt) -> PromptPlan:
    parts = []
    for part, weight in zip(prompt.parts, prompt.weights):
        if isinstance(part, Blend):
            plans = tuple(text_plan(tokenizer, text) for text in part.texts)
            parts.append((BlendPlan(plans, part.weights, part.normalize), weight))
        else:
            parts.append((text_plan(tokenizer, part), weight))
    return tuple(parts)


def plan_rows(plan: PromptPlan) -> list[np.ndarray]:
    """Every chunk's ids a prompt plan encodes."""
    texts = [t for part, _ in plan for t in (part.texts if isinstance(part, BlendPlan) else (part,))]
    chunks = [c for t in texts for c in (t.base, *(w for w, _ in t.without))]
    return [row for c in chunks for row in c.ids]


def pooled_ids(tokenizer: PromptTokenizer, text: str) -> list[int]:
    """The ids compel's get_pooled_embeddings feeds: the text truncated to one chunk and padded, then its
    first and last places set to the start and end tokens (so a short text ends in a pad, then the end token)."""
    length = tokenizer.max_length
    start, end = frame(tokenizer)
    body = tokenizer.encode(text)[1:-1][: length - 2]
    padded = [start, *body, end] + [tokenizer.pad_id] * (length - 2 - len(body))
    return [start, *padded[1:-1], end]


# -- embeddings -----------------------------------------------------------------------------------------


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float], normalize: bool) -> np.ndarray:
    """sum_k w_k * a_k in float32, the weights divided by their sum first when `normalize`
    (compel's apply_embedding_weights)."""
    w = np.asarray(weights, np.float32)
    if normalize:
        w = w / w.sum()
    return np.sum(np.stack(arrays) * w[:, None, None], axis=0)


class ChunkEmbeddings:
    """One text encoder's embedding of each distinct chunk the plans name, encoded in one run, and compel's
    arithmetic over them. Embeddings are [tokens, D], tokens a multiple of the tokenizer's max length."""

    def __init__(self, encoder: TextEncoder, rows: Sequence[np.ndarray]):
        tokenizer = encoder.tokenizer
        start, end = frame(tokenizer)
        empty = np.asarray([start, end] + [tokenizer.pad_id] * (tokenizer.max_length - 2), np.int64)
        unique = {row.tobytes(): row for row in (empty, *rows)}
        encoded = np.asarray(encoder.embed(np.stack(list(unique.values()))), np.float32)
        self.rows = dict(zip(unique, encoded))
        self.empty = self.rows[empty.tobytes()]  # the empty prompt's embedding, one chunk

    def weighted(self, chunks: Chunks) -> np.ndarray:
        """Each token's embedding moved from the empty chunk's by its weight."""
        z = np.stack([self.rows[row.tobytes()] for row in chunks.ids])
        return (self.empty + (z - self.empty) * chunks.weights[..., None]).reshape(-1, z.shape[-1])

    def pad(self, embeddings: np.ndarray, tokens: int) -> np.ndarray:
        """Padded to `tokens` with empty-prompt chunks."""
        missing = (tokens - len(embeddings)) // len(self.empty)
        return np.concatenate([embeddings, *[self.empty] * missing]) if missing else embeddings

    def padded(self, embeddings: list[np.ndarray]) -> list[np.ndarray]:
        tokens = max(len(e) for e in embeddings)
        return [self.pad(e, tokens) for e in embeddings]

    def text(self, plan: TextPlan) -> np.ndarray:
        """A weighted text, lerped towards each variant without a fragment weighted below 1."""
        base = self.weighted(plan.base)
        if not plan.without:
            return base
        variants = self.padded([base, *(self.weighted(chunks) for chunks, _ in plan.without)])
        return weighted_sum(variants, [1.0, *(lerp for _, lerp in plan.without)], normalize=True)

    def prompt(self, plan: PromptPlan) -> np.ndarray:
        """A prompt's parts, each lerped from the empty prompt by its weight, joined along the tokens."""
        pieces = []
        for part, weight in plan:
            if isinstance(part, BlendPlan):
                embedding = weighted_sum(self.padded([self.text(t) for t in part.texts]), part.weights, part.normalize)
            else:
                embedding = self.text(part)
            if weight != 1:
                empty = self.pad(self.empty, len(embedding))
                embedding = empty + (embedding - empty) * np.float32(weight)
            pieces.append(embedding)
        return np.concatenate(pieces)


def weighted_embeddings(
    prompts: Sequence[ParsedPrompt], encoders: Sequence[TextEncoder]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings [N, T, D], pooled [N, P] or None) of N parsed prompts: each encoder's embeddings joined on
    features; T is the longest prompt's token count, shorter prompts padded with the empty prompt's embedding.
    The pooled embeddings are the first pooling encoder's for each prompt's pooled_text."""
    results = []
    for encoder in encoders:
        plans = [prompt_plan(encoder.tokenizer, p) for p in prompts]
        chunks = ChunkEmbeddings(encoder, [row for plan in plans for row in plan_rows(plan)])
        results.append((chunks, [chunks.prompt(plan) for plan in plans]))
    tokens = max(len(e) for _, embeddings in results for e in embeddings)
    joined = np.concatenate(
        [np.stack([chunks.pad(e, tokens) for e in embeddings]) for chunks, embeddings in results], axis=-1
    )
    pooler = next((e for e in encoders if e.pool is not None), None)
    if pooler is None:
        return joined, None
    ids = np.asarray([pooled_ids(pooler.tokenizer, p.pooled_text) for p in prompts], np.int64)
    return joined, np.asarray(pooler.pool(ids), np.float32)
