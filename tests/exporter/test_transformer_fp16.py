"""fp16 and the cpu/cuda targets for SD3's and Flux's T5 and transformers (precision.py's rules for models
trained in bfloat16, fusion_limits.py for the t5 and mmdit fusions).

Every output is compared with the diffusers/transformers module in fp32 on the same inputs. The rules are
shown to matter on weights scaled until an activation passes fp16's 65504, as real T5-XXL and Flux
weights do: the graph under the rules stays finite and close to PyTorch, the same graph converted with
the timestep rules alone does not.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from sdruntime.manifest import read_manifest

from sdexport import convert
from sdexport.compare import reference_outputs
from sdexport.convert_options import ConvertOptions
from sdexport.fusion_limits import refused_nodes, unfused_record
from sdexport.graph_check import check_written_graph
from sdexport.graph_files import graph_of
from sdexport.optimize import finish_graph
from sdexport.plan import plan_export
from sdexport.precision import fp32_nodes, infer_value_types, timestep_path, to_fp16
from sdexport.presets import build_from_recipe, models_dir
from sdexport.specs import set_attention, spec_of, wrap
from sdexport.trace import trace

from .test_convert import latent_sizes, run_both

T5 = {"sd3-tiny": "text_encoder_3", "flux-tiny": "text_encoder_2"}
PARTS = [(preset, part) for preset in T5 for part in (T5[preset], "transformer")]
FP16_RELATIVE_L2 = 1e-2  # ../shared/DESIGN.md's fp16 tolerance per component
FP32_MAX_ABS = 1e-4  # and its fp32 one for tiny models
FP16_MAX = 65504.0
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def quiet_convert(preset, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(preset, out, components=[T5[preset], "transformer"], log=lambda s: None, **kw)


def build_pipe(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_from_recipe(models_dir() / preset)


@pytest.fixture(scope="module")
def pipes():
    return {preset: build_pipe(preset) for preset in T5}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """preset -> (target, dtype) -> the export of its T5 and transformer."""
    root = tmp_path_factory.mktemp("transformer_fp16")
    kinds = [("generic", "fp16"), ("cpu", "fp32"), ("cpu", "fp16"), ("cuda", "fp16")]
    return {
        preset: {
            (target, dtype): quiet_convert(preset, root / f"{preset}-{target}-{dtype}", target=target, dtype=dtype)
            for target, dtype in kinds
        }
        for preset in T5
    }


def errors(pipe, folder, part, batch=2):
    """(max abs, relative L2) of ONNX Runtime's outputs against PyTorch's, at two sizes."""
    worst = (0.0, 0.0)
    for hw in latent_sizes(pipe):
        expected, got = run_both(pipe, folder, part, batch, hw)
        for e, g in zip(expected, got):
            assert np.isfinite(g).all()
            relative = float(np.linalg.norm(e - g) / np.linalg.norm(e))
            worst = (max(worst[0], float(np.max(np.abs(e - g)))), max(worst[1], relative))
    return worst


@pytest.mark.parametrize(("preset", "part"), PARTS)
def test_fp16_generic_matches_pytorch(pipes, exports, preset, part):
    max_abs, relative = errors(pipes[preset], exports[preset]["generic", "fp16"], part)
    print(f"{preset} {part} fp16 generic: max abs {max_abs:.2e}, relative L2 {relative:.1e}")
    assert relative <= FP16_RELATIVE_L2


@pytest.mark.parametrize(("preset", "part"), PARTS)
def test_cpu_target_matches_pytorch(pipes, exports, preset, part):
    """fp32 within the fp32 tolerance, fp16 within the fp16 one; both with ORT's CPU fusions saved in them."""
    max_abs, _ = errors(pipes[preset], exports[preset]["cpu", "fp32"], part)
    assert max_abs <= FP32_MAX_ABS
    max_abs, relative = errors(pipes[preset], exports[preset]["cpu", "fp16"], part)
    print(f"{preset} {part} fp16 cpu: max abs {max_abs:.2e}, relative L2 {relative:.1e}")
    assert relative <= FP16_RELATIVE_L2
    ops = {n.op_type for n in onnx.load(str(exports[preset]["cpu", "fp16"] / part / "model.onnx")).graph.node}
    if part != "transformer":
        assert "SimplifiedLayerNormalization" in ops  # T5's RMSNorm fused by ORT, in the ONNX domain


