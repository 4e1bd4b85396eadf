"""`sdexport convert`'s progress (sdexport/progress.py): on a terminal, one line per component and phase, in the
order the export runs them, with times that add up; on a pipe, the same output as without it."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdexport import progress

SDEXPORT = str(Path(sys.executable).parent / "sdexport")
LINE = re.compile(r"^(\S+): (\w+) (\d+\.\d) s \((\d+\.\d) s in all\)$")
PER_COMPONENT = ["trace", "optimize", "fp16", "write", "check", "compare"]


def run_on_terminal(args: list[str]) -> tuple[int, str]:
    """Run a command with stderr on a pseudo-terminal (stdout piped away); its exit code and stderr."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return proc.wait(), b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def converts(tmp_path_factory) -> dict[str, tuple[int, str, float]]:
    """The same fp16 text-encoder export twice: stderr on a terminal, and on a pipe."""
    folder = tmp_path_factory.mktemp("progress")
    args = [SDEXPORT, "convert", "tiny-sd", "--components", "text_encoder", "--dtype", "fp16"]
    runs = {}
    started = time.perf_counter()
    code, err = run_on_terminal([*args, "-o", str(folder / "tty")])
    runs["tty"] = (code, err, time.perf_counter() - started)
    piped = subprocess.run([*args, "-o", str(folder / "pipe")], capture_output=True, text=True)
    runs["pipe"] = (piped.returncode, piped.stderr, 0.0)
    return runs


def test_terminal_shows_each_phase_in_order_with_times(converts):
    code, err, wall = converts["tty"]
    assert code == 0, err
    phases = [m.groups() for m in map(LINE.match, err.splitlines()) if m]
    assert [(c, p) for c, p, *_ in phases] == [
        ("pipeline", "load"),
        *(("text_encoder", p) for p in PER_COMPONENT),
        ("pipeline", "manifest"),
    ], err
    seconds = [float(s) for *_, s, _ in phases]
    totals = [float(t) for *_, t in phases]
    assert totals == sorted(totals) and totals[-1] < wall
    # phases follow each other: each total is at least the sum of the phase times so far (less rounding)
    assert all(total >= sum(seconds[: i + 1]) - 0.05 * (i + 1) for i, total in enumerate(totals)), err
    # the export's own lines stay, each after the phase it reports
    lines = err.splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert first("pipeline: load") < first("loaded preset 'tiny-sd'")
    assert first("text_encoder: compare") < first("exported text_encoder (fp16)")
    assert first("pipeline: manifest") < first("wrote ")


def test_pipe_gets_only_the_export_lines(converts):
    code, err, _ = converts["pipe"]
    assert code == 0, err
    tty_lines = [line for line in converts["tty"][1].splitlines() if not LINE.match(line)]
    assert not any(LINE.match(line) for line in err.splitlines()), err
    # the same lines as on the terminal, less the phases (times and paths differ)
    shape = [re.sub(r"[\d.]+|/\S+", "#", line) for line in err.splitlines()]
    assert shape == [re.sub(r"[\d.]+|/\S+", "#", line) for line in tty_lines]


def test_nothing_is_written_unless_reporting():
    progress.mark("unet", "trace")  # outside any block: a no-op
    with progress.reporting(None):
        progress.mark("unet", "trace")
        progress.end()
    stream = io.StringIO()
    with progress.reporting(stream):
        progress.mark("unet", "trace")
        progress.mark("unet", "optimize")
    assert [LINE.match(line).group(1, 2) for line in stream.getvalue().splitlines()] == [
        ("unet", "trace"),
        ("unet", "optimize"),
    ]


def test_a_phase_cut_short_by_an_error_gets_no_line():
    stream = io.StringIO()
    with pytest.raises(ValueError), progress.reporting(stream):
        progress.mark("unet", "trace")
        raise ValueError("failed")
    assert stream.getvalue() == ""
