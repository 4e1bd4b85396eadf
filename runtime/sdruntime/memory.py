"""How much memory a request needs, how much this process may use, and how a request is cut to fit.

`MemoryModel` estimates the peak resident memory a generation adds to a loaded pipeline, per component,
from the export's component configs: ONNX Runtime's activations grow with rows x pixels x channels at each
resolution level, and attention's score matrices with rows x heads x tokens^2 at each attention level. Each
session keeps its arena after a run, so the peaks of the text encoder, the U-Net and the VAE decoder add up.
The coefficients were measured with `scripts/memory_estimate.py` (docs/benchmarks.md): the estimate is meant
to stay above the measured peak, since an underestimate is the crash this module exists to prevent.

`MemoryBudget` says how much the process may hold: `--max-memory`, else what the machine (and its cgroup)
has free now, less a margin. `admit` decides, once per request, how many rows each U-Net and VAE decoder
call takes: all of them when they fit, fewer when not (the same pixels: each row is computed alone), and
refuses in one line an image whose single row cannot fit, naming the largest size that would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .request import GenerationError

FLOAT_BYTES = 4  # the CPU EP computes in fp32 even for fp16 graphs (it casts around most ops)
# bytes per row, per pixel of a level, per channel: measured 13 (U-Net) and 5.5 (VAE decoder) x 4 on shapes
UNET_LEVEL_BYTES = 16 * FLOAT_BYTES
VAE_LEVEL_BYTES = 8 * FLOAT_BYTES
# attention's live copies of one score matrix (scores, softmax, the arena's rounding): measured 2.1-2.2
ATTENTION_COPIES = 3
# per row, per text token and attention channel: the keys and values cross-attention projects (measured on
# tiny-sd, whose 4x4 latents leave little else: 200 KB a row)
CONTEXT_BYTES = 10 * FLOAT_BYTES
CALL_BYTES = 16 * 2**20  # a session's first run at any size: its arena's first region, its threads' buffers
TEXT_TOKEN_BYTES = 48 * FLOAT_BYTES  # per token and hidden unit of a text-encoder row: measured 33 x 4
# what the loop holds outside ONNX Runtime: per U-Net row its latents (several copies) and embeddings,
# per image the decoded float32 pixels, their uint8 form and the PIL image
LATENT_COPIES = 8
EMBEDDING_COPIES = 4
IMAGE_BYTES_PER_PIXEL = 3 * (3 * FLOAT_BYTES + 2)
MARGIN_FRACTION = 0.1  # of the free memory, left to the rest of the machine when no limit is given
MARGIN_MIN_BYTES = 128 * 2**20
SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class MemoryRefused(GenerationError):
    """A request whose smallest piece (one row at its size) needs more memory than the budget allows."""

    def __init__(self, message: str, needed: int, budget: int, largest_side: int | None):
        super().__init__(message)
        self.needed = needed
        self.budget = budget
        self.largest_side = largest_side


def parse_memory_size(text: str) -> int:
    """'2GiB', '1.5G', '512MiB', '512M' or a number of bytes -> bytes (binary units, as `free -h` shows them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise GenerationError(f"memory size {text!r} is not a size such as 2GiB, 512MiB or 1.5G")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def format_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**20:.0f} MiB"


# -- what the machine has ---------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _meminfo(key: str) -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def free_memory() -> int | None:
    """Bytes this process could still take: the machine's available memory, or its cgroup's room if smaller
    (cgroup v2, then v1); None where neither can be read (not Linux)."""
    candidates = [_meminfo("MemAvailable")]
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for no limit
            candidates.append(max(0, limit - usage))
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def resident_memory() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


@dataclass(frozen=True)
class MemoryBudget:
    """How much resident memory this process may reach while drawing: `limit` bytes in all (--max-memory),
    or, with none, what it holds now plus what the machine has free, less a margin."""

    limit: int | None = None

    def total(self) -> int | None:
        """The process's allowed peak in bytes now; None where nothing can be known (no limit, no /proc)."""
        if self.limit is not None:
            return self.limit
        free = free_memory()
        if free is None:
            return None
        return resident_memory() + free - max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * free))


