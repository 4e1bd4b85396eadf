"""Pixels in and out: decoded arrays to uint8 PIL images, image files with generation parameters, init images."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidArgument

# Output extensions and the Pillow format each one is written in
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
UNICODE_PREFIX = b"UNICODE\0"


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """VAE output [B, 3, H, W] in [-1, 1] to PIL images, rounded as diffusers' `numpy_to_pil` does."""
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def parameters_text(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The `parameters` text, in the form image tools (A1111, ComfyUI readers) parse: the prompt, the
    negative prompt, then "Key: value" pairs in the order given (None values are left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def _quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when a comma, colon or newline would split the fields."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def image_format(path: str | Path) -> str:
    """The Pillow format an output path's extension asks for."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InvalidArgument(
            f"cannot write {path}: name it with one of {', '.join(IMAGE_FORMATS)} (got {suffix or 'no extension'})"
        )
    return IMAGE_FORMATS[suffix]


def write_png(image: Image.Image, target: str | Path | BinaryIO, parameters: str) -> None:
    """A PNG with `parameters` in its text chunk, to a path or a binary file (the server's replies)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(target, format="PNG", pnginfo=info)


def save_image(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write PNG, JPEG or WebP by the path's extension, with `parameters` where readers look for it:
    a PNG `parameters` text chunk, else the EXIF UserComment (UTF-16, as A1111 writes it)."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "PNG":
        write_png(image, path, parameters)
        return path
    exif = Image.Exif()
    exif.endian = ">"  # UserComment's UTF-16 follows the EXIF byte order; A1111 writes big-endian
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
    image.save(path, format=fmt, exif=exif, quality=95)
    return path


def read_parameters(path: str | Path) -> str | None:
    """The generation parameters save_image wrote (PNG text chunk or EXIF UserComment), or None."""
    with Image.open(path) as image:
        if "parameters" in getattr(image, "text", {}):
            return image.text["parameters"]
        exif = image.getexif()
        comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not comment:
        return None
    if comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be" if exif.endian == ">" else "utf-16-le")
    if comment.startswith(b"ASCII\0\0\0"):
        comment = comment[8:]
    return comment.decode("utf-8", errors="replace")


def short_hash(digest: str) -> str:
    """The first 10 hex digits of a sha256, as A1111's "Model hash" shows it."""
    return digest[:10]


def init_image_hash(image) -> str:
    """Short sha256 of an init image: of the file for a path or a file's bytes, of the RGB pixels for a PIL
    image or array."""
    digest = hashlib.sha256()
    if isinstance(image, bytes):
        digest.update(image)
    elif isinstance(image, Image.Image):
        digest.update(f"{image.width}x{image.height}".encode())
        digest.update(image.convert("RGB").tobytes())
    elif isinstance(image, np.ndarray):
        digest.update(np.ascontiguousarray(image).tobytes())
    else:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return short_hash(digest.hexdigest())


class _EncodedFile(io.BytesIO):
    """An image file's bytes (as the server receives them) opened as the file; messages give its size, not its bytes."""

    def __repr__(self) -> str:
        return f"({len(self.getbuffer())} bytes)"


def _file(image):
    """What Pillow opens and a message names: a path as given, a file's bytes as a file."""
    return _EncodedFile(image) if isinstance(image, bytes) else image


def init_image_size(image: str | Path | bytes | Image.Image) -> tuple[int, int]:
    """An init image's (height, width), opening a file only to read its header; errors as load_init_image's."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    image = _file(image)
    try:
        with Image.open(image) as opened:
            return opened.height, opened.width
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the init image {image}: {e}; pass a PNG or JPEG file") from e


def open_image(image, what: str = "init image") -> Image.Image:
    """A PIL image as given, or read from a path or a file's bytes; one line naming `what` when it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    image = _file(image)
    try:
        opened = Image.open(image)
        opened.load()
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidArgument(f"cannot read the {what} {image}: {e}; pass a PNG or JPEG file") from e
    return opened


def load_init_image(image, width: int, height: int) -> np.ndarray:
    """A path or PIL image -> [1, 3, H, W] float32 in [-1, 1], resized as diffusers' VaeImageProcessor does."""
    image = open_image(image).convert("RGB")
    image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * array - 1.0).transpose(2, 0, 1)[None]


def contact_sheet(images: list[Image.Image], columns: int) -> Image.Image:
    """Images in a grid, row by row."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet
