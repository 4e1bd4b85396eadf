"""Streamed T5 (streaming.py): a module past STREAM_BYTES lives on the meta device and every weight is read
from its source one at a time, for tracing, for PyTorch's reference and for the written graph. Here the
threshold is lowered to 0 so that sd3-tiny's T5 streams, and every result is checked against the same
T5 held in memory."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sdruntime.manifest import read_manifest
from transformers import T5EncoderModel

from sdexport import convert, streaming
from sdexport.errors import SdexportError
from sdexport.presets import build_from_recipe, resolve_preset


@pytest.fixture
def stream_everything(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BYTES", 0)


def _convert(source, out: Path, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(str(source), out, log=lambda line: None, **options)


def held_copy(meta_model: T5EncoderModel) -> T5EncoderModel:
    """The streamed model held in memory: every weight read from its source."""
    source = streaming.source_of(meta_model)
    model = T5EncoderModel(meta_model.config).eval()
    model.load_state_dict({name: source.tensor(name) for name in model.state_dict()})
    return model


def t5_ids(vocab: int, length: int = 23) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(3))
    ids[:, -1] = 1
    return ids


def test_seeded_weights_are_the_same_in_any_order(stream_everything):
    pipe = build_from_recipe(resolve_preset("sd3-tiny"))
    meta = pipe.text_encoder_3
    source = streaming.source_of(meta)
    assert next(meta.parameters()).device.type == "meta"
    names = list(meta.state_dict())
    first = {name: source.tensor(name) for name in names}
    assert all(torch.equal(first[name], source.tensor(name)) for name in reversed(names))
    assert torch.equal(source.tensor("encoder.embed_tokens.weight"), first["shared.weight"])  # tied
    q = first["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert abs(float(q.std()) - (meta.config.d_model * meta.config.d_kv) ** -0.5) < 0.1 * float(q.std())


def test_materialized_forward_equals_the_held_model(stream_everything):
    pipe = build_from_recipe(resolve_preset("sd3-tiny"))
    meta = pipe.text_encoder_3
    ids = t5_ids(meta.config.vocab_size)
    with torch.no_grad(), streaming.materialized(meta, streaming.source_of(meta)):
        streamed = meta(ids).last_hidden_state
    with torch.no_grad():
        expected = held_copy(meta)(ids).last_hidden_state
    assert streamed.device.type == "cpu"
    assert torch.equal(streamed, expected)
    assert all(p.device.type == "meta" for p in meta.parameters())  # the weights went back


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streamed_t5_export_matches_the_held_model(stream_everything, tmp_path, dtype):
    out = _convert("sd3-tiny", tmp_path / "out", components=["text_encoder_3"], dtype=dtype)
    manifest = read_manifest(out)
    entry = manifest.components["text_encoder_3"]
    assert entry.export_max_abs_diff is not None  # compared with the streamed PyTorch reference at export
    graph = onnx.load(str(out / entry.path), load_external_data=False)
    assert not [i.name for i in graph.graph.input if i.name != "input_ids"]  # every weight attached
    meta = build_from_recipe(resolve_preset("sd3-tiny")).text_encoder_3
    ids = t5_ids(meta.config.vocab_size)
    with torch.no_grad():
        expected = held_copy(meta)(ids).last_hidden_state.numpy()
    session = ort.InferenceSession(str(out / entry.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0].astype(np.float32)
    tolerance = 1e-4 if dtype == "fp32" else 1e-2
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative < tolerance
    assert (entry.export_relative_l2 or 0.0) < tolerance
    if dtype == "fp16":
        assert entry.fp32_nodes  # precision.py's T5 rules applied to the streamed graph too


def test_streamed_t5_from_a_folder_reads_its_safetensors(stream_everything, tmp_path):
    pipe = build_from_recipe(resolve_preset("sd3-tiny"))
    held = held_copy(pipe.text_encoder_3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        type(pipe)(**{**pipe.components, "text_encoder_3": held}).save_pretrained(tmp_path / "src")
    out = _convert(tmp_path / "src", tmp_path / "out", components=["text_encoder_3"])
    ids = t5_ids(held.config.vocab_size, 9)
    session = ort.InferenceSession(str(out / "text_encoder_3" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        expected = held(ids).last_hidden_state.numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_streamed_components_need_the_generic_target(stream_everything, tmp_path):
    with pytest.raises(SdexportError, match="text_encoder_3 is streamed .* only the generic target"):
        _convert("sd3-tiny", tmp_path / "out", target="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("component", ["text_encoder_3", "transformer"])
def test_chunked_run_equals_one_session(component, sd3_32, sd3_pipe):
    """A graph run in pieces of 16 KB of weights (several chunks) gives one session's outputs."""
    from sdexport import specs
    from sdexport.chunked_run import chunked_outputs, chunks_of
    from sdexport.compare import ort_outputs

    path = sd3_32 / component / "model.onnx"
    inputs = {k: v.numpy() for k, v in specs.example_inputs(component, sd3_pipe, 2, 8, 12, seed=2).items()}
    assert len(chunks_of(onnx.load(str(path), load_external_data=False).graph, 16 << 10)) >= 3
    whole = ort_outputs(path, inputs)
    pieces = chunked_outputs(path, inputs, "CPUExecutionProvider", max_bytes=16 << 10)
    assert [p.shape for p in pieces] == [w.shape for w in whole]
    assert max(float(np.abs(p - w).max()) for p, w in zip(pieces, whole)) < 1e-5
    assert not list(path.parent.glob(".chunk-*"))  # the chunk files are gone
