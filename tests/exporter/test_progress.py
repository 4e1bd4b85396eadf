"""`sdexport convert`'s progress (sdexport/progress.py): on a terminal, one line per component and phase, in the
order the export runs them, with times that add up; elsewhere, only the export's own lines (unless asked)."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import pytest

from sdexport import converting, progress
from sdexport.cli import main
from tests.terminal import run_on_terminal

SDEXPORT = str(Path(sys.executable).parent / "sdexport")
LINE = re.compile(r"^(\S+): (\w+) (\d+\.\d) s \((\d+\.\d) s in all\)$")
PER_COMPONENT = ["trace", "optimize", "fp16", "write", "check", "compare"]


@pytest.fixture(scope="module")
def on_terminal(tmp_path_factory) -> tuple[int, str, float]:
    """An fp16 text-encoder export with stderr on a terminal: its exit code, stderr and wall time."""
    out = tmp_path_factory.mktemp("progress") / "tty"
    started = time.perf_counter()
    code, err = run_on_terminal(
        [SDEXPORT, "convert", "tiny-sd", "--components", "text_encoder", "--dtype", "fp16", "-o", str(out)]
    )
    return code, err, time.perf_counter() - started


def test_terminal_shows_each_phase_in_order_with_times(on_terminal):
    code, err, wall = on_terminal
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


def fake_convert(source, out, log, **options) -> None:
    """Stands in for the export (which the terminal test runs): its log lines and two phases."""
    log("loaded")
    progress.mark("unet", "trace")
    progress.mark("unet", "optimize")
    log("exported unet")


@pytest.mark.parametrize("flag, shown", [((), False), (("--progress",), True)])
def test_not_a_terminal_gets_the_export_lines_only(monkeypatch, capsys, tmp_path, flag, shown):
    monkeypatch.setattr(converting, "convert", fake_convert)
    assert main(["convert", "tiny-sd", "-o", str(tmp_path / "out"), *flag]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if not LINE.match(line)] == ["loaded", "exported unet"]
    assert [LINE.match(line).group(1, 2) for line in lines if LINE.match(line)] == (
        [("unet", "trace"), ("unet", "optimize")] if shown else []
    )


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
