"""What `sdruntime serve` does without Ray: read an HTTP request's JSON into a checked `ImageRequest`, draw a
batch of them in as few denoiser batches (U-Net, or SD3's and Flux's transformer) as their settings allow (each
batch one runtime GenerationRequest), and describe the model with the plans' own defaults for its family.

Kept apart from serve.py so that the rules (what a request may ask, which requests share a batch, which
seeds draw which images) are plain code, tested without a Ray cluster, and so that Ray stays an extra.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .decoders import DECODERS, FULL, TINY, TINY_VAE_HINT, StepPreview, has_tiny_decoder
from .errors import InvalidArgument, UserError
from .image import open_image, write_png
from .manifest import MANIFEST_NAME, TRANSFORMER_FAMILIES
from .memory import largest_side
from .plan import SEED_LIMIT, SizeError, SizeRule, batch_seeds, family_defaults
from .prompt_syntax import SYNTAXES, parse_prompt
from .prompt_weighting import DOWNWEIGHT_MODES
from .request import GenerationRequest
from .schedulers import FLOW_SCHEDULERS, SCHEDULERS, scheduler_class
from .transformer_plan import T5_LONGEST, TRANSFORMER_DEFAULTS

# OpenAI's Images API fields that do not map onto a field of ours: each value that means what we do anyway is
# accepted (the default, or for `moderation` "low": there is no moderation here), any other is refused naming it
OPENAI_CHOICES: dict[str, tuple[object, ...]] = {
    "output_format": ("png",),
    "quality": ("auto", "standard"),  # "standard": DALL-E's default
    "style": ("vivid",),  # DALL-E 3's default
    "background": ("auto", "opaque"),
    "moderation": ("auto", "low"),
    "output_compression": (100,),  # the default; it applies to webp and jpeg only
    "partial_images": (0,),
    "input_fidelity": ("low",),  # image edits' default
}
# fields of OpenAI's reference for what this server does not make: refused by name when given a value
OPENAI_UNSUPPORTED = {
    "complexity": "image planning",
    "frame_count": "GIF output",
    "frame_duration_ms": "GIF output",
    "svg": "SVG output",
    "markup": "markup edits",
}
OPENAI_IGNORED = ("user", "safety_identifier")  # strings for the caller's own records: accepted, not used
OPENAI_FIELDS = ("model", *OPENAI_CHOICES, *OPENAI_UNSUPPORTED, *OPENAI_IGNORED)
FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance",
    "scheduler",
    "scheduler_options",
    "seed",
    "size",
    "n",
    "response_format",
    "image",
    "mask",
    "strength",
    "control",
    "guess_mode",
    "prompt_2",
    "prompt_3",
    "negative_prompt_2",
    "negative_prompt_3",
    "max_sequence_length",
    "true_cfg_scale",
    "sigmas",
    "decoder",
    "stream",
    "loras",
    "embeddings",
    "prompt_syntax",
    "downweight",
    *OPENAI_FIELDS,
)
# The fields only SD3 and Flux exports take (transformer_plan.py), and which of the two takes each
TRANSFORMER_FIELDS = {
    "prompt_2": ("sd3", "flux"),  # SD3's CLIP-G, Flux's T5
    "prompt_3": ("sd3",),  # SD3's T5
    "negative_prompt_2": ("sd3", "flux"),
    "negative_prompt_3": ("sd3",),
    "max_sequence_length": ("sd3", "flux"),
    "true_cfg_scale": ("flux",),
    "sigmas": ("sd3", "flux"),
}
FAMILY_NAMES = {"sd3": "SD3", "flux": "Flux"}
CONTROL_FIELDS = ("name", "image", "scale", "start", "end")
RESPONSE_FORMATS = ("b64_json", "url", "png")  # OpenAI's two, and raw PNG bytes (one image)
MAX_STEPS = 150  # as A1111's UI caps them: more steps than this only ties a replica up
MAX_IMAGES = 8  # per request; a client wanting more sends more requests, which batch with others
MAX_PROMPT_CHARS = 4000
MAX_SIDE = 4096  # pixels, either way: larger sizes only tie a replica up
MAX_CONTROLS = 8  # control images per request
MAX_CONTROL_SCALE = 10.0  # a ControlNet's scale; diffusers' pipelines default to 0.5-1.0
MAX_GUIDANCE = 50.0  # guidance and true_cfg_scale
MAX_LORAS = 8  # LoRAs per request
MAX_LORA_SCALE = 10.0  # either way; LoRAs are used at 0.3-1.5
LORA_SUFFIX = ".safetensors"
MAX_EMBEDDINGS = 16  # textual-inversion embeddings per request
MAX_TOKEN_CHARS = 100  # an embedding's token
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # A1111's and diffusers' files


class RequestError(InvalidArgument):
    """A request's mistake, with what OpenAI's error shape names besides the message: the field it is in
    (`param`, None for the request as a whole), OpenAI's `code` for it, and the HTTP status."""

    def __init__(self, param: str | None, message: str, code: str | None = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class ModelFacts:
    """What a request is checked against, from the export's manifest (the replica reads it)."""

    name: str
    family: str
    dtype: str
    target: str
    default_size: tuple[int, int]  # (width, height)
    size_multiple: int
    static_size: tuple[int, int] | None  # (width, height) of a static export
    default_scheduler: str
    default_guidance: float  # text-to-image's: the family's diffusers pipeline's
    default_steps: int
    model_hash: str
    source: str
    largest_side: int | None = None  # the largest square a replica draws within its memory budget (None: unknown)
    memory_budget: int | None = None  # bytes a replica may hold while drawing
    image_inputs: bool = False  # the export has a VAE encoder: requests may send an image (and a mask)
    controlnets: tuple[str, ...] = ()  # the export's ControlNets, by name: requests may send control images
    loras: tuple[str, ...] | None = None  # the LoRAs in the server's --lora-dir, by name; None: no --lora-dir
    embeddings: tuple[str, ...] | None = None  # the server's --embedding-dir files, by name; None: no --embedding-dir
    tiny_decoder: bool = False  # the export has a tiny decoder (--tiny-vae): `decoder: "tiny"`, streamed previews
    created: int = 0  # when the export was written (its manifest's time, Unix seconds): /v1/models' `created`

    @property
    def sizes(self) -> SizeRule:
        """The export's size rule (heights first, as the runtime takes sizes)."""
        static = (self.static_size[1], self.static_size[0]) if self.static_size else None
        return SizeRule(self.size_multiple, static, (self.default_size[1], self.default_size[0]))

    @property
    def flow_matching(self) -> bool:
        """An SD3 or Flux export: flow-matching schedulers, and the fields in TRANSFORMER_FIELDS."""
        return self.family in TRANSFORMER_FAMILIES

    def card(self) -> dict[str, object]:
        """The /v1/models entry: OpenAI's model object plus the facts a client needs to ask well."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "sdexport",
            "family": self.family,
            "dtype": self.dtype,
            "target": self.target,
            "default_size": f"{self.default_size[0]}x{self.default_size[1]}",
            "size_multiple": self.size_multiple,
            "static_size": f"{self.static_size[0]}x{self.static_size[1]}" if self.static_size else None,
            "schedulers": list(FLOW_SCHEDULERS if self.flow_matching else SCHEDULERS),
            "default_scheduler": self.default_scheduler,
            "default_guidance": self.default_guidance,
            "default_steps": self.default_steps,
            "model_hash": self.model_hash,
            "source": self.source,
            "largest_size": f"{self.largest_side}x{self.largest_side}" if self.largest_side else None,
            "memory_budget_bytes": self.memory_budget,
            "image_inputs": self.image_inputs,
            "controlnets": list(self.controlnets),
            "loras": None if self.loras is None else list(self.loras),
            "embeddings": None if self.embeddings is None else list(self.embeddings),
            "decoders": [FULL, TINY] if self.tiny_decoder else [FULL],
        }


def lora_files(folder: str | Path) -> dict[str, Path]:
    """The LoRAs a server offers: the .safetensors files in `folder` (not its subfolders), by name (the file name
    without .safetensors). Requests name one of these; no other file can be read through them."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--lora-dir {folder} is not a folder: name the folder that holds the .safetensors LoRAs")
    return {
        p.name[: -len(LORA_SUFFIX)]: p for p in sorted(root.iterdir()) if p.name.endswith(LORA_SUFFIX) and p.is_file()
    }


