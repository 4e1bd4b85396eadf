"""The exporter's errors. SdexportError is a mistake the user can fix (a UserError, as the runtime's
are): the CLI prints its one-line message and exits with code 2. Other exceptions are bugs and keep
their tracebacks."""

from sdruntime.errors import UserError


class SdexportError(UserError):
    """Bad input: the message names the problem and the fix, in one line."""


class ValidationFailed(Exception):
    """The export does not match PyTorch within tolerance (exit code 1)."""


class GraphCheckFailed(Exception):
    """A graph the exporter wrote fails ONNX's type check or does not load: an exporter bug (exit code 1)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]
