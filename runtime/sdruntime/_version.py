"""The runtime's version: runtime/pyproject.toml reads it from here, `sdruntime --version` prints it."""

__version__ = "0.1.0"
