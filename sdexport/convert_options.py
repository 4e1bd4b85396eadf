"""What `sdexport convert` was asked (ConvertOptions), checked before anything is imported, loaded or
written: this module imports no torch, so a wrong option, OUT or SOURCE is one line in well under a
second (`sdexport convert` checks here first, `convert` again for callers of the Python API)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdruntime.manifest import COMPONENTS, DTYPES
from sdruntime.targets import TARGETS

from .controlnet import check_controlnet_sources
from .errors import SdexportError
from .presets import tiny_vae_presets
from .quantize import check_quantize_options
from .sources import locate_source, read_json

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # what --vae takes; --tiny-vae takes AutoencoderTiny only


@dataclass
class ConvertOptions:
    components: Sequence[str] = COMPONENTS
    dtype: str = "fp32"
    keep_fp32: Sequence[str] = ()
    target: str = "generic"
    opset: int = 17
    static: bool = False
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    overwrite: bool = False
    check: bool = True
    log: Callable[[str], None] = field(default=print)
    loras: Sequence = ()  # "FILE[:SCALE]" or (FILE, SCALE), fused in order (sdexport/lora.py)
    config: str | None = None  # single-file checkpoints: a diffusers folder with the configs
    prediction_type: str | None = None  # single-file checkpoints: epsilon | v_prediction
    allow_pickle: bool = False  # single-file checkpoints: read a .ckpt with torch.load(weights_only=True)
    validate: bool = False  # run `sdexport validate`'s checks before OUT is put in place
    auto_fp32_fallback: bool = False  # fp16: keep the nodes validation blames in fp32 (implies validate)
    vae: str | None = None  # a diffusers AutoencoderKL or AutoencoderTiny folder that replaces the pipeline's VAE
    tiny_vae: str | None = None  # a diffusers AutoencoderTiny folder or preset, exported beside as vae_decoder_tiny
    controlnets: Sequence[str] = ()  # "[NAME=]PATH": each exported as controlnet/NAME (controlnet.py)
    quantize: str | None = None  # int8 | int8-weights | int8-full (quantize.py)
    calibration_prompts: str | None = None  # int8-full: prompts, one a line (default: quantize.DEFAULT_PROMPTS)
    quantize_vae: bool = False  # quantize the VAE decoder too


def check_options(opts: ConvertOptions) -> None:
    """Refuse bad options before anything is loaded or written."""
    unknown = [c for c in opts.components if c not in COMPONENTS]
    if unknown or not opts.components:
        raise SdexportError(f"unknown component '{(unknown or [''])[0]}': choose from {', '.join(COMPONENTS)}")
    bad_keep = [c for c in opts.keep_fp32 if c not in COMPONENTS]
    if bad_keep:
        raise SdexportError(f"unknown component '{bad_keep[0]}' in --keep-fp32: choose from {', '.join(COMPONENTS)}")
    if opts.dtype not in DTYPES:
        raise SdexportError(f"unknown dtype '{opts.dtype}': choose fp32 or fp16")
    if opts.keep_fp32 and opts.dtype != "fp16":
        raise SdexportError(
            f"--keep-fp32 keeps components of an fp16 export in fp32, and this export is {opts.dtype}: "
            "add --dtype fp16 or drop --keep-fp32"
        )
    if opts.target not in TARGETS:
        raise SdexportError(f"unknown target '{opts.target}': choose from {', '.join(TARGETS)}")
    if opts.target == "tensorrt" and opts.dtype == "fp16":
        raise SdexportError(
            "--target tensorrt exports fp32 graphs: TensorRT builds fp16 engines itself (trt_fp16_enable, "
            "on by default in sdruntime); drop --dtype fp16"
        )
    if not 14 <= opts.opset <= 20:
        raise SdexportError(f"opset {opts.opset} is not supported: choose 14 to 20 (default 17)")
    if opts.static and opts.batch_size < 1:
        raise SdexportError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if not opts.static and (opts.height or opts.width):
        raise SdexportError("--height and --width fix the shapes of a static export: add --static")
    if opts.controlnets and "unet" not in opts.components:
        raise SdexportError(
            "--controlnet exports ControlNets beside the U-Net: keep unet in --components, or add them to an "
            "export with `sdexport add-controlnet OUT [NAME=]PATH`"
        )
    check_controlnet_sources(opts.controlnets)
    check_quantize_options(opts.quantize, opts.dtype, opts.target, opts.calibration_prompts, opts.quantize_vae)
    if opts.quantize and (opts.validate or opts.auto_fp32_fallback):
        raise SdexportError("--validate checks fp32 graphs at fp32 tolerances: drop it with --quantize")
    if opts.vae:
        locate_vae(opts.vae, "--vae", VAE_CLASSES)
    if opts.tiny_vae:
        locate_vae(opts.tiny_vae, "--tiny-vae", ("AutoencoderTiny",))


def locate_vae(vae: str, option: str, classes: Sequence[str]) -> tuple[Path | None, str | None]:
    """Where `option` (--vae, --tiny-vae) finds its VAE, without loading it: (the folder with its config.json,
    None) for a diffusers VAE of one of `classes` (or a pipeline folder's vae/), or (None, the preset) for a
    tiny-VAE preset (random weights, models/); one line naming what to pass otherwise."""
    kinds = " or ".join(f"diffusers {name}" for name in classes)
    presets = tiny_vae_presets() if "AutoencoderTiny" in classes else {}
    folder = Path(vae).expanduser()
    if not folder.exists() and vae in presets:
        return None, vae
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        named = f" or a preset ({', '.join(presets)})" if presets else ""
        raise SdexportError(f"{option} {vae}: no config.json there; pass a {kinds} folder{named}")
    name = read_json(folder / "config.json").get("_class_name", "AutoencoderKL")
    if name not in classes:
        raise SdexportError(f"{option} {vae} is a {name}: pass a {kinds} folder")
    return folder, None


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SdexportError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise SdexportError(f"{out} exists and is not a folder: choose another -o")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("/"))  # created when missing
    if not parent.is_dir():
        raise SdexportError(f"{parent} is not a folder: choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SdexportError(f"{parent} is not writable: choose another -o")


def check_convert(source: str, out: str | os.PathLike, opts: ConvertOptions) -> None:
    """Everything about a convert that can be refused before torch is imported: the options, OUT, SOURCE."""
    check_options(opts)
    check_output(Path(out), opts.overwrite)
    locate_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
