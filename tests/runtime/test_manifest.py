"""sdruntime/manifest.py: the dataclasses against the JSON Schema, older manifests, axis sizes, the target table."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sdruntime.manifest import (
    COMPONENT_IO,
    CONTROLNET,
    MANIFEST_NAME,
    RESIDUAL_AXES,
    ComponentEntry,
    ExportError,
    ExportSource,
    FileEntry,
    LayoutProbe,
    LoraEntry,
    Manifest,
    PipelineFacts,
    StaticShapes,
    TensorEntry,
    axis_sizes,
    controlnet_component,
    describe_io,
    facts_io,
    latent_shape,
    load_schema,
    read_manifest,
    write_manifest,
)
from sdruntime.targets import RUNTIME_TARGETS, TARGETS

FACTS = PipelineFacts(
    family="sd1",
    prediction_type="epsilon",
    vae_scaling_factor=0.18215,
    vae_scale_factor=8,
    latent_channels=4,
    default_height=512,
    default_width=512,
    tokenizer_max_length=77,
    pad_token_id=49407,
    scheduler_class="PNDMScheduler",
    upcast_attention=False,
    num_hidden_states=13,
    unet_residual_scales=(1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8),  # SD 1.5's 12 down residuals and the mid one
    unet_residual_channels=(320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280),
    unet_residual_defaults=True,
)
DIMS = {
    "max_length": 77,
    "text_hidden_size": 768,
    "latent_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 768,
    "image_channels": 3,
    "latent_parameters": 8,
}


# one entry of each kind the weight map has: plain, transposed, packed Q/K/V, NCHWc-blocked, not found
WEIGHTS = {
    "conv_in.weight": {"initializer": "unet.conv_in.weight"},
    "time_embedding.linear_1.weight": {"initializer": "onnx::MatMul_1", "steps": [["transpose", [1, 0]]]},
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight": {
        "initializer": "MatMul_QKV_0_weight",
        "steps": [["transpose", [1, 0]], ["reshape", [1280, 20, 64]]],
        "view": [1280, 20, 3, 64],
        "at": [None, None, 1, None],
    },
    "conv_out.weight": {
        "initializer": "reorder_token_3",
        "steps": [["pad", [[0, 12], [0, 0], [0, 0], [0, 0]]], ["reshape", [1, 16, 20, 16, 3, 3]]],
        "view": [1, 20, 3, 3, 16, 16],
        "at": [None, [0, 20], None, None, None, None],
    },
    "up_blocks.0.upsamplers.0.conv.weight": {"initializer": None, "why": "folded away"},
}


def a_file(path: str) -> FileEntry:
    return FileEntry(path, 10, "a" * 64)


def full_manifest() -> Manifest:
    """Every optional key filled in."""
    components = {}
    for kind in COMPONENT_IO:
        name = controlnet_component("edges") if kind == CONTROLNET else kind
        dims = {**DIMS, **{f"residual_channels_{i}": c for i, c in enumerate(FACTS.unet_residual_channels)}}
        inputs, outputs = describe_io(name, "fp16", dims, io=facts_io(FACTS, name))
        components[name] = ComponentEntry(
            path=f"{name}/model.onnx",
            files=(a_file(f"{name}/model.onnx"),),
            dtype="fp16",
            attention="sdpa",
            fp32_nodes=("/time_proj/Sin",),
            export_max_abs_diff=1e-3,
            export_relative_l2=2e-3,
            inputs=inputs,
            outputs=outputs,
            notes=("--auto-fp32-fallback kept 1 more node(s) in fp32",),
            weights=WEIGHTS if name in ("unet", "text_encoder") else None,
        )
    return Manifest(
        format_version=2,
        created_by={
            "sdexport": "0.1",
            "torch": "2.9",
            "diffusers": "0.39",
            "transformers": "4.57",
            "onnx": "1.19",
            "onnxruntime": None,
        },
        source=ExportSource("folder", "/models/sd", (LoraEntry("/loras/a.safetensors", 0.7),)),
        dtype="fp16",
        target="cpu",
        opset=17,
        pipeline=FACTS,
        size_multiple=64,
        static=StaticShapes(batch_size=1, height=512, width=512),
        components=components,
        cpu_layout_probe=LayoutProbe(
            "cpu_layout_probe/model.onnx", (a_file("cpu_layout_probe/model.onnx"), a_file("cpu_layout_probe/io.npz"))
        ),
        config_files=(a_file("tokenizer/tokenizer.json"),),
    )


def test_a_manifest_from_the_dataclasses_matches_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(full_manifest().to_json(), load_schema())
    bare = dataclasses.replace(full_manifest(), static=None, cpu_layout_probe=None, config_files=(), format_version=1)
    jsonschema.validate(bare.to_json(), load_schema())


@pytest.mark.parametrize(
    "place",
    [
        {"initializer": None},  # not found needs its reason
        {"initializer": "w", "why": "found and not found"},
        {"initializer": "w", "steps": [["flip", [0]]]},
        {"initializer": "w", "at": [-1]},
    ],
)
def test_the_schema_refuses_a_malformed_weight_place(place):
    jsonschema = pytest.importorskip("jsonschema")
    data = full_manifest().to_json()
    data["components"]["unet"]["weights"]["conv_in.weight"] = place
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema())


def test_every_schema_property_is_a_dataclass_field():
    schema = load_schema()
    defs = schema["$defs"]
    static = next(s for s in schema["properties"]["static"]["oneOf"] if s["type"] == "object")
    pairs = [
        (schema, Manifest),
        (schema["properties"]["pipeline"], PipelineFacts),
        (static, StaticShapes),
        (schema["properties"]["source"], ExportSource),
        (schema["properties"]["source"]["properties"]["loras"]["items"], LoraEntry),
        (schema["properties"]["cpu_layout_probe"], LayoutProbe),
        (defs["component"], ComponentEntry),
        (defs["tensor"], TensorEntry),
        (defs["file"], FileEntry),
    ]
    for part, cls in pairs:
        fields = {f.name for f in dataclasses.fields(cls)} - {"folder"}  # where it was read from: not written
        assert set(part["properties"]) == fields, cls.__name__
        assert set(part.get("required", ())) <= fields, cls.__name__


def test_write_then_read_gives_the_same_manifest(tmp_path):
    manifest = dataclasses.replace(full_manifest(), folder=tmp_path)
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again == manifest and again.folder == tmp_path
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest.to_json()


def test_older_manifests_without_optional_keys_still_read(tmp_path):
    data = full_manifest().to_json()
    data["format_version"] = 1
    for key in ("config_files", "cpu_layout_probe"):
        del data[key]
    for key in ("upcast_attention", "num_hidden_states"):
        del data["pipeline"][key]
    del data["source"]["loras"]
    for entry in data["components"].values():
        for key in ("export_relative_l2", "notes", "fp32_nodes", "export_max_abs_diff", "weights"):
            entry.pop(key, None)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = read_manifest(tmp_path)
    assert manifest.config_files == () and manifest.cpu_layout_probe is None
    assert manifest.pipeline.num_hidden_states is None and manifest.source.loras == ()
    unet = manifest.components["unet"]
    assert unet.notes == () and unet.fp32_nodes == () and unet.export_relative_l2 is None
    assert unet.weights is None
    written = manifest.to_json()  # keys an older export lacks stay out (or null) when written again
    assert (
        "config_files" not in written
        and "cpu_layout_probe" not in written
        and "notes" not in written["components"]["unet"]
        and "weights" not in written["components"]["unet"]
    )
    assert "num_hidden_states" not in written["pipeline"]


def test_a_manifest_without_a_required_key_is_one_line(tmp_path):
    data = full_manifest().to_json()
    del data["pipeline"]["latent_channels"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ExportError, match="sdexport convert"):
        read_manifest(tmp_path)


def test_axis_sizes_double_the_guided_batch():
    sizes = axis_sizes(FACTS, "unet", 2, 512, 768)
    assert {k: v for k, v in sizes.items() if k not in RESIDUAL_AXES} == {
        "batch": 4,
        "sequence": 77,
        "height": 64,
        "width": 96,
        "image_height": 512,
        "image_width": 768,
    }
    # a ControlNet's residuals: the latents halved by each down block, rounding up as a stride-2 conv does
    assert [sizes[f"height_{2**k}"] for k in range(1, 6)] == [32, 16, 8, 4, 2]
    assert [sizes[f"width_{2**k}"] for k in range(1, 6)] == [48, 24, 12, 6, 3]
    assert axis_sizes(FACTS, "controlnet/edges", 1, 512, 512)["batch"] == 2
    assert axis_sizes(FACTS, "text_encoder", 1, 512, 512)["batch"] == 2
    assert axis_sizes(FACTS, "vae_decoder", 3, 512, 512)["batch"] == 3
    assert axis_sizes(FACTS, "unet", 3, 512, 512, guidance=False)["batch"] == 3
    assert latent_shape(FACTS, 2, 256, 128) == (2, 4, 32, 16)


def test_the_target_table():
    """The runtime's half; the exporter's is checked in tests/exporter/test_targets.py."""
    assert TARGETS == ("generic", "cpu", "cuda", "tensorrt") == tuple(RUNTIME_TARGETS)
    assert RUNTIME_TARGETS["generic"].providers is None
    assert RUNTIME_TARGETS["cpu"].load_level == "basic"
    assert not RUNTIME_TARGETS["cpu"].cuda_graphs
    assert "CPUExecutionProvider" in RUNTIME_TARGETS["tensorrt"].providers
    assert load_schema()["properties"]["target"]["enum"] == list(TARGETS)
