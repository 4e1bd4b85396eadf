"""The `sdexport` command line.

Each command imports its module when it runs: they pull in torch, diffusers and transformers, which
take seconds to import, and `--help`, `presets` and `inspect` need none of them.
"""

from __future__ import annotations

import json
import sys

import click
from sdruntime.cli import generate, interpolate, one_line_warnings  # the same commands as `sdruntime`
from sdruntime.errors import UserError
from sdruntime.manifest import COMPONENTS, DTYPES
from sdruntime.schedulers import SCHEDULERS
from sdruntime.targets import TARGETS

from .convert_options import ConvertOptions, check_convert
from .errors import GraphCheckFailed, ValidationFailed
from .presets import DEFAULT_PRESET
from .thirdparty import quiet_third_party


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdexport")
def cli() -> None:
    """Convert Stable Diffusion pipelines to ONNX and run them without PyTorch."""


@cli.command()
@click.argument("source", default=DEFAULT_PRESET)
@click.option("-o", "--output", "out", required=True, help="Folder to write (must not exist unless --overwrite).")
@click.option(
    "--components", default=",".join(COMPONENTS), show_default=True, help="Comma-separated components to export."
)
@click.option("--dtype", default="fp32", show_default=True, help=f"{' | '.join(DTYPES)}")
@click.option("--keep-fp32", default="", help="Components kept in fp32 in an fp16 export, e.g. vae_decoder.")
@click.option("--target", default="generic", show_default=True, help=f"{' | '.join(TARGETS)}")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--static", is_flag=True, help="Fix batch, height and width (faster on some providers).")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Images per call of a static export.")
@click.option("--height", type=int, help="Static image height in pixels.")
@click.option("--width", type=int, help="Static image width in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-check", is_flag=True, help="Skip the comparison with PyTorch after each export.")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="Fuse a LoRA (diffusers or kohya .safetensors) into the weights first; repeatable; scale 1.0 by default.",
)
@click.option(
    "--config",
    "config_dir",
    metavar="DIR",
    help="Single-file checkpoints: a diffusers folder whose configs to use (default: the shipped SD 1.5 or 2.1 ones).",
)
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    help="Single-file checkpoints: override the config's scheduler (the shipped configs say epsilon for "
    "SD 1.x and v_prediction for SD 2.x, as 2.1-768; use epsilon for 512-pixel 2.x-base models).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Single-file checkpoints: read a .ckpt pickle with torch.load(weights_only=True).",
)
@click.option(
    "--validate",
    "validate_export",
    is_flag=True,
    help="Run `sdexport validate`'s checks before OUT is put in place; on failure keep it aside and exit 1.",
)
@click.option(
    "--auto-fp32-fallback",
    is_flag=True,
    help="fp16: keep the nodes validation blames in fp32 and check again (implies --validate).",
)
@click.option(
    "--vae",
    "vae",
    metavar="FOLDER",
    help="A diffusers AutoencoderKL folder (e.g. an fp16-safe SDXL VAE) or AutoencoderTiny folder (TAESD, TAESDXL) "
    "that replaces the pipeline's VAE.",
)
@click.option(
    "--tiny-vae",
    "tiny_vae",
    metavar="FOLDER",
    help="A diffusers AutoencoderTiny folder (TAESD, TAESDXL) or tiny-VAE preset (taesd-random) exported beside "
    "the VAE as vae_decoder_tiny: `generate --decoder tiny` and per-step previews.",
)
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    metavar="[NAME=]PATH",
    help="Export a ControlNet (a diffusers ControlNetModel folder, a .safetensors in the original layout or beside its diffusers config.json, or a "
    "ControlNet preset) as controlnet/NAME; repeatable.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="One stderr line per component and phase, with times (default: when stderr is a terminal).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int8-weights", "int8-full"]),
    help="int8 text encoders and U-Net for the CPU EP: int8-weights (int8 MatMul weights, activations quantized at "
    "run time), int8-full (int8 QDQ, activations calibrated on prompts); int8 is int8-weights (docs/benchmarks.md).",
)
@click.option(
    "--calibration-prompts",
    metavar="FILE",
    help="--quantize int8-full: calibrate on these prompts, one a line (default: a fixed set of 12 varied prompts).",
)
@click.option("--quantize-vae", is_flag=True, help="--quantize: quantize the VAE decoder too.")
@one_line_warnings
def convert(
    source,
    out,
    components,
    dtype,
    keep_fp32,
    target,
    opset,
    static,
    batch_size,
    height,
    width,
    overwrite,
    no_check,
    loras,
    config_dir,
    prediction_type,
    allow_pickle,
    validate_export,
    auto_fp32_fallback,
    vae,
    tiny_vae,
    controlnets,
    progress,
    quantize,
    calibration_prompts,
    quantize_vae,
):
    """Export SOURCE (a diffusers folder, a single-file .safetensors checkpoint, a preset or a hub id;
    default: the `shapes` preset) to OUT."""
    options = dict(
        components=_split(components),
        dtype=dtype,
        keep_fp32=_split(keep_fp32),
        target=target,
        opset=opset,
        static=static,
        batch_size=batch_size,
        height=height,
        width=width,
        overwrite=overwrite,
        check=not no_check,
        log=lambda line: click.echo(line, err=True),
        loras=loras,
        config=config_dir,
        prediction_type=prediction_type,
        allow_pickle=allow_pickle,
        validate=validate_export,
        auto_fp32_fallback=auto_fp32_fallback,
        vae=vae,
        tiny_vae=tiny_vae,
        controlnets=controlnets,
        quantize=quantize,
        calibration_prompts=calibration_prompts,
        quantize_vae=quantize_vae,
    )
    check_convert(source, out, ConvertOptions(**options))  # before torch's import, which takes seconds
    with quiet_third_party():  # within one_line_warnings, which would show every warning
        from .converting import convert as run_convert
        from .progress import reporting

        with reporting(sys.stderr if (sys.stderr.isatty() if progress is None else progress) else None):
            run_convert(source, out, **options)
    click.echo(out)


