"""What a drawing gives back, whichever pipeline drew it (pipeline.py's U-Net families, transformer_pipeline.py's
SD3 and Flux): the images with their parameters text, the final latents, the seeds and the timings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .image import save_image

StepCallback = Callable[[int, float, np.ndarray], None]  # (step, timestep, latents) after each step


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray
    parameters: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # seconds: "total", "denoise" (the loop), "unet" or "transformer" (inside its session runs), "steps"
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Write the images with their parameters, as PNG, JPEG or WebP by the extension; several images
        get numbered names (out-0.png, out-1.png)."""
        path = Path(path)
        if len(self.images) == 1:
            return [save_image(self.images[0], path, self.parameters[0])]
        return [
            save_image(image, path.with_name(f"{path.stem}-{i}{path.suffix}"), text)
            for i, (image, text) in enumerate(zip(self.images, self.parameters))
        ]