# -- what a request needs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvNetMemory:
    """A convolutional component's activation memory: (channels, area) per resolution level and (heads,
    area, channels) per self-attention level, the area as a multiple of the input's (1/4 one level down, 4 one up),
    and the length of the sequence it cross-attends to."""

    levels: tuple[tuple[int, float], ...]
    attention: tuple[tuple[int, float, int], ...]  # (heads, area, channels)
    level_bytes: int
    context: int = 0  # cross-attention's key length (the text tokens), 0 for none

    def peak(self, rows: int, height: int, width: int) -> int:
        """Bytes for `rows` rows of a height x width input (the latents, for the U-Net and the VAE decoder)."""
        pixels = height * width
        activations = sum(channels * area * pixels for channels, area in self.levels) * self.level_bytes
        scores = max(
            (heads * area * pixels * (area * pixels + self.context) for heads, area, _ in self.attention), default=0
        )
        # the keys and values projected from the text at each attention level, whatever the size
        context = self.context * sum(channels for _, _, channels in self.attention) * CONTEXT_BYTES
        return CALL_BYTES + int(rows * (activations + context + ATTENTION_COPIES * FLOAT_BYTES * scores))


def _unet_memory(config: dict, context: int) -> ConvNetMemory:
    """Level i (i downsamplers in) holds block_out_channels[i] at 1/4**i of the latents' area."""
    channels = config["block_out_channels"]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8  # diffusers' naming
    heads = heads if isinstance(heads, list) else [heads] * len(channels)
    attended = {i for i, kind in enumerate(config.get("down_block_types", ())) if "CrossAttn" in kind}
    attended |= {
        len(channels) - 1 - i for i, kind in enumerate(config.get("up_block_types", ())) if "CrossAttn" in kind
    }
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        attended.add(len(channels) - 1)
    return ConvNetMemory(
        tuple((int(c), 4.0**-i) for i, c in enumerate(channels)),
        tuple((int(heads[i]), 4.0**-i, int(channels[i])) for i in sorted(attended)),
        UNET_LEVEL_BYTES,
        context,
    )


def _vae_decoder_memory(config: dict) -> ConvNetMemory:
    """The decoder goes up from the latents: its widest channels at their area, each level after at 4 times
    the one before; its mid block attends over the latents with one head."""
    channels = list(reversed(config["block_out_channels"]))
    attention = ((1, 1.0, channels[0]),) if config.get("mid_block_add_attention", True) else ()
    return ConvNetMemory(tuple((int(c), 4.0**j) for j, c in enumerate(channels)), attention, VAE_LEVEL_BYTES)


@dataclass(frozen=True)
class TextMemory:
    hidden: int
    heads: int
    tokens: int

    def peak(self, rows: int) -> int:
        per_token = self.hidden * TEXT_TOKEN_BYTES + ATTENTION_COPIES * FLOAT_BYTES * self.heads * self.tokens
        return CALL_BYTES + rows * self.tokens * per_token


@dataclass(frozen=True)
class Pieces:
    """How a request is drawn: rows per U-Net call and images per VAE decoder call."""

    unet_rows: int
    decoder_rows: int
    estimate: int  # the estimated peak in bytes the generation adds to the loaded pipeline


@dataclass(frozen=True)
class RequestShape:
    """What a plan asks of memory: images, the U-Net's rows (doubled by classifier-free guidance), the text
    encoder's rows, and the size in pixels."""

    images: int
    unet_rows: int
    text_rows: int
    height: int
    width: int


