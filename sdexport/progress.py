"""Progress of a long `sdexport convert`: one line per component and phase (load, trace, optimize, fp16,
write, check, compare, manifest, validate) with the phase's time and the time since the convert began.

The exporter marks where each phase begins (`mark`); a phase ends where the next one begins (or at
`end`), so phases never nest and each line is written once, complete, when its phase is over. Nothing is written unless a
caller turns reporting on for a block (`reporting`): `sdexport convert` does when stderr is a terminal,
or with `--progress`; marks cost a lookup otherwise. Python callers:
`with reporting(sys.stderr): convert(...)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

PHASES = ("load", "trace", "optimize", "fp16", "write", "check", "compare", "manifest", "validate")


class Reporter:
    """Writes the line of each phase when the next phase begins, or when reporting ends."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.started = time.perf_counter()
        self.current: tuple[str, str, float] | None = None  # component, phase, when it began

    def mark(self, component: str | None, phase: str | None) -> None:
        """End the current phase (its line) and begin `phase` of `component`; None begins none."""
        now = time.perf_counter()
        if self.current is not None:
            name, what, began = self.current
            self.stream.write(f"{name}: {what} {now - began:.1f} s ({now - self.started:.1f} s in all)\n")
            self.stream.flush()
        self.current = (component, phase, now) if component and phase else None


_reporter: ContextVar[Reporter | None] = ContextVar("sdexport_progress", default=None)


@contextmanager
def reporting(stream: TextIO | None) -> Iterator[Reporter | None]:
    """Within the block, write each phase's line to `stream`; None writes nothing. A phase cut short by an
    error gets no line (the error says what happened)."""
    reporter = Reporter(stream) if stream is not None else None
    token = _reporter.set(reporter)
    try:
        yield reporter
        if reporter is not None:
            reporter.mark(None, None)
    finally:
        _reporter.reset(token)


def mark(component: str, phase: str) -> None:
    """`phase` of `component` begins here (and the phase before it ends); nothing unless reporting is on."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter.mark(component, phase)


def end() -> None:
    """The current phase ends here: its line comes before the log lines that report its result."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter.mark(None, None)
