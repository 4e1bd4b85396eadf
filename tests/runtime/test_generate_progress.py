"""`sdruntime generate`'s step bar: on a terminal by default, never on a pipe unless asked (`--progress`)."""

from __future__ import annotations

import sys
from pathlib import Path

from sdruntime.cli import main

from tests.terminal import run_on_terminal

SDRUNTIME = str(Path(sys.executable).parent / "sdruntime")
STEPS = 3


def args(export: Path, out: Path) -> list[str]:
    return ["generate", str(export), "a red circle", "--steps", str(STEPS), "--seed", "0", "-o", str(out)]


def test_terminal_shows_a_bar_per_step(tiny32, tmp_path):
    code, err = run_on_terminal([SDRUNTIME, *args(tiny32, tmp_path / "tty.png")])
    assert code == 0, err
    assert "denoising: 100%" in err, err
    assert (tmp_path / "tty.png").is_file()


def test_no_bar_on_a_pipe_unless_asked(tiny32, tmp_path, capsys):
    assert main(args(tiny32, tmp_path / "pipe.png")) == 0
    assert "denoising" not in capsys.readouterr().err
    assert main([*args(tiny32, tmp_path / "asked.png"), "--progress"]) == 0
    assert "denoising: 100%" in capsys.readouterr().err


def test_no_bar_on_a_terminal_when_refused(tiny32, tmp_path):
    code, err = run_on_terminal([SDRUNTIME, *args(tiny32, tmp_path / "quiet.png"), "--no-progress"])
    assert code == 0, err
    assert "denoising" not in err, err
