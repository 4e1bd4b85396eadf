"""fp16 conversion at any model size, and the check of every graph `convert` writes."""

from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest
from onnxruntime.transformers.float16 import convert_float_to_float16
from sdruntime.manifest import read_manifest

import sdexport.graph_files as export
import sdexport.optimize as optimize
from sdexport import convert
from sdexport.cli import main
from sdexport.errors import GraphCheckFailed
from sdexport.graph_check import check_written_graph, failing_node
from sdexport.precision import drop_fp16_round_trips, infer_value_types

from .test_convert import latent_sizes, run_both


def quiet_convert(out, source="tiny-sd", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(source, out, log=lambda s: None, **kw)


def fp16_without_types(component, model, keep_fp32_nodes):
    """fp16 conversion without knowing the intermediate types: what a graph over 2 GB used to get."""
    converted = convert_float_to_float16(
        model,
        keep_io_types=["timestep"] if component == "unet" else [],
        node_block_list=keep_fp32_nodes,
        disable_shape_infer=True,
    )
    return drop_fp16_round_trips(converted)


@pytest.fixture(scope="module")
def traced_unet(tiny32):
    return onnx.load(str(tiny32 / "unet" / "model.onnx"))


def test_types_inferred_without_weights_equal_full_inference(traced_unet):
    full = onnx.shape_inference.infer_shapes(traced_unet)
    expected = {v.name: v.type.SerializeToString() for v in full.graph.value_info}
    got = {v.name: v.type.SerializeToString() for v in infer_value_types(traced_unet)}
    assert got == expected and len(got) > 100


def test_fp16_of_a_graph_over_2gb_loads_and_matches(tiny_pipe, tmp_path, monkeypatch):
    """Every size goes through the same typed conversion: here tiny-sd's U-Net is treated as over 2 GB."""
    monkeypatch.setattr(export, "is_large", lambda model: True)
    out = quiet_convert(tmp_path / "fp16", components=["unet"], dtype="fp16")
    path = out / "unet" / "model.onnx"
    assert (out / "unet" / "model.onnx_data").is_file()
    onnx.shape_inference.infer_shapes_path(
        str(path), str(tmp_path / "inferred.onnx"), check_type=True, strict_mode=True
    )
    expected, got = run_both(tiny_pipe, out, "unet", 2, latent_sizes(tiny_pipe)[0])
    assert float(((expected[0] - got[0]) ** 2).sum() ** 0.5 / (expected[0] ** 2).sum() ** 0.5) <= 1e-2
    # the timestep's Sin/Cos island stays fp32 with Casts at its edges only
    model = onnx.load(str(path), load_external_data=False)
    kept = set(read_manifest(out).components["unet"].fp32_nodes)
    assert {n.name for n in model.graph.node if n.op_type in ("Sin", "Cos")} <= kept


def test_a_graph_with_clashing_types_is_named_by_node(traced_unet, tmp_path):
    from sdexport.precision import fp32_nodes

    model = onnx.ModelProto()
    model.CopyFrom(traced_unet)
    broken = fp16_without_types("unet", model, fp32_nodes("unet", model, False))
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(broken, str(path))
    with pytest.raises(GraphCheckFailed, match=r"^unet/model.onnx fails ONNX's checks at node /unet/time_\w+/\S+: "):
        check_written_graph("unet", path, "CPUExecutionProvider")
    with pytest.raises(Exception, match="/unet/time_"):  # and ORT refuses it in the same island
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_failing_node_reads_onnx_and_ort_messages():
    assert failing_node("[ShapeInferenceError] (op_type:Gemm, node name: /a/Gemm): B has inconsistent type") == (
        "/a/Gemm",
        "B has inconsistent type",
    )
    assert (
        failing_node("Type Error: Type parameter (T) of Optype (Mul) bound to different types in node (/b/Mul).")[0]
        == "/b/Mul"
    )
    assert failing_node("something else")[0] == "?"


def test_convert_refuses_to_write_a_graph_that_does_not_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(optimize, "to_fp16", fp16_without_types)
    out = tmp_path / "broken"
    code = main(["convert", "tiny-sd", "--components", "unet", "--dtype", "fp16", "--no-check", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert "unet/model.onnx fails ONNX's checks at node /unet/time_" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not list(tmp_path.glob(".broken.*"))


# -- SD 1.5-sized U-Nets (3.4 GB in fp32): the graphs that used to be written broken ---------------


@pytest.fixture(scope="module")
def sd15_log():
    return []


@pytest.mark.slow  # 105-110 s on 2 cores: run with -m slow after a change to the fp16 path
def test_sd15_fp16_generic_unet_loads_and_matches_pytorch(tmp_path_factory, sd15_log):
    out = tmp_path_factory.mktemp("sd15") / "fp16"
    convert("sd15-random", out, components=["unet"], dtype="fp16", log=sd15_log.append)
    unet = read_manifest(out).components["unet"]
    path = out / "unet" / "model.onnx"
    assert unet.dtype == "fp16"  # 1.7 GB: its fp32 graph (3.4 GB) went through the conversion over 2 GB
    onnx.shape_inference.infer_shapes_path(str(path), str(out / "inferred.onnx"), check_type=True, strict_mode=True)
    # convert compared it with PyTorch fp32 on the CPU EP right after writing it
    assert unet.export_relative_l2 is not None and unet.export_relative_l2 <= 2e-2, sd15_log
    model = onnx.load(str(path), load_external_data=False)
    assert {n.name for n in model.graph.node if n.op_type in ("Sin", "Cos")} <= set(unet.fp32_nodes)


@pytest.mark.slow  # 220 s of the default suite's 20 minutes; the generic one above keeps the >2 GB fp16 path in it
def test_sd15_fp16_cuda_unet_type_checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15") / "cuda16"
    quiet_convert(out, "sd15-random", components=["unet"], dtype="fp16", target="cuda")
    path = out / "unet" / "model.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(out / "inferred.onnx"), check_type=True, strict_mode=True)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs == {
        "sample": onnx.TensorProto.FLOAT16,
        "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT16,
        # a ControlNet's 12 down-block residuals and the mid block's, fp16 like the activations they join
        **dict.fromkeys([f"down_block_additional_residual_{i}" for i in range(12)], onnx.TensorProto.FLOAT16),
        "mid_block_additional_residual": onnx.TensorProto.FLOAT16,
    }
    assert any(n.domain == "com.microsoft" for n in model.graph.node)


def test_omitted_optional_names_are_not_edges():
    """ "" names an omitted optional input or output: fused graphs have many (SkipLayerNormalization's
    unused outputs, Resize's roi); taking them for one tensor made false cycles and left graphs unsorted."""
    from onnx import TensorProto, helper

    from sdexport.precision import topological_order

    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize"),  # reads ""
        helper.make_node(
            "Constant",
            [],
            ["scales"],
            name="scales",
            value=helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
        ),
        helper.make_node("Dropout", ["y"], ["z", ""], name="later"),  # writes "" after the reader
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    assert [n.name for n in topological_order(nodes, graph)] == ["scales", "resize", "later"]