def embedding_files(folder: str | Path) -> dict[str, Path]:
    """The textual-inversion embeddings a server offers: the .pt, .bin and .safetensors files in `folder` (not its
    subfolders), by name (the file name without its suffix). Requests name one of these; no other file can be read."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--embedding-dir {folder} is not a folder: name the folder that holds the embeddings")
    files: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.suffix in EMBEDDING_SUFFIXES and path.is_file():
            if path.stem in files:
                raise UserError(f"--embedding-dir {folder} holds {files[path.stem].name} and {path.name}: keep one")
            files[path.stem] = path
    return files


def model_facts(
    pipe, loras: Mapping[str, Path] | None = None, embeddings: Mapping[str, Path] | None = None
) -> ModelFacts:
    """A loaded StableDiffusionPipeline's (or TransformerPipeline's) facts; the defaults are the plans' own.
    `loras`: the server's LoRAs by name (lora_files), None when it takes none; `embeddings` likewise
    (embedding_files)."""
    manifest = pipe.manifest
    family = manifest.pipeline.family
    defaults = TRANSFORMER_DEFAULTS[family] if family in TRANSFORMER_FAMILIES else family_defaults(family)
    sizes = pipe.export.sizes
    budget = pipe.memory_budget.total()
    largest = None
    if budget is not None and pipe.memory_model is not None:
        largest = largest_side(pipe.memory_model, budget - pipe.loaded_resident)
        largest = min(largest, MAX_SIDE) // sizes.multiple * sizes.multiple
    return ModelFacts(
        name=pipe.folder.resolve().name,
        family=family,
        dtype=manifest.dtype,
        target=manifest.target,
        default_size=(sizes.default[1], sizes.default[0]),
        size_multiple=sizes.multiple,
        static_size=(sizes.static[1], sizes.static[0]) if sizes.static else None,
        default_scheduler=pipe.default_scheduler,
        default_guidance=defaults.guidance_scale,
        default_steps=defaults.steps,
        model_hash=pipe.model_hash,
        source=Path(manifest.source.name).name,
        largest_side=largest,
        memory_budget=budget,
        image_inputs=manifest.has("vae_encoder"),
        controlnets=tuple(pipe.export.controlnets),
        loras=None if loras is None else tuple(loras),
        embeddings=None if embeddings is None else tuple(embeddings),
        tiny_decoder=has_tiny_decoder(manifest.pipeline),
        created=int((pipe.folder / MANIFEST_NAME).stat().st_mtime),
    )


@dataclass(frozen=True)
class EncodedImage:
    """An image a request sent: the file's bytes, which the runtime opens and records the sha256 of as it does a
    file's (so the parameters match `sdruntime generate --image FILE`), and the picture's size."""

    data: bytes
    width: int
    height: int


def decode_image(body: Mapping, name: str, what: str, label: str | None = None) -> EncodedImage | None:
    """The field `name`, a base64-encoded PNG or JPEG file, read once here with the runtime's reader (its
    messages name `what`), so that a bad one gets 400 before a replica draws; None when the field is absent.
    Messages call the field `label` (default: `name`)."""
    value = body.get(name)
    if value is None:
        return None
    name = label or name
    if not isinstance(value, str):
        raise RequestError(name, f"'{name}' must be a base64-encoded PNG or JPEG file, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(name, f"'{name}' is not base64 ({e}): send the image file's bytes base64-encoded") from None
    too_large = RequestError(name, f"'{name}' is larger than {MAX_SIDE}x{MAX_SIDE} pixels: send a smaller image")
    try:
        with Image.open(io.BytesIO(data)) as header:  # the header alone: a huge picture is refused undecoded
            width, height = header.size
    except Image.DecompressionBombError:
        raise too_large from None
    except (OSError, ValueError):
        width = height = 0  # open_image says what is wrong
    if max(width, height) > MAX_SIDE:
        raise too_large
    try:
        open_image(data, what).close()  # the whole file: a damaged one fails here, not on a replica
    except InvalidArgument as e:
        raise RequestError(name, str(e)) from None
    return EncodedImage(data, width, height)


@dataclass(frozen=True)
class ControlImage:
    """One entry of a request's `control`: the ControlNet, its control image, its scale (None: diffusers' for the
    mode, as `--control NAME=IMAGE` without SCALE) and the fractions of the steps between which it runs."""

    name: str
    image: EncodedImage
    scale: float | None
    start: float
    end: float


@dataclass(frozen=True)
class ImageRequest:
    """One checked HTTP request: `seeds` holds one seed per image (n of them), drawn here when none was asked."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float | None  # None: the family's default for the mode
    scheduler: str
    seeds: tuple[int, ...]
    width: int
    height: int
    response_format: str
    scheduler_options: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs, hashable for batch_key
    image: EncodedImage | None = None  # image-to-image, or the image to inpaint
    mask: EncodedImage | None = None  # inpainting: white is repainted, black kept
    strength: float | None = None  # None: the mode's default (image-to-image's, inpainting's)
    control: tuple[ControlImage, ...] = ()  # the ControlNets to run, each with its control image
    guess_mode: bool = False
    # SD3 and Flux only (TRANSFORMER_FIELDS): one value for every image of a batch, so part of batch_key
    prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt_2: str | None = None
    negative_prompt_3: str | None = None
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    sigmas: tuple[float, ...] | None = None  # a custom schedule: `steps` is its length
    loras: tuple[tuple[str, float], ...] = ()  # (name in the server's --lora-dir, scale): one set per U-Net batch
    embeddings: tuple[tuple[str | None, str], ...] = ()  # (token or None, name in --embedding-dir): likewise
    decoder: str = FULL  # "tiny": the export's tiny decoder (decoders.py)
    stream: bool = False  # answered as server-sent events, a progress event per step (draw_stream); drawn alone
    prompt_syntax: str | None = None  # "compel" or "a1111" (prompt_syntax.py); drawn alone
    downweight: str | None = None  # with prompt_syntax: "mask" (the default) or "remove" (prompt_weighting.py)

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys run in one U-Net batch: the same latent size, the same schedule and the
        same guidance (one scale per pipeline call), and a negative prompt on all or none (SDXL tells an
        absent one from an empty one).

        None for a request with an image: it runs alone. A pipeline call takes one image and mask, and even
        with the same ones diffusers encodes them with the batch's first generator, so a request sharing
        another's call would not draw what it draws alone with its seeds. A request with control images runs
        alone too: a call takes one set of them; and a streamed one, whose progress events are its own; and one with
        a prompt syntax, whose prompts' token count (past 75 tokens, .and(), BREAK) sets the embeddings' length, which
        a batch pads to its longest prompt's.
        """
        if self.image is not None or self.mask is not None or self.control or self.stream or self.prompt_syntax:
            return None
        return (
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.scheduler_options,
            self.guidance,
            self.negative_prompt is None,
            *(getattr(self, name) for name in TRANSFORMER_FIELDS),
            self.loras,
            self.embeddings,
            self.decoder,
        )


def _integer(body: Mapping, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(name, f"'{name}' must be an integer from {low} to {high}, got {value!r}")
    return value


def _text(body: Mapping, name: str, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise RequestError(name, f"'{name}' must be a{' non-empty' if required else ''} string, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"'{name}' is {len(value)} characters long: keep it under {MAX_PROMPT_CHARS}")
    return value


def parse_size(value: object, facts: ModelFacts, image: EncodedImage | None = None) -> tuple[int, int]:
    """'WIDTHxHEIGHT' as OpenAI's `size` writes it, checked against the export's size multiple; when absent, the
    image's size rounded down to the size multiple (as `sdruntime generate --image` draws), else the default."""
    if value in (None, "auto") and image is not None:
        height, width = facts.sizes.round_down(image.height, image.width)
        value = f"{width}x{height}"
    if value is None or value == "auto":  # OpenAI's "auto": the export's default size
        return facts.default_size
    parts = value.lower().split("x") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise RequestError(
            "size",
            f"'size' must be 'WIDTHxHEIGHT' such as '{facts.default_size[0]}x{facts.default_size[1]}', got {value!r}",
        )
    width, height = int(parts[0]), int(parts[1])
    not_multiples = RequestError(
        "size",
        f"'size' {value} must be multiples of {facts.size_multiple} up to {MAX_SIDE} (this export's size multiple)",
    )
    if width > MAX_SIDE or height > MAX_SIDE:
        raise not_multiples
    try:
        facts.sizes.check(height, width)
    except SizeError as e:
        if e.static is None:
            raise not_multiples from None
        raise RequestError("size", f"this export is static at {e.static[1]}x{e.static[0]}: ask for that size") from None
    return width, height


