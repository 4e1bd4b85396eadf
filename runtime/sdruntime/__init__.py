"""Torch-free Stable Diffusion runtime for folders written by `sdexport convert`."""

__version__ = "0.1.0"
