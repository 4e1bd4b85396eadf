"""The exporter's version: pyproject.toml reads it from here, the manifest records it."""

__version__ = "0.1.0"