def parse_request(body: object, facts: ModelFacts, default_format: str = "b64_json") -> ImageRequest:
    """A request's JSON body -> ImageRequest; any mistake raises RequestError, one line naming the field.
    `default_format`: the response_format of a request that names none (serve.py: "png" for `Accept: image/png`)."""
    if not isinstance(body, Mapping):
        raise RequestError(None, 'the body must be a JSON object such as {"prompt": "a red circle"}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(
            unknown[0], f"unknown field '{unknown[0]}': the fields are {', '.join(FIELDS)}", "unknown_parameter"
        )
    check_openai_fields(body, facts)
    prompt = _text(body, "prompt", required=True)
    negative = _text(body, "negative_prompt", required=False)
    transformer_fields = parse_transformer_fields(body, facts)
    sigmas = transformer_fields["sigmas"]
    steps = _integer(body, "steps", facts.default_steps if sigmas is None else len(sigmas), 1, MAX_STEPS)
    if sigmas is not None and steps != len(sigmas):
        raise RequestError(
            "steps", f"'steps' {steps} with {len(sigmas)} 'sigmas': the sigmas set the steps, leave steps out"
        )
    n = _integer(body, "n", 1, 1, MAX_IMAGES)
    guidance = _scale(body, "guidance")  # None: the plan's default, for the family and the mode
    scheduler = _scheduler(body, facts)
    options = _scheduler_options(body, scheduler, facts.flow_matching)
    # drawn here when not given, not in the pipeline, so that the response can say which seed brings each image back
    start = None if body.get("seed") is None else _integer(body, "seed", 0, 0, SEED_LIMIT - 1)
    seeds = batch_seeds(n, start)
    image, mask = decode_image(body, "image", "init image"), decode_image(body, "mask", "mask image")
    if (image or mask) and not facts.image_inputs:
        raise RequestError(
            "image", "this export has no VAE encoder, so it draws from prompts alone: leave out 'image' and 'mask'"
        )
    strength = _strength(body, image)
    control = parse_control(body, facts)
    guess_mode = _guess_mode(body, control)
    # the drawn size follows the init image, else the first control image (plan._size); SD3's and Flux's
    # pipelines draw at their default size whatever the image's, as diffusers' Img2Img and Inpaint forms do
    follows = None if facts.flow_matching else image or (control[0].image if control else None)
    width, height = parse_size(body.get("size"), facts, follows)
    stream = _flag(body, "stream")
    response_format = _response_format(body, n, stream, default_format)
    return ImageRequest(
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        seeds=tuple(seeds),  # as `sdruntime generate --seed S -n N` numbers them
        width=width,
        height=height,
        response_format=response_format,
        scheduler_options=options,
        image=image,
        mask=mask,
        strength=strength,
        control=control,
        guess_mode=guess_mode,
        **transformer_fields,
        decoder=_decoder(body, facts),
        stream=stream,
        loras=parse_loras(body, facts),
        embeddings=parse_embeddings(body, facts),
        prompt_syntax=_prompt_syntax(body, facts, (prompt, negative)),
        downweight=_downweight(body),
    )


