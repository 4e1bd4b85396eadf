"""The `sdexport` command line."""

from __future__ import annotations

import json
import sys
import warnings

import click
from sdruntime.cli import generate, interpolate  # the same commands as `sdruntime`
from sdruntime.manifest import COMPONENTS, DTYPES, TARGETS, ExportError
from sdruntime.pipeline import GenerationError
from sdruntime.session import ProviderError

from .errors import SdexportError, ValidationFailed


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdexport")
def cli() -> None:
    """Convert Stable Diffusion pipelines to ONNX and run them without PyTorch."""


@cli.command()
@click.argument("source")
@click.option("-o", "--output", "out", required=True, help="Folder to write (must not exist unless --overwrite).")
@click.option("--components", default=",".join(COMPONENTS), show_default=True, help="Comma-separated components to export.")
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
def convert(source, out, components, dtype, keep_fp32, target, opset, static, batch_size, height, width, overwrite, no_check):
    """Export SOURCE (a diffusers folder, a preset or a hub id) to OUT."""
    from .conversion import convert as run_convert

    run_convert(
        source, out, components=_split(components), dtype=dtype, keep_fp32=_split(keep_fp32), target=target,
        opset=opset, static=static, batch_size=batch_size, height=height, width=width, overwrite=overwrite,
        check=not no_check, log=lambda line: click.echo(line, err=True),
    )
    click.echo(out)


@cli.command()
def presets() -> None:
    """List the offline presets."""
    from .presets import available_presets, preset_description

    for name, folder in available_presets().items():
        click.echo(f"{name:<12} {preset_description(folder)}")


@cli.command("inspect")
@click.argument("folder")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def inspect_cmd(folder, as_json):
    """Show the components, shapes, op counts and pipeline facts of an export."""
    from .inspection import format_report, inspect_export

    report = inspect_export(folder)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))



cli.add_command(generate)
cli.add_command(interpolate)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line and exit 2; failed checks exit 1."""
    warnings.filterwarnings("ignore")
    try:
        cli.main(args=argv, prog_name="sdexport", standalone_mode=False)
    except (SdexportError, ExportError, ProviderError, GenerationError, ValueError) as e:
        click.echo(f"sdexport: error: {e}", err=True)
        return 2
    except click.exceptions.UsageError as e:
        click.echo(f"sdexport: error: {e.format_message()} (see --help)", err=True)
        return 2
    except ValidationFailed as e:
        click.echo(f"sdexport: {e}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("sdexport: aborted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
