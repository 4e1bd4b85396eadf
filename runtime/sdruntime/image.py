"""Pixels in and out: decoded arrays to uint8 PIL images, PNGs with generation parameters, init images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .manifest import ExportError


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """VAE output [B, 3, H, W] in [-1, 1] to PIL images, rounded as diffusers' `numpy_to_pil` does."""
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def parameters_text(prompt: str, negative_prompt: str, steps: int, scheduler: str, guidance: float,
                    seed: int | None, width: int, height: int, model: str) -> str:
    """The `parameters` text chunk, in the form image tools (A1111, ComfyUI readers) parse."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [f"Steps: {steps}", f"Sampler: {scheduler}", f"CFG scale: {guidance:g}"]
    if seed is not None:
        fields.append(f"Seed: {seed}")
    fields += [f"Size: {width}x{height}", f"Model: {model}"]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def load_init_image(image, width: int, height: int) -> np.ndarray:
    """A path or PIL image -> [1, 3, H, W] float32 in [-1, 1], resized as diffusers' VaeImageProcessor does."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, UnidentifiedImageError) as e:
            raise ExportError(f"cannot read the init image {image}: {e}; pass a PNG or JPEG file") from e
    image = image.convert("RGB")
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
