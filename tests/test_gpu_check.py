"""scripts/gpu_check.py runs end to end on the CPU (its CUDA rows say why they were skipped)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results = gpu_check.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny-sd",
            "--size",
            "64",
            "--steps",
            "3",
            "--runs",
            "1",
            "--unet-calls",
            "2",
            "--out",
            str(tmp_path / "exports"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    arms = results["arms"]
    ours = arms["ours generic fp16, CPU EP"]
    assert ours["unet_calls"] == 4 and 0 <= ours["outside_session_run"] < 1  # PNDM: 3 steps, 4 U-Net calls
    assert arms["ours TensorRT EP fp16"] == {"skipped": "needs a GPU"}
    check = results["accuracy"]["U-Net generic-fp16 vs torch fp32"]
    assert check["relative_l2"] <= 1e-2 and not check["nan"]