def _response_format(body: Mapping, n: int, stream: bool, default: str) -> str:
    """`response_format`: OpenAI's b64_json (JSON, the default) or url (served for a while: ImageStore), or png (the
    PNG file itself, for one image); a streamed request's images come as b64_json in its `result` event."""
    value = body.get("response_format")
    if value is not None and value not in RESPONSE_FORMATS:
        raise RequestError(
            "response_format", f"unknown response_format {value!r}: choose {', '.join(RESPONSE_FORMATS)}"
        )
    if stream:
        if value not in (None, "b64_json"):
            raise RequestError(
                "response_format", "a streamed response carries its images as b64_json: leave out response_format"
            )
        return "b64_json"
    value = value or default
    if value == "png" and n > 1:
        raise RequestError(
            "response_format", f"a PNG response holds one image: ask n=1, or response_format b64_json for {n}"
        )
    return value


def check_openai_fields(body: Mapping, facts: ModelFacts) -> None:
    """OpenAI's fields that are not ours (OPENAI_FIELDS): `model` must name this export (else 404, as OpenAI
    answers an unknown model), the others take the values that mean what this server does."""
    model = body.get("model")
    if model is not None and model != facts.name:
        message = f"the model {model!r} does not exist: this server serves {facts.name!r} (GET /v1/models)"
        raise RequestError("model", message, "model_not_found", 404)
    for name, choices in OPENAI_CHOICES.items():
        value = body.get(name)
        if value is not None and (value not in choices or isinstance(value, bool)):
            listed = " or ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
            message = f"'{name}' {value!r} is not available here: leave it out, or send {listed}"
            raise RequestError(name, message, "unsupported_value")
    for name, what in OPENAI_UNSUPPORTED.items():
        if body.get(name) is not None:
            raise RequestError(
                name, f"'{name}' asks for {what}, which this server does not do: leave it out", "unsupported_parameter"
            )
    for name in OPENAI_IGNORED:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(name, f"'{name}' must be a string, got {body[name]!r}", "invalid_type")


def _scheduler(body: Mapping, facts: ModelFacts) -> str:
    """`scheduler`: a name of schedulers/ (the export's own by default)."""
    try:
        return scheduler_class(body.get("scheduler") or facts.default_scheduler, facts.flow_matching).NAME
    except InvalidArgument as e:
        raise RequestError("scheduler", str(e)) from None


def _prompt_syntax(body: Mapping, facts: ModelFacts, texts: Sequence[str | None]) -> str | None:
    """`prompt_syntax`: "compel" or "a1111", as `generate --prompt-syntax`; the prompts are parsed here, so that a
    mistake in one gets 400 before a replica draws."""
    value = body.get("prompt_syntax")
    if value is None:
        return None
    if value not in SYNTAXES:
        raise RequestError("prompt_syntax", f"unknown prompt_syntax {value!r}: choose {' or '.join(SYNTAXES)}")
    if facts.flow_matching:
        raise RequestError(
            "prompt_syntax", f"{FAMILY_NAMES[facts.family]} exports take no 'prompt_syntax': leave it out"
        )
    for param, text in zip(("prompt", "negative_prompt"), texts):
        if text is not None:
            try:
                parse_prompt(text, value)
            except InvalidArgument as e:
                raise RequestError(param, str(e)) from None
    return value


