"""Torch-free Stable Diffusion runtime for folders written by `sdexport convert`.

from sdruntime import StableDiffusionPipeline
pipe = StableDiffusionPipeline.load("OUT", provider="cpu")
pipe("a red circle on a blue background", seed=0).images[0].save("circle.png")
pipe.generate(GenerationRequest("a red circle", seed=0))  # the same call, as a typed request
"""

from ._version import __version__

__all__ = ["GenerationRequest", "GenerationResult", "SessionSettings", "StableDiffusionPipeline", "__version__"]


def __getattr__(name: str):
    if name in ("StableDiffusionPipeline", "GenerationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name == "SessionSettings":
        from .session import SessionSettings

        return SessionSettings
    raise AttributeError(name)