@dataclass(frozen=True)
class MemoryModel:
    """An export's memory estimate, from its component configs."""

    vae_factor: int
    latent_channels: int
    size_multiple: int
    unet: ConvNetMemory
    decoder: ConvNetMemory
    text: tuple[TextMemory, ...]

    @classmethod
    def of(cls, manifest) -> MemoryModel | None:
        """The export's model, or None where its component configs cannot be read (then nothing is estimated)."""
        try:
            return cls._read(manifest)
        except (OSError, KeyError, TypeError, ValueError):
            return None

    @classmethod
    def _read(cls, manifest) -> MemoryModel:
        folder, facts = Path(manifest.folder), manifest.pipeline

        def config(name: str) -> dict:
            return json.loads((folder / name / "config.json").read_text())

        tokens = int(facts.tokenizer_max_length)
        texts = []
        for name in ("text_encoder", "text_encoder_2"):
            if manifest.has(name):
                c = config(name)
                texts.append(TextMemory(int(c["hidden_size"]), int(c["num_attention_heads"]), tokens))
        return cls(
            vae_factor=int(facts.vae_scale_factor),
            latent_channels=int(facts.latent_channels),
            size_multiple=int(manifest.size_multiple),
            unet=_unet_memory(config("unet"), tokens),
            decoder=_vae_decoder_memory(config("vae_decoder")),
            text=tuple(texts),
        )

    def peak(self, shape: RequestShape, unet_rows: int, decoder_rows: int) -> int:
        """Estimated bytes a generation adds at its peak when cut into pieces of these rows."""
        h, w = shape.height // self.vae_factor, shape.width // self.vae_factor
        hidden = sum(t.hidden for t in self.text)
        held = shape.unet_rows * (LATENT_COPIES * self.latent_channels * h * w + EMBEDDING_COPIES * 77 * hidden)
        held = held * FLOAT_BYTES + shape.images * shape.height * shape.width * IMAGE_BYTES_PER_PIXEL
        text = sum(t.peak(shape.text_rows) for t in self.text)
        return held + text + self.unet.peak(unet_rows, h, w) + self.decoder.peak(decoder_rows, h, w)


def admit(model: MemoryModel | None, shape: RequestShape, budget_bytes: int | None) -> Pieces:
    """The largest pieces whose estimate fits `budget_bytes` (None: no limit known, one piece); refuse in
    one line when even one row does not fit."""
    if model is None:
        return Pieces(shape.unet_rows, shape.images, 0)
    whole = Pieces(shape.unet_rows, shape.images, model.peak(shape, shape.unet_rows, shape.images))
    if budget_bytes is None or whole.estimate <= budget_bytes:
        return whole
    smallest = model.peak(shape, 1, 1)
    if smallest > budget_bytes:
        side = largest_side(model, budget_bytes, shape)
        fits = f"the largest that fits is {side}x{side}" if side else "no size fits: raise the memory limit"
        raise MemoryRefused(
            f"{shape.width}x{shape.height} needs about {format_bytes(smallest)} of memory to draw, more than the "
            f"{format_bytes(budget_bytes)} this process may use: {fits} (or raise --max-memory)",
            smallest,
            budget_bytes,
            side,
        )
    low, high = 1, shape.unet_rows  # the most U-Net rows (and as many images per decode) that fit
    while low < high:
        middle = (low + high + 1) // 2
        if model.peak(shape, middle, min(middle, shape.images)) <= budget_bytes:
            low = middle
        else:
            high = middle - 1
    return Pieces(low, min(low, shape.images), model.peak(shape, low, min(low, shape.images)))


def largest_side(model: MemoryModel, budget_bytes: int, like: RequestShape | None = None) -> int:
    """The largest square side (a multiple of the size multiple) at which a request like `like` (default: one
    image with classifier-free guidance) fits the budget drawn one row at a time; 0 if none. Its other rows
    are held all the same, as `admit` counts them."""
    like = like or RequestShape(images=1, unet_rows=2, text_rows=2, height=0, width=0)
    m = model.size_multiple

    def fits(side: int) -> bool:
        return model.peak(replace(like, height=side, width=side), 1, 1) <= budget_bytes

    if not fits(m):
        return 0
    low, high = 1, 1
    while fits(high * 2 * m):
        high *= 2
        if high > 2**20:  # more than any export draws
            return high * m
    high *= 2
    while low < high - 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * m) else (low, middle)
    return low * m