def _downweight(body: Mapping) -> str | None:
    """`downweight`: "mask" or "remove", as `generate --downweight`; only beside prompt_syntax."""
    value = body.get("downweight")
    if value is not None and value not in DOWNWEIGHT_MODES:
        raise RequestError("downweight", f"unknown downweight {value!r}: choose {' or '.join(DOWNWEIGHT_MODES)}")
    if value is not None and body.get("prompt_syntax") is None:
        raise RequestError("downweight", "downweight applies to weighted prompts: give prompt_syntax too")
    return value


def _flag(body: Mapping, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(name, f"'{name}' must be true or false, got {value!r}")
    return value


def _decoder(body: Mapping, facts: ModelFacts) -> str:
    """`decoder`: "full" (the VAE's, the default) or "tiny" (the export's tiny decoder), as `generate --decoder`."""
    value = body.get("decoder") or FULL
    if value not in DECODERS:
        raise RequestError("decoder", f"unknown decoder {value!r}: choose {' or '.join(DECODERS)}")
    if value == TINY and facts.flow_matching:
        raise RequestError("decoder", f"{FAMILY_NAMES[facts.family]} exports have no tiny decoder: leave out 'decoder'")
    if value == TINY and not facts.tiny_decoder:
        raise RequestError("decoder", f"this export has no tiny decoder: leave out 'decoder', or {TINY_VAE_HINT}")
    return value


def parse_transformer_fields(body: Mapping, facts: ModelFacts) -> dict[str, object]:
    """SD3's and Flux's own fields (TRANSFORMER_FIELDS), as `generate --prompt-2 ... --true-cfg --sigma` takes them;
    an export of a family that does not take one refuses it in one line."""
    for name, families in TRANSFORMER_FIELDS.items():
        if body.get(name) is not None and facts.family not in families:
            takes = " and ".join(FAMILY_NAMES[f] for f in families)
            raise RequestError(
                name, f"'{name}' applies to {takes} exports; this {facts.family} export does not take it: leave it out"
            )
    prompts = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")
    fields: dict[str, object] = {name: _text(body, name, required=False) for name in prompts}
    length = body.get("max_sequence_length")
    fields["max_sequence_length"] = None if length is None else _integer(body, "max_sequence_length", 0, 1, T5_LONGEST)
    fields["true_cfg_scale"] = _scale(body, "true_cfg_scale")
    fields["sigmas"] = _sigmas(body)
    return fields


def parse_loras(body: Mapping, facts: ModelFacts) -> tuple[tuple[str, float], ...]:
    """`loras`: a list of {"name": NAME, "scale": SCALE} or "NAME[:SCALE]" strings (scale 1.0 by default), each NAME
    a LoRA of the server's --lora-dir (as `generate --lora FILE:SCALE` takes a file); refused when it has none."""
    entries = body.get("loras")
    if entries is None:
        return ()
    if facts.loras is None:
        raise RequestError("loras", "this server takes no LoRAs: leave out 'loras', or start it with --lora-dir FOLDER")
    if not isinstance(entries, list) or len(entries) > MAX_LORAS:
        raise RequestError(
            "loras",
            f'\'loras\' must be a list of up to {MAX_LORAS} entries such as {{"name": "style", "scale": 0.8}} or "style:0.8"',
        )
    return tuple(_lora_entry(entry, f"loras[{i}]", facts.loras) for i, entry in enumerate(entries))


def _lora_entry(entry: object, where: str, offered: Sequence[str]) -> tuple[str, float]:
    if isinstance(entry, str):
        name, sep, tail = entry.rpartition(":")
        name, scale = (name, tail) if sep else (entry, 1.0)
    elif isinstance(entry, Mapping) and not set(entry) - {"name", "scale"}:
        name, scale = entry.get("name"), entry.get("scale", 1.0)
    else:
        raise RequestError(
            "loras", f"'{where}' must be \"NAME[:SCALE]\" or an object with 'name' and 'scale', got {entry!r}"
        )
    try:
        scale = None if isinstance(scale, bool) else float(scale)
    except (TypeError, ValueError):
        scale = None
    if scale is None or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
        raise RequestError("loras", f"'{where}' scale must be a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise RequestError(
            "loras",
            f"'{where}' names {name!r}: a LoRA is named by its file name in the server's LoRA folder, without a path",
        )
    name = name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name
    if name not in offered:
        listed = ", ".join(offered[:20]) or "none"
        raise RequestError("loras", f"unknown LoRA {name!r} in '{where}': this server offers {listed}")
    return name, scale


def parse_embeddings(body: Mapping, facts: ModelFacts) -> tuple[tuple[str | None, str], ...]:
    """`embeddings`: a list of "[TOKEN=]NAME" strings or {"name": NAME, "token": TOKEN} objects, each NAME an
    embedding of the server's --embedding-dir (as `generate --embedding [TOKEN=]FILE` takes a file), TOKEN what the
    prompts write (default: the file's own); refused when the server has no such folder."""
    entries = body.get("embeddings")
    if entries is None:
        return ()
    if facts.flow_matching:
        raise RequestError("embeddings", f"{FAMILY_NAMES[facts.family]} exports take no 'embeddings': leave them out")
    if facts.embeddings is None:
        raise RequestError(
            "embeddings",
            "this server takes no embeddings: leave out 'embeddings', or start it with --embedding-dir FOLDER",
        )
    if not isinstance(entries, list) or len(entries) > MAX_EMBEDDINGS:
        raise RequestError(
            "embeddings",
            f"'embeddings' must be a list of up to {MAX_EMBEDDINGS} entries such as \"<cat-toy>=cat_toy\" or "
            '{"name": "cat_toy", "token": "<cat-toy>"}',
        )
    return tuple(_embedding_entry(entry, f"embeddings[{i}]", facts.embeddings) for i, entry in enumerate(entries))


def _embedding_entry(entry: object, where: str, offered: Sequence[str]) -> tuple[str | None, str]:
    if isinstance(entry, str):
        token, sep, name = entry.partition("=")
        token, name = (token, name) if sep else (None, entry)
    elif isinstance(entry, Mapping) and not set(entry) - {"name", "token"}:
        token, name = entry.get("token"), entry.get("name")
    else:
        raise RequestError(
            "embeddings", f"'{where}' must be \"[TOKEN=]NAME\" or an object with 'name' and 'token', got {entry!r}"
        )
    if token is not None and (not isinstance(token, str) or not token.strip() or len(token) > MAX_TOKEN_CHARS):
        raise RequestError(
            "embeddings", f"'{where}' token must be a non-empty string of up to {MAX_TOKEN_CHARS} characters"
        )
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise RequestError(
            "embeddings",
            f"'{where}' names {name!r}: an embedding is named by its file name in the server's folder, without a path",
        )
    name = next((name[: -len(s)] for s in EMBEDDING_SUFFIXES if name.endswith(s)), name)
    if name not in offered:
        listed = ", ".join(offered[:20]) or "none"
        raise RequestError("embeddings", f"unknown embedding {name!r} in '{where}': this server offers {listed}")
    return token, name


def _scale(body: Mapping, name: str) -> float | None:
    """A guidance scale field from 0 to MAX_GUIDANCE; None when absent (the family's default)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_GUIDANCE:
        raise RequestError(name, f"'{name}' must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    return float(value)


def _sigmas(body: Mapping) -> tuple[float, ...] | None:
    """`sigmas`: a custom flow-matching schedule, one sigma per step from the first, each in [0, 1]."""
    value = body.get("sigmas")
    if value is None:
        return None
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value
    )
    if not numbers or not 1 <= len(value) <= MAX_STEPS:
        raise RequestError("sigmas", f"'sigmas' must be a list of 1 to {MAX_STEPS} numbers from 0 to 1, one per step")
    return tuple(float(v) for v in value)


def parse_control(body: Mapping, facts: ModelFacts) -> tuple[ControlImage, ...]:
    """`control`: a list of {"name", "image", "scale", "start", "end"}, one per ControlNet to run (as `generate
    --control NAME=IMAGE:SCALE --control-start --control-end`); `name` may be left out when the export has one."""
    entries = body.get("control")
    if entries is None:
        return ()
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise RequestError(
            "control",
            '\'control\' must be a non-empty list of objects such as {"name": "canny", "image": "<base64 PNG>"}',
        )
    if not facts.controlnets:
        raise RequestError(
            "control",
            "this export has no ControlNet: leave out 'control', or add one with `sdexport add-controlnet OUT [NAME=]PATH`",
        )
    if len(entries) > MAX_CONTROLS:
        raise RequestError("control", f"'control' has {len(entries)} entries: send at most {MAX_CONTROLS}")
    return tuple(_control_entry(entry, f"control[{i}]", facts.controlnets) for i, entry in enumerate(entries))


def _control_entry(entry: Mapping, where: str, exported: Sequence[str]) -> ControlImage:
    unknown = sorted(set(entry) - set(CONTROL_FIELDS))
    if unknown:
        raise RequestError("control", f"unknown field '{where}.{unknown[0]}': an entry has {', '.join(CONTROL_FIELDS)}")
    name = entry.get("name")
    if name is None and len(exported) != 1:
        raise RequestError(
            "control",
            f"'{where}' has no 'name' and this export has {len(exported)} ControlNets ({', '.join(exported)}): "
            "name the one its image is for",
        )
    if name is not None and name not in exported:
        raise RequestError(
            "control", f"unknown ControlNet {name!r} in '{where}.name': this export has {', '.join(exported)}"
        )
    image = decode_image(entry, "image", "control image", f"{where}.image")
    if image is None:
        raise RequestError(
            "control", f"'{where}' has no 'image': send the control image, a base64-encoded PNG or JPEG file"
        )
    scale = _number(entry, "scale", where, 0.0, MAX_CONTROL_SCALE)
    start, end = _number(entry, "start", where, 0.0, 1.0), _number(entry, "end", where, 0.0, 1.0)
    start, end = 0.0 if start is None else start, 1.0 if end is None else end
    if start >= end:
        raise RequestError(
            "control", f"'{where}': 'start' {start:g} must be below 'end' {end:g} (fractions of the steps)"
        )
    return ControlImage(name or exported[0], image, scale, start, end)


def _guess_mode(body: Mapping, control: Sequence[ControlImage]) -> bool:
    """`guess_mode`, as `--guess-mode`: the ControlNets see the prompt's half of the batch only."""
    value = body.get("guess_mode", False)
    if not isinstance(value, bool):
        raise RequestError("guess_mode", f"'guess_mode' must be true or false, got {value!r}")
    if value and not control:
        raise RequestError(
            "guess_mode", "'guess_mode' applies to ControlNets: send 'control' too, or leave guess_mode out"
        )
    return value


def _number(entry: Mapping, name: str, where: str, low: float, high: float) -> float | None:
    """A number field of a `control` entry, from `low` to `high`; None when absent."""
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError("control", f"'{where}.{name}' must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _strength(body: Mapping, image: EncodedImage | None) -> float | None:
    """`strength`: how far the image is noised, (0, 1]; the mode's default when absent (as `--strength`)."""
    value = body.get("strength")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise RequestError("strength", f"'strength' must be a number in (0, 1], got {value!r}")
    if image is None:
        raise RequestError("strength", "'strength' says how far to noise 'image': send an image, or leave strength out")
    return float(value)


def _scheduler_options(body: Mapping, scheduler: str, flow_matching: bool) -> tuple[tuple[str, object], ...]:
    """`scheduler_options`: a JSON object of scalars, keys of the scheduler's config (as --scheduler-option)."""
    options = body.get("scheduler_options") or {}
    if not isinstance(options, Mapping) or not all(
        isinstance(v, (str, int, float, bool)) or v is None for v in options.values()
    ):
        raise RequestError(
            "scheduler_options", "'scheduler_options' must be an object of plain values, e.g. {\"clip_sample\": false}"
        )
    known = scheduler_class(scheduler, flow_matching).DEFAULTS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RequestError(
            "scheduler_options", f"{scheduler} has no setting {unknown[0]!r}: choose among {', '.join(sorted(known))}"
        )
    return tuple(sorted(options.items()))


# -- images.edit: a multipart form ---------------------------------------------------------------------------------


# the fields whose form values are text as sent; any other's value is read as JSON ("2", "7.5", "true", ...)
FORM_TEXT_FIELDS = frozenset(
    name
    for name in FIELDS
    if name.startswith(("prompt", "negative_prompt")) or name in ("scheduler", "size", "response_format", "decoder")
) | frozenset(("model", "user", "safety_identifier", *(n for n, c in OPENAI_CHOICES.items() if isinstance(c[0], str))))


def edit_body(form: Sequence[tuple[str, str | bytes]]) -> dict[str, object]:
    """An images.edit multipart form (OpenAI's: `image` or `image[]` files, a `mask` file, fields as text, `x[]` for
    lists and `x[key]` for objects) -> the JSON body parse_request reads: the image and the mask as this server's
    (edit_inputs), other values read as JSON unless FORM_TEXT_FIELDS keeps them text."""
    body: dict[str, object] = {}
    images: list[bytes] = []
    for key, value in form:
        name, _, rest = key.partition("[")
        if name == "image":
            images.append(value if isinstance(value, bytes) else value.encode())
            continue
        if isinstance(value, bytes) and name != "mask":
            raise RequestError(name, f"'{name}' is a file: only 'image' and 'mask' are", "invalid_type")
        if isinstance(value, str) and name not in FORM_TEXT_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a word such as a scheduler's name: the field's own check says whether it fits
        if rest == "]":
            body.setdefault(name, []).append(value)  # type: ignore[union-attr]
        elif rest.endswith("]"):
            body.setdefault(name, {})[rest[:-1]] = value  # type: ignore[index]
        else:
            body[name] = value
    if len(images) != 1:
        raise RequestError("image", f"send one 'image' file to edit, got {len(images)}", "missing_required_parameter")
    mask = body.pop("mask", None)
    if mask is not None and not isinstance(mask, bytes):
        raise RequestError("mask", "'mask' must be a PNG file", "invalid_type")
    image, mask = edit_inputs(images[0], mask)
    body["image"] = base64.b64encode(image).decode("ascii")
    if mask is not None:
        body["mask"] = base64.b64encode(mask).decode("ascii")
    return body


def edit_inputs(image: bytes, mask: bytes | None) -> tuple[bytes, bytes | None]:
    """An edit's image and mask in this server's terms (white is repainted): OpenAI's mask repaints where it is
    fully transparent; a mask without an alpha channel is taken as white-repaints already. Without a mask, an image's
    own fully transparent pixels are the mask (as DALL-E 2 edits); an opaque image is drawn from (image-to-image)."""
    if mask is not None:
        return image, _transparent_white(mask, "mask") or mask
    return image, _transparent_white(image, "image")


def _transparent_white(data: bytes, param: str) -> bytes | None:
    """A mask PNG, white where `data`'s picture is fully transparent; None when it has no alpha channel or no such
    pixel (an image) or no alpha channel (a mask)."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if max(picture.size) > MAX_SIDE:
                return None  # decode_image refuses it, undecoded
            if picture.mode not in ("RGBA", "LA", "PA") and "transparency" not in picture.info:
                return None
            alpha = picture.convert("RGBA").getchannel("A")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(param, f"cannot read the '{param}' file ({e}): send a PNG") from None
    if param == "image" and alpha.getextrema()[0] != 0:
        return None
    buffer = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class DrawnImage:
    png: bytes  # a PNG file with the `parameters` text chunk `sdruntime generate` writes
    seed: int
    parameters: str
    batch_images: int  # how many images shared its U-Net batch


@dataclass
class DrawResult:
    """A request's answer from a replica: its images, or the one-line reason it has none."""

    images: list[DrawnImage] = field(default_factory=list)
    error: str | None = None
    user_error: bool = False  # the request's fault (HTTP 400), not the server's (500)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG `sdruntime generate -o x.png` writes (image.save_image), as bytes."""
    buffer = io.BytesIO()
    write_png(image, buffer, parameters)
    return buffer.getvalue()


def batch_request(
    requests: Sequence[ImageRequest],
    images: Sequence[tuple[int, int]],
    loras: Mapping[str, Path] | None = None,
    embeddings: Mapping[str, Path] | None = None,
) -> GenerationRequest:
    """The runtime request that draws `images` ((request index, seed) pairs of requests with one batch key);
    `loras` and `embeddings` map the names requests give to the server's files (lora_files, embedding_files)."""
    first = requests[images[0][0]]
    for name, _ in first.loras:
        if name not in (loras or {}):
            raise InvalidArgument(f"unknown LoRA {name!r}: this replica offers {', '.join(loras or {}) or 'none'}")
    for _, name in first.embeddings:
        if name not in (embeddings or {}):
            offered = ", ".join(embeddings or {}) or "none"
            raise InvalidArgument(f"unknown embedding {name!r}: this replica offers {offered}")
    negatives = None if first.negative_prompt is None else [requests[i].negative_prompt for i, _ in images]
    return GenerationRequest(
        prompt=[requests[i].prompt for i, _ in images],
        negative_prompt=negatives,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        scheduler=first.scheduler,
        scheduler_options=dict(first.scheduler_options) or None,
        seed=[seed for _, seed in images],
        height=first.height,
        width=first.width,
        image=None if first.image is None else first.image.data,
        mask_image=None if first.mask is None else first.mask.data,
        strength=first.strength,
        control_image=[c.image.data for c in first.control] or None,
        controlnet=[c.name for c in first.control] or None,
        controlnet_conditioning_scale=[c.scale for c in first.control] or None,
        guess_mode=first.guess_mode,
        control_guidance_start=[c.start for c in first.control] or 0.0,
        control_guidance_end=[c.end for c in first.control] or 1.0,
        prompt_2=first.prompt_2,  # one string each: the plan gives it to every prompt of the batch
        prompt_3=first.prompt_3,
        negative_prompt_2=first.negative_prompt_2,
        negative_prompt_3=first.negative_prompt_3,
        max_sequence_length=first.max_sequence_length,
        true_cfg_scale=first.true_cfg_scale,
        sigmas=None if first.sigmas is None else list(first.sigmas),
        loras=[(loras[name], scale) for name, scale in first.loras] or None,
        embeddings=[(token, embeddings[name]) for token, name in first.embeddings] or None,
        decoder=first.decoder,
        prompt_syntax=first.prompt_syntax,
        downweight=first.downweight,
    )


def draw_batch(
    pipe,
    requests: Sequence[ImageRequest],
    max_images: int,
    preview_callback: Callable[[StepPreview], None] | None = None,
    loras: Mapping[str, Path] | None = None,
    embeddings: Mapping[str, Path] | None = None,
) -> list[DrawResult]:
    """Draw every request's images, one pipeline call per group of requests with the same batch key and at
    most `max_images` images, each image with its own prompt and seed; `preview_callback` gets each step's
    previews (a streamed request's, drawn alone).

    A list of seeds gives each image its own generator (pipeline.py), so an image comes out of a batch as it
    would alone with its seed, and its `parameters` text says just what a single run's would.
    """
    results = [DrawResult() for _ in requests]
    groups: dict[tuple, list[tuple[int, int]]] = {}  # key -> (request index, seed)
    for index, request in enumerate(requests):
        key = request.batch_key or ("alone", index)
        groups.setdefault(key, []).extend((index, seed) for seed in request.seeds)
    for items in groups.values():
        for start in range(0, len(items), max_images):
            chunk = items[start : start + max_images]
            try:
                drawn = pipe.generate(
                    batch_request(requests, chunk, loras, embeddings), preview_callback=preview_callback
                )
            except UserError as e:
                for i, _ in chunk:
                    results[i].error, results[i].user_error = str(e), True
                continue
            except Exception as e:  # noqa: BLE001 - a fault in one group must not cost the other groups their images
                for i, _ in chunk:
                    results[i].error = f"drawing failed: {type(e).__name__}: {e}"
                continue
            for (i, seed), image, text in zip(chunk, drawn.images, drawn.parameters):
                results[i].images.append(DrawnImage(png_bytes(image, text), seed, text, len(chunk)))
    for result in results:
        if result.error:
            result.images.clear()  # a request is answered whole or not at all
    return results


# -- streamed requests: server-sent events -------------------------------------------------------------------------


def images_body(images: Sequence[DrawnImage], urls: Sequence[str] | None = None) -> dict[str, object]:
    """The JSON answer (OpenAI's ImagesResponse, with each image's seed, parameters and batch size): each image's
    PNG as `b64_json`, or with `urls` (a url request's, ImageStore) where to fetch it."""
    data = [
        {
            **({"b64_json": base64.b64encode(i.png).decode("ascii")} if urls is None else {"url": urls[k]}),
            "seed": i.seed,
            "parameters": i.parameters,
            "batch_images": i.batch_images,
        }
        for k, i in enumerate(images)
    ]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


class ImageStore:
    """The PNGs of `response_format: "url"` requests, kept in memory for `ttl_s` seconds and at most `max_images`
    of them (the oldest go first), each under an unguessable id: GET /v1/images/{id}.png serves it."""

    def __init__(self, ttl_s: float, max_images: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_images, self.clock = ttl_s, max_images, clock
        self.images: dict[str, tuple[float, bytes]] = {}  # id -> (expiry, PNG), oldest first

    def put(self, png: bytes) -> str:
        """Keep `png`; its id."""
        self.expire()
        while len(self.images) >= self.max_images:
            del self.images[next(iter(self.images))]
        key = secrets.token_urlsafe(16)
        self.images[key] = (self.clock() + self.ttl_s, png)
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG kept as `key`, or None once it expired or was never kept."""
        self.expire()
        kept = self.images.get(key)
        return None if kept is None else kept[1]

    def expire(self) -> None:
        now = self.clock()
        for key in [key for key, (expiry, _) in self.images.items() if expiry <= now]:
            del self.images[key]


def sse_event(event: str, data: Mapping[str, object]) -> str:
    """One server-sent event: its name and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """OpenAI's error shape (serve.error_response's body): the message, its type (the client's mistake or the
    server's), the field it is about (`param`) and OpenAI's code for it, a string or null."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def progress_event(preview: StepPreview) -> str:
    """A `progress` event: the steps done and of how many, and with a tiny decoder each image's preview (PNG)."""
    data: dict[str, object] = {"step": preview.step + 1, "steps": preview.steps}
    if preview.images is not None:
        data["previews"] = [base64.b64encode(png_bytes(image, "")).decode("ascii") for image in preview.images]
    return sse_event("progress", data)


def draw_stream(
    pipe,
    request: ImageRequest,
    emit: Callable[[str | None], None],
    loras: Mapping[str, Path] | None = None,
    embeddings: Mapping[str, Path] | None = None,
) -> None:
    """Draw a streamed request alone, emitting its server-sent events: a `progress` event after each step (with
    previews through the export's tiny decoder, when it has one), then a `result` event with what the request
    would get as b64_json, or an `error` event with the error's JSON; then None, the end."""
    try:
        [result] = draw_batch(pipe, [request], len(request.seeds), lambda p: emit(progress_event(p)), loras, embeddings)
        if result.error:
            emit(sse_event("error", error_body(result.error, 400 if result.user_error else 500)))
        else:
            emit(sse_event("result", images_body(result.images)))
    finally:
        emit(None)