def value_types(path: Path) -> dict[str, int]:
    model = onnx.load(str(path))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    types.update({v.name: v.type.tensor_type.elem_type for v in infer_value_types(model)})
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def kept_nodes(folder: Path, part: str) -> tuple[list[onnx.NodeProto], dict[str, int], onnx.ModelProto]:
    path = folder / part / "model.onnx"
    model = onnx.load(str(path))
    kept = set(read_manifest(folder).components[part].fp32_nodes)
    return [n for n in model.graph.node if n.name in kept], value_types(path), model


@pytest.mark.parametrize("target", ["generic", "cpu", "cuda"])
@pytest.mark.parametrize(("preset", "part"), PARTS)
def test_kept_nodes_are_fp32_with_casts_around(exports, preset, part, target):
    folder = exports[preset][target, "fp16"]
    nodes, types, model = kept_nodes(folder, part)
    assert nodes
    for node in nodes:
        floats = [types[name] for name in [*node.input, *node.output] if types.get(name) in (FLOAT, FLOAT16)]
        assert set(floats) <= {FLOAT}, (node.name, floats)  # (the RoPE path's Shape and Gather read none)
    assert sum(FLOAT in {types.get(name) for name in n.output} for n in nodes) > len(nodes) // 2
    # the fp16 graph meets them through Casts, and no fp16 node reads a float32 tensor (strict type check)
    producers = {o: n for n in model.graph.node for o in n.output}
    kept = {n.name for n in nodes}
    fed = [producers[i] for n in nodes for i in n.input if i in producers and producers[i].name not in kept]
    assert any(p.op_type == "Cast" for p in fed)
    check_written_graph(part, folder / part / "model.onnx", None)
    assert types[model.graph.output[0].name] == FLOAT16


