"""The files beside the graphs (tokenizer, scheduler) are part of the export: hashed and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sdruntime.cli import main
from sdruntime.manifest import CONFIG_FILES, read_manifest, sha256_file


@pytest.fixture
def copy32(tiny32, tmp_path) -> Path:
    return Path(shutil.copytree(tiny32, tmp_path / "export"))


def generate(capsys, folder: Path, *extra: str) -> tuple[int, list[str]]:
    code = main(["generate", str(folder), "a blue square", "--steps", "1", "-o", str(folder.parent / "x.png"), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("sdruntime: error:")]


def test_manifest_hashes_the_tokenizer_and_scheduler_files(tiny32):
    recorded = {f.path: f for f in read_manifest(tiny32).config_files}
    assert set(recorded) == set(CONFIG_FILES)
    for name, entry in recorded.items():
        assert entry.sha256 == sha256_file(tiny32 / name)


@pytest.mark.parametrize("no_verify", [False, True])
def test_a_truncated_tokenizer_json_is_one_line(capsys, copy32, no_verify):
    path = copy32 / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:1000])
    code, errors = generate(capsys, copy32, *(["--no-verify"] if no_verify else []))
    assert code == 2 and len(errors) == 1
    assert "tokenizer.json" in errors[0] and "sdexport convert" in errors[0]


def test_a_changed_scheduler_config_is_refused(capsys, copy32):
    path = copy32 / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace("scaled_linear", "linear"))
    code, errors = generate(capsys, copy32)
    assert code == 2 and "scheduler_config.json" in errors[0] and "sdexport convert" in errors[0]
