"""sdexport: Stable Diffusion pipelines to optimized ONNX graphs, with a torch-free runtime."""

import logging

__version__ = "0.1.0"

# diffusers warns at import that two distributions (optimum-onnx among them) provide `optimum`
logging.getLogger("diffusers.utils.import_utils").addFilter(
    lambda record: "Multiple distributions found for package optimum" not in record.getMessage()
)


def convert(source: str, out, **options):
    """Export SOURCE (a diffusers folder, a preset or a hub id) to the folder OUT."""
    from .converter import convert as _convert

    return _convert(source, out, **options)


__all__ = ["__version__", "convert"]
