"""Errors a user can fix: the CLI prints their one-line message and exits with code 2."""


class SdexportError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class ValidationFailed(Exception):
    """The export does not match PyTorch within tolerance (exit code 1)."""


class GraphCheckFailed(Exception):
    """A graph the exporter wrote fails ONNX's type check or does not load: an exporter bug (exit code 1)."""
