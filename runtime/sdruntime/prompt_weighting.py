"""Embeddings of weighted and long prompts (prompt_syntax.py's structure) from the export's text encoders,
in NumPy, with compel's math (compel 2.1.1, `embeddings_provider.py` and `compel.py`,
`truncate_long_prompts=False`, either `downweight_mode`):

- Tokens: each fragment tokenized alone, the ids joined, each token carrying its fragment's weight.
- Chunks: 75 tokens at most, each framed by the start and end tokens and padded to 77; a prompt past 75
  tokens is cut at the last "." within the 75, else the last "," "." ";" ":", else the last word end
  (compel's SplitLongTextMode.SENTENCES).
- Weights: per chunk, `empty + (E(chunk) - empty) * w` per token, `empty` the encoding of an empty chunk.
- Weights below 1: the embedding is lerped towards the prompt's embedding without that fragment, with lerp
  weight tan((1 - w) * pi / 2) against 1 for the prompt itself, the weights normalized to sum 1. "Without" is,
  in "mask" (compel's default, DownweightMode.MASK), the same tokens and weights with the fragment's tokens
  masked out by the text encoder's attention_mask: every place from the fragment's first token to its last
  (in a fragment cut across chunks, the end token and pads of the chunk it leaves too), then each chunk's
  first and last place unmasked again; in "remove" (DownweightMode.REMOVE), the text re-tokenized without it.
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

from .errors import InvalidArgument
from .prompt_syntax import Blend, Fragment, ParsedPrompt, WeightedText
from .request import GenerationError
from .tokenizer import PromptTokenizer

SENTENCE_ENDS = frozenset({".</w>"})
PHRASE_ENDS = frozenset({".</w>", ",</w>", ";</w>", ":</w>"})
SMALLEST_WEIGHT = 1e-5  # compel's floor before tan(): weight 0 would lerp by infinity
DOWNWEIGHT_MODES = ("mask", "remove")  # compel's DownweightMode.MASK (its default) and REMOVE
DEFAULT_DOWNWEIGHT = "mask"
MASK_REFUSAL = (
    "this export's text encoders take no attention_mask, which downweight 'mask' (the default) needs for weights "
    "below 1: re-export it with this sdexport, or use downweight 'remove' (--downweight remove)"
)


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder as the weighting reads it: `embed` maps ids [N, L] and an attention mask [N, L] (or None:
    every token attends) to embeddings [N, L, D] (the hidden state the family takes), `pool` (SDXL's second
    encoder) maps ids to pooled embeddings [N, P]; `masks`: the encoder takes an attention mask."""

    tokenizer: PromptTokenizer
    embed: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    pool: Callable[[np.ndarray], np.ndarray] | None = None
    masks: bool = True


@dataclass(frozen=True)
class Chunks:
    """Token ids [C, L] (C chunks of the tokenizer's max length), each token's weight [C, L] and, where some
    tokens are masked out, the attention mask [C, L] (1 attends, 0 masked; None: every token attends)."""

    ids: np.ndarray
    weights: np.ndarray
    mask: np.ndarray | None = None


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


def chunk(tokenizer: PromptTokenizer, ids: list[int], weights: list[float]) -> tuple[Chunks, list[int]]:
    """Ids and their weights cut into chunks, each framed and padded to max_length (weight 1 outside the text),
    and the place of each id in the chunks laid end to end."""
    length = tokenizer.max_length
    start, end = frame(tokenizer)
    rows, row_weights, places = [], [], []
    while True:
        cut = split_point(tokenizer, ids, length - 2)
        body, ids = ids[:cut], ids[cut:]
        body_weights, weights = weights[:cut], weights[cut:]
        pad = length - 2 - len(body)
        places += range(len(rows) * length + 1, len(rows) * length + 1 + len(body))
        rows.append([start, *body, end] + [tokenizer.pad_id] * pad)
        row_weights.append([1.0, *body_weights, 1.0] + [1.0] * pad)
        if not ids:
            return Chunks(np.asarray(rows, np.int64), np.asarray(row_weights, np.float32)), places


def fragment_chunks(tokenizer: PromptTokenizer, fragments: Sequence[Fragment]) -> tuple[Chunks, list[range]]:
    """Each fragment tokenized alone, the ids joined, each token with its fragment's weight, then chunked;
    and each fragment's tokens' places in the chunks laid end to end (empty for a fragment without tokens)."""
    ids: list[int] = []
    weights: list[float] = []
    spans = []
    for fragment in fragments or (Fragment(""),):
        body = tokenizer.encode(fragment.text)[1:-1]
        spans.append((len(ids), len(ids) + len(body)))
        ids += body
        weights += [float(fragment.weight)] * len(body)
    chunks, places = chunk(tokenizer, ids, weights)
    return chunks, [range(places[a], places[b - 1] + 1) if b > a else range(0) for a, b in spans]


