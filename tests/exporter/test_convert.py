"""`sdexport convert`: every graph checks, runs on ORT's CPU EP and matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sdruntime.manifest import COMPONENT_IO, load_schema, read_manifest, sha256_file

from sdexport.specs import example_inputs, size_multiple, vae_scale_factor, wrap

from ..conftest import _quiet_convert

# text_encoder_2: SDXL only (tests/exporter/test_sdxl_export.py); ControlNets: tests/exporter/test_controlnet_export.py;
# the tiny decoder: tests/exporter/test_tiny_vae.py
COMPONENTS = [c for c in COMPONENT_IO if c not in ("text_encoder_2", "controlnet", "vae_decoder_tiny")]


def run_both(pipe, folder, component, batch, latent_hw):
    inputs = example_inputs(component, pipe, batch, *latent_hw, seed=batch * 100 + latent_hw[0])
    with torch.no_grad():
        expected = wrap(component, pipe)(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {}
    # a U-Net's ControlNet residuals are overridable initializers (zeros unless fed), not inputs
    residuals = [spec for spec in session.get_overridable_initializers() if spec.name in inputs]
    for spec in [*session.get_inputs(), *residuals]:
        value = inputs[spec.name].numpy()
        feed[spec.name] = value.astype(np.float16) if spec.type == "tensor(float16)" else value
    got = session.run(None, feed)
    return [e.numpy() for e in expected], [g.astype(np.float32) for g in got]


def latent_sizes(pipe):
    """Two image sizes (in latent pixels) that are multiples of the size multiple."""
    step = size_multiple(pipe) // vae_scale_factor(pipe)
    return [(2 * step, 2 * step), (3 * step, 2 * step)]


def test_every_model_passes_onnx_checker(tiny32, tiny16):
    for folder in (tiny32, tiny16):
        for component in COMPONENTS:
            onnx.checker.check_model(str(folder / component / "model.onnx"), full_check=True)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_fp32_matches_pytorch(tiny_pipe, tiny32, component, batch):
    for hw in latent_sizes(tiny_pipe):
        expected, got = run_both(tiny_pipe, tiny32, component, batch, hw)
        for e, g in zip(expected, got):
            assert e.shape == g.shape
            assert np.max(np.abs(e - g)) <= 1e-4


@pytest.mark.parametrize("component", COMPONENTS)
def test_other_layout_matches_pytorch(sd2_case, component):
    _, pipe, out = sd2_case
    for batch in (1, 2):
        for hw in latent_sizes(pipe):
            expected, got = run_both(pipe, out, component, batch, hw)
            for e, g in zip(expected, got):
                assert np.max(np.abs(e - g)) <= 1e-4


def test_other_layout_manifest_facts(sd2_case):
    folder, pipe, out = sd2_case
    manifest = read_manifest(out)
    facts = manifest.pipeline
    assert facts.family == "sd2"
    assert facts.prediction_type == pipe.scheduler.config.prediction_type
    assert facts.pad_token_id == 0  # "!" as SD 2.x pads
    assert facts.vae_scale_factor == 4
    assert facts.upcast_attention is True
    assert manifest.size_multiple == 16  # 4x VAE, two U-Net upsamplers
    assert manifest.source.to_json() == {
        "kind": "folder",
        "name": str(folder.resolve()),
        "loras": [],
        "vae": "pipeline",
    }
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and saved["prediction_type"] == facts.prediction_type


@pytest.mark.parametrize("component", COMPONENTS)
def test_fp16_runs_and_stays_close(tiny_pipe, tiny16, component):
    expected, got = run_both(tiny_pipe, tiny16, component, 2, latent_sizes(tiny_pipe)[0])
    for e, g in zip(expected, got):
        assert np.isfinite(g).all()
        assert np.linalg.norm(e - g) / np.linalg.norm(e) <= 1e-2


def test_fp16_io_types_and_fp32_timestep_path(tiny16):
    manifest = read_manifest(tiny16)
    unet = manifest.components["unet"]
    dtypes = {t.name: t.dtype for t in unet.inputs + unet.outputs}
    assert dtypes == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
        "out_sample": "float16",
        # a ControlNet's residuals, fp16 like the activations they are added to
        **{f"down_block_additional_residual_{i}": "float16" for i in range(4)},
        "mid_block_additional_residual": "float16",
    }
    model = onnx.load(str(tiny16 / "unet" / "model.onnx"))
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["timestep"] == onnx.TensorProto.FLOAT and inputs["sample"] == onnx.TensorProto.FLOAT16
    kept = set(unet.fp32_nodes)
    sin_cos = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sin_cos and all(n.name in kept for n in sin_cos)
    # the Sin/Cos outputs really are float32 in the converted graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in sin_cos)
    # and nothing between the timestep input and Sin/Cos rounds through fp16
    producer = {out: n for n in model.graph.node for out in n.output}
    pending, seen = [i for n in sin_cos for i in n.input], set()
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        assert not (node.op_type == "Cast" and to == onnx.TensorProto.FLOAT16), node.name
        pending += list(node.input)


def test_upcast_attention_keeps_softmax_in_fp32(sd2_case, tmp_path):
    folder, _, _ = sd2_case
    from sdexport import convert

    out = convert(str(folder), tmp_path / "fp16", dtype="fp16", components=["unet"], log=lambda s: None)
    model = onnx.load(str(out / "unet" / "model.onnx"))
    kept = set(read_manifest(out).components["unet"].fp32_nodes)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(n.name in kept for n in softmax)


def test_keep_fp32_component(tmp_path):
    from sdexport import convert

    out = convert(
        "tiny-sd",
        tmp_path / "mixed",
        dtype="fp16",
        keep_fp32=["vae_decoder"],
        components=["unet", "vae_decoder"],
        log=lambda s: None,
    )
    components = read_manifest(out).components
    assert components["unet"].dtype == "fp16"
    assert components["vae_decoder"].dtype == "fp32"
    assert components["vae_decoder"].inputs[0].dtype == "float32"


def test_manifest_matches_schema_and_files(tiny32, tiny16, sd2_case):
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    for folder in (tiny32, tiny16, sd2_case[2]):
        manifest = read_manifest(folder)
        jsonschema.validate(manifest.to_json(), schema)
        for entry in manifest.components.values():
            for file in entry.files:
                path = folder / file.path
                assert path.stat().st_size == file.bytes
                assert sha256_file(path) == file.sha256
        manifest.verify()


def test_folder_layout(tiny32):
    for path in [
        "sdexport.json",
        "model_index.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "text_encoder/config.json",
        "vae_decoder/config.json",
        "vae_encoder/config.json",
    ]:
        assert (tiny32 / path).is_file(), path
    tokenizer = json.loads((tiny32 / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["padding"]["pad_id"] == 49407 and tokenizer["padding"]["strategy"] == {"Fixed": 77}
    assert not list(tiny32.parent.glob(".tiny32.tmp-*"))


def test_static_export_records_and_runs_its_shapes(tmp_path):
    from sdexport import convert

    out = convert("tiny-sd", tmp_path / "static", static=True, batch_size=1, height=96, width=64, log=lambda s: None)
    manifest = read_manifest(out)
    assert manifest.static.to_json() == {"batch_size": 1, "height": 96, "width": 64}
    unet_inputs = {i.name: list(i.shape) for i in manifest.components["unet"].inputs}
    assert unet_inputs["sample"] == [2, 4, 12, 8]  # guidance doubles the U-Net batch
    assert list(manifest.components["vae_decoder"].outputs[0].shape) == [1, 3, 96, 64]
    model = onnx.load(str(out / "unet" / "model.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 4, 12, 8]


def test_cpu_target_is_optimized_and_runs(tiny_pipe, tmp_path):
    from sdexport import convert

    out = convert("tiny-sd", tmp_path / "cpu", target="cpu", components=["unet"], log=lambda s: None)
    assert read_manifest(out).target == "cpu"
    expected, got = run_both(tiny_pipe, out, "unet", 2, latent_sizes(tiny_pipe)[0])
    assert np.max(np.abs(expected[0] - got[0])) <= 1e-4


def test_large_models_get_one_external_data_file(tiny32, tmp_path, monkeypatch):
    """Over 2 GB, every tensor goes to one model.onnx_data (torch writes one file per tensor)."""
    from sdruntime.onnx_proto import external_data_locations
    from sdruntime.session import check_external_data

    import sdexport.graph_files as graph_files

    monkeypatch.setattr(graph_files, "is_large", lambda model: True)
    model = onnx.load(str(tiny32 / "unet" / "model.onnx"))
    files = graph_files.save_model(model, tmp_path / "unet" / "model.onnx")
    assert files == ["model.onnx", "model.onnx_data"]
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == files
    modes = {(tmp_path / "unet" / name).stat().st_mode for name in files}
    assert len(modes) == 1  # the weights are as readable as the graph
    assert external_data_locations(tmp_path / "unet" / "model.onnx") == {"model.onnx_data"}
    check_external_data(tmp_path / "unet" / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out_sample"]


def test_weights_no_wanted_component_uses_are_freed_before_tracing():
    from sdexport.presets import build_from_recipe, resolve_preset
    from sdexport.trace import release_unused

    pipe = build_from_recipe(resolve_preset("sdxl-tiny"))
    assert release_unused(pipe, ["unet", "vae_decoder"]) == ["text_encoder", "text_encoder_2"]
    assert all(p.is_meta for p in pipe.text_encoder_2.parameters())
    assert not any(p.is_meta for m in (pipe.unet, pipe.vae) for p in m.parameters())
    assert pipe.text_encoder_2.config.projection_dim == 32  # configs stay for the manifest


@pytest.mark.parametrize(("dtype", "target"), [("fp32", "generic"), ("fp16", "generic"), ("fp32", "cpu")])
def test_weightless_trace_gives_the_same_graphs(monkeypatch, tmp_path, tiny_pipe, dtype, target):
    """Past 2 GB a component is traced without its weights, which are written afterwards one at a time
    (export.attach_weights); forced on tiny-sd, every graph still matches PyTorch."""
    import sdexport.trace

    monkeypatch.setattr(sdexport.trace, "LEAN_TRACE_BYTES", 0)
    out = _quiet_convert("tiny-sd", tmp_path / "out", dtype=dtype, target=target)
    manifest = read_manifest(out)
    for component, entry in manifest.components.items():
        limit = 1e-4 if dtype == "fp32" else 2e-2
        assert entry.export_relative_l2 is not None and entry.export_relative_l2 <= limit, component
        expected, got = run_both(tiny_pipe, out, component, 2, latent_sizes(tiny_pipe)[0])
        rel_l2 = max(float(np.linalg.norm(e - g) / np.linalg.norm(e)) for e, g in zip(expected, got))
        assert rel_l2 <= limit, component


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("split", [False, True], ids=["one-file", "external-data"])
def test_weights_left_on_disk_are_written_as_in_memory(monkeypatch, tmp_path, tiny_pipe, fp16, split):
    """Past 2 GB the finished graph keeps its weights in files (export.OnDisk), and fp16 converts them
    as they are written: the written model equals the one finished in memory, tensor for tensor."""
    import sdexport.graph_files as export
    import sdexport.trace as tracing
    from sdexport.optimize import finish_graph

    monkeypatch.setattr(tracing, "LEAN_TRACE_BYTES", 0)
    traced = tracing.trace("unet", tiny_pipe, 17, {}, (8, 8), 2, tmp_path / "traced" / "model.onnx")
    assert (traced.parent / export.EXTERNAL_DATA_NAME).is_file()
    in_memory, kept = finish_graph("unet", onnx.load(str(traced)), "generic", fp16, True)
    on_disk, kept_on_disk = finish_graph("unet", traced, "generic", fp16, True)
    assert isinstance(on_disk, export.OnDisk) and kept_on_disk == kept
    assert bool(on_disk.fp16) == fp16
    export.save_model(in_memory, tmp_path / "memory" / "model.onnx")
    if split:  # as an SDXL U-Net's weights would be
        monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1)
    files = export.save_model(on_disk, tmp_path / "disk" / "model.onnx")
    assert files == (["model.onnx", export.EXTERNAL_DATA_NAME] if split else ["model.onnx"])
    expected = onnx.load(str(tmp_path / "memory" / "model.onnx"))
    got = onnx.load(str(tmp_path / "disk" / "model.onnx"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in expected.graph.node
    ]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in expected.graph.initializer}
    assert {t.name for t in got.graph.initializer} == set(weights)
    for tensor in got.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor, str(tmp_path / "disk"))
        assert array.dtype == weights[tensor.name].dtype and np.array_equal(array, weights[tensor.name]), tensor.name
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in got.graph.initializer) == fp16
    session = ort.InferenceSession(str(tmp_path / "disk" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out_sample"]


def test_static_exports_larger_than_the_trace_cap_are_traced_small(monkeypatch, tmp_path, tiny_pipe):
    """A static export is traced at most TRACE_MAX_LATENT a side (the tracer holds every activation)
    and gets its sizes written in afterwards: checked at its own size, it still matches PyTorch."""
    import sdexport.trace as conversion

    traced_at = {}
    real_trace = conversion.trace

    def spy(component, pipe, opset, fixed, latent_size, batch, path):
        traced_at[component] = latent_size
        return real_trace(component, pipe, opset, fixed, latent_size, batch, path)

    monkeypatch.setattr(conversion, "TRACE_MAX_LATENT", 4)
    monkeypatch.setattr(conversion, "trace", spy)
    out = _quiet_convert("tiny-sd", tmp_path / "static", static=True, batch_size=1, height=96, width=64)
    assert traced_at["unet"] == (4, 4) and traced_at["vae_decoder"] == (4, 4)
    manifest = read_manifest(out)
    model = onnx.load(str(out / "unet" / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 12, 8]
    for component, entry in manifest.components.items():
        assert entry.export_relative_l2 is not None and entry.export_relative_l2 <= 1e-4, component
    expected, got = run_both(tiny_pipe, out, "unet", 2, (12, 8))
    assert float(np.linalg.norm(expected[0] - got[0]) / np.linalg.norm(expected[0])) <= 1e-4


def test_one_spec_per_component_of_the_io_table():
    """Every entry of the IO table, the transformer families' included, has one spec, and the denoisers are traced last."""
    from sdruntime.manifest import FAMILY_IO

    from sdexport.specs import SPECS

    family_entries = {name for entries in FAMILY_IO.values() for name in entries}
    assert set(SPECS) == set(COMPONENT_IO) | family_entries
    assert [name for name, spec in SPECS.items() if spec.traced_last] == ["unet", "transformer"]


def test_the_plan_says_why_a_component_stays_fp32():
    from types import SimpleNamespace

    from sdexport.plan import FORCE_UPCAST, KEEP_FP32, ComponentPlan, ConvertOptions, component_plan

    opts = ConvertOptions(dtype="fp16", keep_fp32=["text_encoder"])
    upcast = SimpleNamespace(vae_force_upcast=True)
    assert component_plan("text_encoder", opts, upcast) == ComponentPlan("text_encoder", "fp32", KEEP_FP32)
    assert component_plan("vae_decoder", opts, upcast).reason == FORCE_UPCAST
    assert component_plan("unet", opts, upcast).fp16
    assert component_plan("vae_decoder", opts, SimpleNamespace(vae_force_upcast=None)).fp16