@cli.command("validate")
@click.argument("source")
@click.argument("out")
@click.option(
    "--provider", default="cpu", show_default=True, help="cpu | cuda | tensorrt: where ONNX Runtime runs the export."
)
@click.option(
    "--scheduler",
    help=f"{' | '.join(SCHEDULERS)} (default: the exported one).",
)
@click.option("--steps", default=10, show_default=True, type=int, help="Denoising steps of the end-to-end runs.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--prompt", help="The end-to-end runs' prompt (default: an astronaut riding a horse on the moon).")
@click.option("--negative-prompt", help='Their negative prompt (default: "blurry, low quality").')
@click.option("--height", type=int, help="The end-to-end runs' image height (default: the export's default size).")
@click.option("--width", type=int, help="The end-to-end runs' image width.")
@click.option(
    "--atol",
    type=float,
    help="Max abs error allowed for every component (default 1e-4 fp32, 1e-3 full size; fp16: reported).",
)
@click.option("--rtol", type=float, help="Relative L2 error allowed for every component (default 1e-2 for fp16).")
@click.option("--min-psnr", type=float, help="End-to-end PSNR in dB (default 45 fp32, 30 fp16).")
@click.option("--json", "json_path", metavar="FILE", help="Write the full report (docs/validate-report.md) here.")
@click.option("--save-images", metavar="DIR", help="Write diffusers | runtime | amplified difference images here.")
@click.option("--config", "config_dir", metavar="DIR", help="Single-file SOURCE: as for convert.")
@click.option(
    "--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), help="Single-file SOURCE: as for convert."
)
@click.option("--allow-pickle", is_flag=True, help="Single-file SOURCE: as for convert.")
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    metavar="[NAME=]PATH",
    help="The PyTorch ControlNet the export's controlnet/NAME came from (as for convert); repeatable. "
    "An exported ControlNet without one is reported as not checked.",
)
@one_line_warnings
def validate_cmd(
    source,
    out,
    provider,
    scheduler,
    steps,
    seed,
    prompt,
    negative_prompt,
    height,
    width,
    atol,
    rtol,
    min_psnr,
    json_path,
    save_images,
    config_dir,
    prediction_type,
    allow_pickle,
    controlnets,
):
    """Compare the export OUT with SOURCE, per component and end to end; exit 1 when out of tolerance."""
    with quiet_third_party():  # within one_line_warnings, which would show every warning
        from .validate import check_report, format_table, validate, write_report

        report = validate(
            source,
            out,
            provider=provider,
            scheduler=scheduler,
            steps=steps,
            seed=seed,
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            atol=atol,
            rtol=rtol,
            min_psnr=min_psnr,
            save_images=save_images,
            log=lambda line: click.echo(line, err=True),
            config=config_dir,
            prediction_type=prediction_type,
            allow_pickle=allow_pickle,
            controlnets=controlnets,
        )
    click.echo(format_table(report))
    if json_path:
        write_report(report, json_path)
    check_report(report)


@cli.command("add-controlnet")
@click.argument("out")
@click.argument("controlnet", metavar="[NAME=]PATH")
@click.option("--overwrite", is_flag=True, help="Replace a ControlNet of the same name.")
@click.option("--no-check", is_flag=True, help="Skip the comparison with PyTorch after the export.")
@one_line_warnings
def add_controlnet_cmd(out, controlnet, overwrite, no_check):
    """Add a ControlNet (a diffusers ControlNetModel folder, a .safetensors in the original layout or beside its diffusers config.json, or a
    ControlNet preset) to the export OUT as controlnet/NAME, at OUT's dtype and target; no other graph is
    exported again."""
    from .controlnet import parse_controlnet

    parse_controlnet(controlnet)  # a wrong PATH is one line before torch's import
    with quiet_third_party():
        from .adding import add_controlnet

        add_controlnet(
            out, controlnet, check=not no_check, overwrite=overwrite, log=lambda line: click.echo(line, err=True)
        )
    click.echo(out)


@cli.command()
def presets() -> None:
    """List the offline presets."""
    from .presets import available_presets, preset_description

    for name, folder in available_presets().items():
        mark = " (default)" if name == DEFAULT_PRESET else ""
        click.echo(f"{name + mark:<22} {preset_description(folder)}")


@cli.command("inspect")
@click.argument("folder")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def inspect_cmd(folder, as_json):
    """Show the components, shapes, op counts and pipeline facts of an export, and for the cuda
    target the fused nodes left as standard ops because their CUDA kernel refuses them."""
    from .inspection import format_report, inspect_export

    report = inspect_export(folder)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


cli.add_command(generate)
cli.add_command(interpolate)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line and exit 2; failed checks exit 1."""
    try:
        with quiet_third_party():
            cli.main(args=argv, prog_name="sdexport", standalone_mode=False)
    except UserError as e:  # SdexportError and the runtime's ExportError, ProviderError, GenerationError
        click.echo(f"sdexport: error: {e}", err=True)
        return 2
    except click.exceptions.UsageError as e:
        click.echo(f"sdexport: error: {e.format_message()} (see --help)", err=True)
        return 2
    except ValidationFailed as e:
        click.echo(f"sdexport: {e}", err=True)
        return 1
    except GraphCheckFailed as e:
        click.echo(f"sdexport: error: {e} (an exporter bug: please report it; nothing was written)", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("sdexport: aborted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
