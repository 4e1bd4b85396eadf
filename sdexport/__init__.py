"""sdexport: Stable Diffusion pipelines to optimized ONNX graphs, with a torch-free runtime."""

from ._version import __version__


def convert(source: str, out, **options):
    """Export SOURCE (a diffusers folder, a preset or a hub id) to the folder OUT."""
    from .thirdparty import quiet_third_party

    with quiet_third_party():
        from .converting import convert as _convert

        return _convert(source, out, **options)


__all__ = ["__version__", "convert"]
