"""Textual inversion at run time: embedding files read without torch, their tokens added to the tokenizers and
their vectors placed as new rows of the text encoders' token-embedding tables, as diffusers'
`load_textual_inversion` does.

Files: A1111's `.pt` ({"string_to_param": {"*": [n, dim]}, "name": ...}), A1111/civitai `.safetensors`
({"emb_params": [n, dim]}), diffusers' `learned_embeds.bin`/`.safetensors` ({token: [dim] or [n, dim]}), a bare
tensor, and SDXL's two-encoder `.safetensors` ({"clip_l": [n, 768], "clip_g": [n, 1280]}, which diffusers loads
with one `load_textual_inversion` call per tokenizer and encoder). The token is the one the user names, else the
file's own (A1111's name, diffusers' key); files that name none need one. An n-vector embedding adds the tokens
TOKEN, TOKEN_1, ..., TOKEN_{n-1}; a prompt's TOKEN becomes "TOKEN TOKEN_1 ..." (tokenizer.py). Tokens take the
ids from the tokenizer's size on, file after file, as `tokenizer.add_tokens` gives them in diffusers; the text
encoder then reads an enlarged table whose new rows hold the vectors (the table's initializer is overridden
when the session is created, see `AddedTokens.table`).
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import torch_pickle
from .errors import InvalidArgument
from .safetensors_io import read_safetensors
from .tokenizer import PromptTokenizer

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"  # the table's name in the manifest's weight map
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # SDXL files: which encoder each set is for


class EmbeddingError(InvalidArgument):
    """An embedding file or token this export cannot take; the message names the file and the fix."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """One embedding asked for: its file, and the token the prompt writes for it (None: the file's own)."""

    path: Path
    token: str | None = None

    @classmethod
    def parse(cls, value: str | Path | tuple | EmbeddingSpec) -> EmbeddingSpec:
        """ "[TOKEN=]FILE" (split at the first "=" unless the whole text names a file), a path, or (token, path)."""
        if isinstance(value, EmbeddingSpec):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            token, path = value
            return cls(Path(path), token or None)
        if isinstance(value, Path):
            return cls(value)
        if not isinstance(value, str) or not value:
            raise EmbeddingError(f"an embedding is '[TOKEN=]FILE' or a (token, file) pair, got {value!r}")
        token, sep, path = value.partition("=")
        if not sep or not token or Path(value).is_file():
            return cls(Path(value))
        return cls(Path(path), token)

    @classmethod
    def existing(cls, value: str | Path | tuple | EmbeddingSpec) -> EmbeddingSpec:
        """parse, refusing in one line a file that is not there (the CLI checks before any model loads)."""
        spec = cls.parse(value)
        if not spec.path.is_file():
            raise EmbeddingError(f"embedding {spec.path} not found: check the path (--embedding [TOKEN=]FILE)")
        return spec

    def identity(self) -> tuple:
        """What caches of drawn-with sessions key on: the token, the file and its size and change time."""
        try:
            stat = self.path.stat()
            changed = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            changed = None
        return (self.token, str(self.path.resolve()), changed)


@dataclass(frozen=True)
class Embedding:
    """One file's vectors, float32 [n, width]: keyed by text encoder for SDXL's files, by None for the others."""

    path: Path
    token: str | None  # the file's own token (A1111's name, diffusers' key); None when it names none
    vectors: Mapping[str | None, np.ndarray]


def load_file(path: Path) -> object:
    """What an embedding file holds: torch.save's pickle (read safely) or safetensors' tensors."""
    try:
        with path.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        raise EmbeddingError(f"embedding {path} cannot be read ({e.strerror or e}): check the path") from e
    if zipfile.is_zipfile(path) or first == b"\x80":  # torch.save's zip archive, or its legacy pickle
        return torch_pickle.load(path)
    return read_safetensors(path)[0]


def as_vectors(value: object, path: Path, what: str) -> np.ndarray:
    """An embedding's vectors as float32 [n, width] (a [width] vector is one row)."""
    if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or value.size == 0:
        shape = getattr(value, "shape", type(value).__name__)
        raise EmbeddingError(f"embedding {path}: {what} is {shape}, not vectors [n, width] or [width]")
    return np.atleast_2d(value).astype(np.float32)


def read_embedding(path: str | Path) -> Embedding:
    """Read one embedding file, telling its format by its keys as diffusers does (a one-key dict is diffusers'
    {token: vectors}; "string_to_param" is A1111's), plus A1111's "emb_params" and SDXL's "clip_l"/"clip_g"."""
    path = Path(path)
    contents = load_file(path)
    if isinstance(contents, np.ndarray):
        return Embedding(path, None, {None: as_vectors(contents, path, "its tensor")})
    if not isinstance(contents, dict):
        raise EmbeddingError(f"embedding {path} holds a {type(contents).__name__}, not a dict of vectors")
    if set(SDXL_KEYS) <= set(contents):
        vectors = {encoder: as_vectors(contents[key], path, key) for key, encoder in SDXL_KEYS.items()}
        return Embedding(path, None, vectors)
    if set(contents) == {"emb_params"}:  # A1111's safetensors: the token is the file's name in A1111
        return Embedding(path, None, {None: as_vectors(contents["emb_params"], path, "emb_params")})
    if len(contents) == 1:
        token, value = next(iter(contents.items()))
        return Embedding(path, str(token), {None: as_vectors(value, path, str(token))})
    params = contents.get("string_to_param")
    if isinstance(params, dict) and "*" in params:
        name = contents.get("name")
        return Embedding(
            path,
            name if isinstance(name, str) and name else None,
            {None: as_vectors(params["*"], path, "string_to_param")},
        )
    keys = ", ".join(sorted(map(str, contents)))[:120]
    raise EmbeddingError(
        f"embedding {path} has the keys {keys}: expected one token's vectors (diffusers), string_to_param (A1111), "
        "emb_params, or clip_l and clip_g (SDXL)"
    )


@dataclass(frozen=True)
class AddedTokens:
    """One text encoder's additions: its tokenizer with the tokens added, and their vectors, row i for the token
    whose id is first_id + i."""

    encoder: str
    tokenizer: PromptTokenizer
    tokens: tuple[str, ...]
    rows: np.ndarray  # float32 [len(tokens), width]
    first_id: int

    def table(self, base: np.ndarray) -> np.ndarray:
        """The token-embedding table with the new rows at their ids, in the base table's dtype; the table grows
        to hold them (diffusers' resize_token_embeddings), rows between keep zeros."""
        end = self.first_id + len(self.tokens)
        if base.ndim != 2 or base.shape[1] != self.rows.shape[1]:
            raise EmbeddingError(
                f"{self.encoder}'s token table is {list(base.shape)}, not [vocabulary, {self.rows.shape[1]}]: re-export"
            )
        table = np.zeros((max(len(base), end), base.shape[1]), base.dtype)
        table[: len(base)] = base
        table[self.first_id : end] = self.rows.astype(base.dtype)
        return table


@dataclass(frozen=True)
class TextualInversion:
    """A request's embeddings resolved against an export: for each text encoder that gains tokens, what it gains."""

    added: Mapping[str, AddedTokens]

    def tokenizer(self, encoder: str, base: PromptTokenizer) -> PromptTokenizer:
        """The encoder's tokenizer with this set's tokens, or `base` when it gains none."""
        return self.added[encoder].tokenizer if encoder in self.added else base


def encoder_vectors(embedding: Embedding, widths: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Which encoders an embedding's vectors go to: SDXL's sets to their encoders (those the export has); a plain
    set to the first encoder as wide as it (diffusers loads into the pipeline's first tokenizer and encoder)."""
    path = embedding.path
    if None not in embedding.vectors:
        if "text_encoder_2" not in widths:
            raise EmbeddingError(
                f"embedding {path} is SDXL's (clip_l and clip_g): this export has one text encoder, "
                "so it needs an embedding for that encoder alone"
            )
        chosen = {name: vectors for name, vectors in embedding.vectors.items() if name in widths}
    else:
        vectors = embedding.vectors[None]
        fitting = [name for name, width in widths.items() if width == vectors.shape[1]]
        if not fitting:
            raise EmbeddingError(
                f"embedding {path} is {vectors.shape[1]} wide and this export's text encoders are "
                f"{' and '.join(map(str, widths.values()))} wide: use an embedding trained for this model"
            )
        chosen = {fitting[0]: vectors}
    for name, vectors in chosen.items():
        if vectors.shape[1] != widths[name]:
            raise EmbeddingError(
                f"embedding {path} is {vectors.shape[1]} wide for {name}, which is {widths[name]} wide: "
                "use an embedding trained for this model"
            )
    return chosen


def resolve_embeddings(
    specs: Sequence[object], tokenizers: Mapping[str, PromptTokenizer], widths: Mapping[str, int]
) -> TextualInversion | None:
    """Read the embeddings asked for (EmbeddingSpec.parse forms) and add their tokens, file after file, to the
    tokenizers of the encoders they are for (`widths`: each text encoder's width). Refuses in one line a file it
    cannot read, a width this export lacks, a token the tokenizer already has (or whose TOKEN_1 it has), and a
    file that names no token when none is given. None when no embedding is asked for."""
    parsed = [EmbeddingSpec.parse(spec) for spec in specs]
    if not parsed:
        return None
    pending: dict[str, list[tuple[str, np.ndarray]]] = {name: [] for name in widths}
    for spec in parsed:
        embedding = read_embedding(spec.path)
        token = spec.token or embedding.token
        if not token:
            raise EmbeddingError(f"embedding {spec.path} names no token of its own: give it one, as TOKEN=FILE")
        for name, vectors in encoder_vectors(embedding, widths).items():
            taken = {t for t, _ in pending[name]}
            check_token(token, len(vectors), tokenizers[name], taken, spec.path)
            pending[name] += [(t, v) for t, v in zip(expanded_tokens(token, len(vectors)), vectors)]
    added = {}
    for name, entries in pending.items():
        if entries:
            tokens = tuple(t for t, _ in entries)
            base = tokenizers[name]
            added[name] = AddedTokens(
                name, base.with_added_tokens(tokens), tokens, np.stack([v for _, v in entries]), base.vocabulary_size
            )
    return TextualInversion(added)


def expanded_tokens(token: str, count: int) -> list[str]:
    """An n-vector embedding's tokens: TOKEN, TOKEN_1, ..., TOKEN_{n-1} (diffusers' multi-vector names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def check_token(token: str, count: int, tokenizer: PromptTokenizer, taken: set[str], path: Path) -> None:
    """diffusers' refusals, a token already in the vocabulary or whose TOKEN_1 is; and any of the n tokens an
    n-vector embedding adds being there or added before (diffusers would overwrite that token's row)."""
    for name in dict.fromkeys([*expanded_tokens(token, count), f"{token}_1"]):
        if tokenizer.has_token(name) or name in taken:
            raise EmbeddingError(
                f"embedding {path}: the token '{name}' is already in the tokenizer's vocabulary or taken by another "
                "embedding: give it another, as OTHER=FILE"
            )


@functools.lru_cache(maxsize=64)
def file_hash(path: str, changed: tuple | None) -> str:
    """A file's sha256, computed once per version of it (size and change time); "" when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def encoder_widths(manifest) -> dict[str, int]:
    """Each text encoder's width (its token vectors'): the last axis of its last_hidden_state."""
    widths = {}
    for name in ("text_encoder", "text_encoder_2"):
        if manifest.has(name):
            outputs = {o.name: o.shape for o in manifest.components[name].outputs}
            widths[name] = int(outputs["last_hidden_state"][-1])
    return widths


@dataclass(frozen=True)
class Embeddings:
    """A request's embeddings as an adapter set's source of changes (adapters.OverrideSource): applied, they give
    the text encoders enlarged token tables (their initializers overridden) and the tokenizers that know the tokens."""

    specs: tuple[EmbeddingSpec, ...]

    @classmethod
    def of(cls, embeddings: object) -> Embeddings | None:
        """From a request's `embeddings`: a list of "[TOKEN=]FILE" strings, paths or (TOKEN, FILE) pairs, or one of
        them; None when there are none."""
        if embeddings is None:
            return None
        if isinstance(embeddings, (str, Path, EmbeddingSpec)):
            embeddings = [embeddings]
        elif not isinstance(embeddings, (list, tuple)):
            raise EmbeddingError(f"embeddings must be a list of '[TOKEN=]FILE' strings, got {embeddings!r}")
        specs = tuple(EmbeddingSpec.parse(e) for e in embeddings)
        return cls(specs) if specs else None

    @classmethod
    def sources(cls, embeddings: object) -> tuple[Embeddings, ...]:
        """An adapter set's sources for a request's `embeddings`: this one, or none."""
        found = cls.of(embeddings)
        return (found,) if found is not None else ()

    @property
    def key(self) -> tuple:
        return ("embeddings", tuple(spec.identity() for spec in self.specs))

    def hashes(self) -> str:
        """A1111's "TI hashes" text: each embedding's token when given, else its file's name (A1111 names an
        embedding by its file), and the first 10 hex digits of the file's sha256."""
        return ", ".join(
            f"{spec.token or spec.path.stem}: {file_hash(*spec.identity()[1:])[:10]}" for spec in self.specs
        )

    def apply(self, target, changes) -> None:
        """Resolve the embeddings against the target's tokenizers (as earlier sources left them) and place their
        rows: each changed encoder's token table, read from the graph (or as changed), enlarged in its dtype."""
        tokenizers = {name: changes.tokenizers.get(name, base) for name, base in target.base_tokenizers.items()}
        widths = {name: width for name, width in encoder_widths(target.manifest).items() if name in tokenizers}
        resolved = resolve_embeddings(self.specs, tokenizers, widths)
        for encoder, added in resolved.added.items():
            if getattr(target.manifest.components[encoder], "quantization", None) is not None:
                raise EmbeddingError(
                    f"this export's {encoder} is int8-quantized and records no weight map: run-time embeddings "
                    "need one; export without --quantize"
                )
            name = table_initializer(getattr(target.manifest.components[encoder], "weights", None), encoder)
            base = target.initializers(encoder, [name], changes)[name]
            changes.initializers.setdefault(encoder, {})[name] = added.table(base)
            changes.tokenizers[encoder] = added.tokenizer


def table_initializer(weights: Mapping[str, Mapping] | None, encoder: str) -> str:
    """The initializer that holds an encoder's token table as it is ([vocabulary, width], no layout steps), from
    the manifest's weight map."""
    if not weights:
        raise EmbeddingError(
            f"this export records no weight map for its {encoder} (it predates run-time embeddings): "
            "re-export it with `sdexport convert`"
        )
    recipe = weights.get(TOKEN_EMBEDDING) or {}
    if not recipe.get("initializer") or any(recipe.get(k) for k in ("steps", "view", "at")):
        why = recipe.get("why") or ("it is laid out another way" if recipe else "the weight map does not list it")
        raise EmbeddingError(
            f"this export's {encoder} graph has no token table to extend ({why}): re-export it with `sdexport convert`"
        )
    return recipe["initializer"]
