"""scripts/cpu_roofline.py: the multiply-add count it bases its lower bound on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save_model

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import cpu_roofline  # noqa: E402


def test_multiply_adds_are_counted_from_the_profiled_shapes(tmp_path):
    """A 3x3 Conv (8 -> 16 channels, 2x8x8 out) then a MatMul (2x16x64 by 64x5): known counts."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["sample", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "m"], ["out_sample"]),
        ],
        "g",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 8, 8, 8])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3), dtype=np.float32), "w"),
            numpy_helper.from_array(np.array([2, 16, 64], dtype=np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((64, 5), dtype=np.float32), "m"),
        ],
    )
    (tmp_path / "unet").mkdir()
    save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "unet" / "model.onnx")
    )
    feeds = {"sample": rng.standard_normal((2, 8, 8, 8), dtype=np.float32)}
    result = cpu_roofline.profile(tmp_path / "unet" / "model.onnx", "basic", feeds, threads=1, runs=2)
    assert result["macs"]["Conv"] == 2 * 16 * 8 * 8 * (8 * 3 * 3)
    assert result["macs"]["MatMul"] == 2 * 16 * 5 * 64
    assert result["seconds"] > 0


def test_script_reports_a_bound_below_the_measured_time(tiny32, tmp_path):
    out = tmp_path / "roofline.json"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "cpu_roofline.py"),
            str(tiny32),
            "--latent",
            "8",
            "--runs",
            "1",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert min(result["peak_gflops"].values()) > 0
    assert 0 < result["image_lower_bound_s"] < result["image_ours_s"]
