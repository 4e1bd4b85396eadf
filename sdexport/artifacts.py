"""Everything an export folder holds besides its graphs: tokenizers, the scheduler's and components'
configs, model_index.json, the source's license and card, and the manifest (sdexport.json) assembled
from the plan and what was written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import onnx
import onnxruntime
import torch
import transformers
from sdruntime.manifest import (
    CPU_LAYOUT_FORMAT_VERSION,
    FORMAT_VERSION,
    ComponentEntry,
    ExportSource,
    FileEntry,
    LayoutProbe,
    LoraEntry,
    Manifest,
    describe_io,
    facts_io,
    file_entry,
)
from transformers import CLIPTokenizerFast, T5TokenizerFast

from . import __version__
from .optimize import CPU_LAYOUT_PROBE, write_cpu_layout_probe
from .plan import ExportPlan
from .scheduler_config import write_scheduler_config
from .specs import is_tiny_vae, spec_of

SOURCE_DOCS = ("LICENSE", "LICENSE.md", "LICENSE.txt", "README.md", "model_card.md")


def versions() -> dict:
    return {
        "sdexport": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_tokenizer(tokenizer, folder: Path) -> None:
    """vocab.json, merges.txt and a tokenizer.json whose padding and truncation are set."""

    tokenizer.save_pretrained(folder)
    fast = CLIPTokenizerFast.from_pretrained(folder)
    backend = fast.backend_tokenizer
    length = tokenizer.model_max_length
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=length)
    backend.enable_truncation(max_length=length)
    backend.save(str(folder / "tokenizer.json"))


def write_t5_tokenizer(tokenizer, folder: Path) -> None:
    """SD3's and Flux's T5 tokenizer as tokenizer.json (what the runtime reads), converted from
    sentencepiece when the pipeline holds the slow tokenizer."""
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)


# model_index.json's entries kept from the source pipeline, and the optimum class each family loads with
INDEX_KEYS = (
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
    "unet",
    "transformer",
    "scheduler",
    "force_zeros_for_empty_prompt",
    "requires_aesthetics_score",
)
ORT_CLASSES = {
    "StableDiffusionXLPipeline": "ORTStableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "ORTStableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "ORTStableDiffusionXLInpaintPipeline",
    "StableDiffusionInpaintPipeline": "ORTStableDiffusionInpaintPipeline",
    "StableDiffusion3Pipeline": "ORTStableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline": "ORTStableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline": "ORTStableDiffusion3InpaintPipeline",
    "FluxPipeline": "ORTFluxPipeline",
    "FluxImg2ImgPipeline": "ORTFluxPipeline",  # optimum has no Flux image-to-image or inpainting class
    "FluxInpaintPipeline": "ORTFluxPipeline",
}


def model_index(pipe) -> dict:
    """optimum's model_index.json: the source's entries, the VAE as two parts (by its class: AutoencoderTiny
    after `--vae` with a tiny VAE; a `--tiny-vae` decoder is not listed, optimum knows none), the ORT class."""
    index = {k: v for k, v in dict(pipe.config).items() if k in INDEX_KEYS}
    vae_class = "AutoencoderTiny" if is_tiny_vae(pipe.vae) else "AutoencoderKL"
    index.update(
        {
            "_class_name": ORT_CLASSES.get(type(pipe).__name__, "ORTStableDiffusionPipeline"),
            "_diffusers_version": pipe.config.get("_diffusers_version", ""),
            "vae_decoder": ["diffusers", vae_class],
            "vae_encoder": ["diffusers", vae_class],
            "feature_extractor": [None, None],
        }
    )
    if "text_encoder_2" not in index:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    return index


def write_configs(pipe, source, tmp: Path, components: Sequence[str]) -> None:
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        if type(tokenizer).__name__.startswith("T5"):
            write_t5_tokenizer(tokenizer, tmp / name)
        else:
            write_tokenizer(tokenizer, tmp / name)
    write_scheduler_config(pipe.scheduler, tmp / "scheduler")
    for component in components:
        spec = spec_of(component)
        spec.save_config(spec.module_of(pipe, component), tmp / component)
    (tmp / "model_index.json").write_text(json.dumps(model_index(pipe), indent=2) + "\n")
    if source.folder is not None:
        for name in SOURCE_DOCS:
            if (source.folder / name).is_file():
                shutil.copy2(source.folder / name, tmp / name)


@dataclass
class Written:
    """What finish_component wrote of one component: its files, the nodes kept in fp32, the
    comparison with PyTorch (None when not compared) and whether ORT laid it out in NCHWc blocks."""

    files: tuple[FileEntry, ...]
    fp32_nodes: tuple[str, ...]
    compared: dict | None
    laid_out: bool
    weights: dict[str, dict] | None = None  # the weight map (weight_map.py), for the components it covers


def component_entry(
    component: str, dtype: str, plan: ExportPlan, dims: dict[str, int], written: Written
) -> ComponentEntry:
    """The manifest's entry of one written component."""
    inputs, outputs = describe_io(component, dtype, dims, io=facts_io(plan.facts, component))
    compared = written.compared
    return ComponentEntry(
        path=f"{component}/model.onnx",
        files=written.files,
        dtype=dtype,
        # SD3's and Flux's transformers keep their joint attention processors, which call SDPA
        attention="sdpa" if component == "transformer" else plan.attention,
        fp32_nodes=written.fp32_nodes,
        export_max_abs_diff=compared["max_abs_diff"] if compared else None,
        export_relative_l2=compared["relative_l2"] if compared else None,
        inputs=inputs,
        outputs=outputs,
        weights=written.weights,
    )


def export_manifest(src, folder: Path, opts, plan: ExportPlan, components: dict[str, ComponentEntry]) -> Manifest:
    """The manifest of a convert, before its config files are hashed (write_configs comes after)."""
    return Manifest(
        format_version=FORMAT_VERSION,
        created_by=versions(),
        source=ExportSource(
            src.kind, src.name, tuple(LoraEntry.from_json(x) for x in src.loras), src.vae, src.tiny_vae
        ),
        dtype=opts.dtype,
        target=opts.target,
        opset=opts.opset,
        pipeline=plan.facts,
        size_multiple=plan.size_multiple,
        static=plan.static,
        components=components,
        folder=folder,
    )


def with_cpu_layout_probe(folder: Path, manifest: Manifest) -> Manifest:
    """The manifest with the probe that tells the runtime whether this CPU reads the graphs' NCHWc layout."""

    if manifest.cpu_layout_probe is not None:
        return manifest
    files = write_cpu_layout_probe(folder)
    probe = LayoutProbe(f"{CPU_LAYOUT_PROBE}/model.onnx", tuple(file_entry(folder, name) for name in files))
    # runtimes that skip the probe refuse the format version
    return replace(manifest, cpu_layout_probe=probe, format_version=CPU_LAYOUT_FORMAT_VERSION)