def masked_without(tokenizer: PromptTokenizer, chunks: Chunks, places: range) -> Chunks:
    """The chunks with a fragment's places masked out as compel's DownweightMode.MASK masks them: all of them
    from its first token to its last, then each chunk's first and last place attending again."""
    mask = np.ones(chunks.ids.size, np.int64)
    mask[places.start : places.stop] = 0
    length = tokenizer.max_length
    mask[0::length] = 1
    mask[length - 1 :: length] = 1
    return Chunks(chunks.ids, chunks.weights, mask.reshape(chunks.ids.shape))


def text_plan(tokenizer: PromptTokenizer, text: WeightedText, downweight: str = DEFAULT_DOWNWEIGHT) -> TextPlan:
    """The chunks of a weighted text and, for each fragment below weight 1, of the text without it (masked out,
    or removed, as `downweight` says)."""
    fragments = text.fragments
    base, spans = fragment_chunks(tokenizer, fragments)
    without = []
    for i, fragment in enumerate(fragments):
        if fragment.weight < 1:
            lerp = math.tan((1.0 - max(SMALLEST_WEIGHT, fragment.weight)) * math.pi / 2)
            if downweight == "mask":
                variant = masked_without(tokenizer, base, spans[i])
            else:
                variant = fragment_chunks(tokenizer, fragments[:i] + fragments[i + 1 :])[0]
            without.append((variant, lerp))
    return TextPlan(base, tuple(without))


def prompt_plan(tokenizer: PromptTokenizer, prompt: ParsedPrompt, downweight: str = DEFAULT_DOWNWEIGHT) -> PromptPlan:
    parts = []
    for part, weight in zip(prompt.parts, prompt.weights):
        if isinstance(part, Blend):
            plans = tuple(text_plan(tokenizer, text, downweight) for text in part.texts)
            parts.append((BlendPlan(plans, part.weights, part.normalize), weight))
        else:
            parts.append((text_plan(tokenizer, part, downweight), weight))
    return tuple(parts)


def downweighted(prompt: ParsedPrompt) -> bool:
    """Whether some fragment of the prompt weighs less than 1 (so downweighting has work to do)."""
    texts = [t for part in prompt.parts for t in (part.texts if isinstance(part, Blend) else (part,))]
    return any(f.weight < 1 for t in texts for f in t.fragments)


def chunk_rows(chunks: Chunks) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Each chunk's (ids, attention mask or None where every token attends)."""
    masks = chunks.mask if chunks.mask is not None else [None] * len(chunks.ids)
    return [(ids, None if mask is None or mask.all() else mask) for ids, mask in zip(chunks.ids, masks)]


def row_key(row: tuple[np.ndarray, np.ndarray | None]) -> bytes:
    ids, mask = row
    return ids.tobytes() + (b"" if mask is None else b"mask" + mask.tobytes())


def plan_rows(plan: PromptPlan) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Every chunk's (ids, attention mask or None) a prompt plan encodes."""
    texts = [t for part, _ in plan for t in (part.texts if isinstance(part, BlendPlan) else (part,))]
    chunks = [c for t in texts for c in (t.base, *(w for w, _ in t.without))]
    return [row for c in chunks for row in chunk_rows(c)]


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

    def __init__(self, encoder: TextEncoder, rows: Sequence[tuple[np.ndarray, np.ndarray | None]]):
        tokenizer = encoder.tokenizer
        start, end = frame(tokenizer)
        empty = (np.asarray([start, end] + [tokenizer.pad_id] * (tokenizer.max_length - 2), np.int64), None)
        unique = {row_key(row): row for row in (empty, *rows)}
        ids = np.stack([i for i, _ in unique.values()])
        masks = None  # fed only where some token is masked out: the same encoding as ones, in one run
        if any(m is not None for _, m in unique.values()):
            if not encoder.masks:
                raise GenerationError(MASK_REFUSAL)
            masks = np.stack([np.ones_like(i) if m is None else m for i, m in unique.values()])
        encoded = np.asarray(encoder.embed(ids, masks), np.float32)
        self.rows = dict(zip(unique, encoded))
        self.empty = self.rows[row_key(empty)]  # the empty prompt's embedding, one chunk

    def weighted(self, chunks: Chunks) -> np.ndarray:
        """Each token's embedding moved from the empty chunk's by its weight (compel's empty chunk is unmasked)."""
        z = np.stack([self.rows[row_key(row)] for row in chunk_rows(chunks)])
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
    prompts: Sequence[ParsedPrompt], encoders: Sequence[TextEncoder], downweight: str = DEFAULT_DOWNWEIGHT
) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings [N, T, D], pooled [N, P] or None) of N parsed prompts: each encoder's embeddings joined on
    features; T is the longest prompt's token count, shorter prompts padded with the empty prompt's embedding.
    Weights below 1 follow `downweight` ("mask" or "remove"). The pooled embeddings are the first pooling
    encoder's for each prompt's pooled_text (unmasked in either mode, as compel's get_pooled_embeddings)."""
    if downweight not in DOWNWEIGHT_MODES:
        raise InvalidArgument(f"unknown downweight {downweight!r}: choose {' or '.join(DOWNWEIGHT_MODES)}")
    results = []
    for encoder in encoders:
        plans = [prompt_plan(encoder.tokenizer, p, downweight) for p in prompts]
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