def test_what_the_rules_keep_in_t5(exports, pipes):
    """T5 (generic graph): every residual Add (2 per block), every RMSNorm's x^2 and mean (2 per block and the
    final norm), the feed-forward's down projections (not q, k, v, o, wi_0, wi_1) and the relative position
    buckets' Log; on the cuda target every fused residual norm."""
    for preset, part in T5.items():
        nodes, _, model = kept_nodes(exports[preset]["generic", "fp16"], part)
        layers = getattr(pipes[preset], part).config.num_layers
        kinds = [n.op_type for n in nodes]
        assert kinds.count("Pow") == kinds.count("ReduceMean") == 2 * layers + 1
        assert kinds.count("MatMul") == layers
        assert "Log" in kinds
        constants = {t.name for t in model.graph.initializer}
        residual = [n for n in nodes if n.op_type == "Add" and not constants & set(n.input)]
        assert len(residual) == 2 * layers
        cuda, _, fused = kept_nodes(exports[preset]["cuda", "fp16"], part)
        skips = {n.name for n in fused.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"}
        assert skips and skips <= {n.name for n in cuda}


def test_what_the_rules_keep_in_the_transformers(exports):
    """Every LayerNorm (each reads the residual stream), Flux's Concat of the text and image streams and
    the Slice after it, the gate Muls, and the Sin/Cos of the timestep, guidance and RoPE paths."""
    for preset in T5:
        nodes, _, model = kept_nodes(exports[preset]["generic", "fp16"], "transformer")
        kinds = {n.op_type for n in nodes}
        norms = {n.name for n in model.graph.node if n.op_type == "LayerNormalization"}
        assert norms and norms <= {n.name for n in nodes}
        assert {"Sin", "Cos", "Mul", "Add"} <= kinds
        if preset == "flux-tiny":
            assert {"Concat", "Slice"} <= kinds
        inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        assert all(inputs[name] == FLOAT for name in spec_of("transformer").fp32_inputs if name in inputs)
        assert inputs["hidden_states"] == FLOAT16


@pytest.mark.parametrize("preset", list(T5))
def test_cuda_graphs_are_fused_within_the_kernels_limits(exports, preset):
    folder = exports[preset]["cuda", "fp16"]
    t5 = onnx.load(str(folder / T5[preset] / "model.onnx"))
    transformer = onnx.load(str(folder / "transformer" / "model.onnx"))
    t5_ops = {n.op_type for n in t5.graph.node if n.domain == "com.microsoft"}
    assert {"Attention", "RelativePositionBias", "SkipSimplifiedLayerNormalization"} <= t5_ops
    assert "Softmax" not in {n.op_type for n in t5.graph.node}  # every T5 attention fused
    if preset == "sd3-tiny":
        assert "MultiHeadAttention" in {n.op_type for n in transformer.graph.node}
    for model in (t5, transformer):
        assert refused_nodes(model) == [] and unfused_record(model) == []


# -- the rules matter: weights scaled until an activation passes fp16's range ----------------------------


def overflow_case(tmp_path, pipe, part):
    """The fp32 graph ORT's basic level leaves (what the generic target converts), the reference, and the
    PyTorch activation that passes 65504."""
    opts = ConvertOptions(components=[part], log=lambda s: None)
    plan = plan_export(pipe, opts, True)
    set_attention(pipe, plan.attention)
    path = trace(part, pipe, 17, {}, (4, 4), 1, tmp_path / "traced" / "model.onnx")
    reference = reference_outputs(part, pipe, 1, (4, 4))
    model, _ = finish_graph(part, path, "generic", False, False)
    return graph_of(model), reference


def run_fp16(part, model, keep, reference) -> dict:
    """The graph converted to fp16 with these nodes kept, run node by node in each node's own dtype (ONNX's
    reference evaluator, as the CUDA EP runs it), against PyTorch's fp32 outputs. Not the CPU EP: it runs
    the fp16 nodes it has no kernel for in fp32 and drops the Casts between them, which hides an overflow."""
    converted = to_fp16(part, onnx.ModelProto.FromString(model.SerializeToString()), keep)
    inputs = {i.name: i.type.tensor_type.elem_type for i in converted.graph.input}
    feed = {
        name: value.astype(np.float16) if inputs[name] == FLOAT16 else value
        for name, value in reference.inputs.items()
        if name in inputs
    }
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        got = ReferenceEvaluator(converted).run(None, feed)[0].astype(np.float32)
    expected = reference.outputs[0]
    relative = float(np.linalg.norm(expected - got) / np.linalg.norm(expected))
    return {"finite": bool(np.isfinite(got).all()), "relative_l2": relative}


def timestep_rules_only(part, model) -> list[str]:
    """The rules the U-Net families have: the fp32 inputs' Sin/Cos paths, nothing for the residual stream."""
    inputs = {i.name for i in model.graph.input}
    return [n for name in spec_of(part).fp32_inputs if name in inputs for n in timestep_path(model.graph, name)]


def peak(module: torch.nn.Module, run, columns: slice = slice(None)) -> float:
    """The largest magnitude `module` outputs (in these last-axis columns) while `run()` runs."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(float(o[..., columns].detach().abs().max())))
    with torch.no_grad():
        run()
    handle.remove()
    return max(seen)


def test_t5_feed_forward_overflow_stays_finite_under_the_rules(tmp_path):
    """T5's first feed-forward output scaled past 65504 (as T5-XXL's block 10 and 23 pass it)."""
    pipe = build_pipe("flux-tiny")
    part = T5["flux-tiny"]
    wo = pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo
    ids = torch.randint(3, 3000, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wo.weight *= 4 * FP16_MAX / peak(wo, lambda: pipe.text_encoder_2(ids))
    model, reference = overflow_case(tmp_path, pipe, part)
    assert peak(wo, lambda: pipe.text_encoder_2(torch.from_numpy(reference.inputs["input_ids"]))) > FP16_MAX
    ruled = run_fp16(part, model, fp32_nodes(part, model, False), reference)
    plain = run_fp16(part, model, timestep_rules_only(part, model), reference)
    assert ruled["finite"] and ruled["relative_l2"] <= FP16_RELATIVE_L2, ruled
    assert not plain["finite"], plain


def test_flux_single_block_stream_overflow_stays_finite_under_the_rules(tmp_path):
    """Flux's single-stream residual stream past 65504: its gate x proj_out product overflows where each
    factor stays in fp16's range (the gate Mul, the residual Add, the Slice and norm_out's LayerNorm)."""
    pipe = build_pipe("flux-tiny")
    block = pipe.transformer.single_transformer_blocks[0]
    inputs = {k: torch.from_numpy(v) for k, v in reference_outputs("transformer", pipe, 1, (4, 4)).inputs.items()}

    def run():
        wrap("transformer", pipe)(*inputs.values())

    width = block.proj_out.out_features  # the modulation gives shift, scale and gate, each this wide
    gate = block.norm.linear
    with torch.no_grad():
        block.proj_out.weight *= FP16_MAX / 4 / peak(block.proj_out, run)
        block.proj_out.bias.zero_()
        factor = 64 / peak(gate, run, slice(2 * width, None))
        gate.weight[2 * width :] *= factor
        gate.bias[2 * width :] *= factor
    model, reference = overflow_case(tmp_path, pipe, "transformer")
    ruled = run_fp16("transformer", model, fp32_nodes("transformer", model, False), reference)
    plain = run_fp16("transformer", model, timestep_rules_only("transformer", model), reference)
    assert ruled["finite"] and ruled["relative_l2"] <= FP16_RELATIVE_L2, ruled
    assert not plain["finite"], plain
