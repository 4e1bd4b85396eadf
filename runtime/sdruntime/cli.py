"""The `sdruntime` command line: draw pictures from an exported folder without PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .manifest import ExportError
from .session import ProviderError


def _provider(value: str):
    """"cpu", "cuda", "tensorrt", or a comma-separated fallback list of ORT provider names."""
    return [p.strip() for p in value.split(",")] if "," in value else value


def _load(folder: str, provider: str, threads: int, no_verify: bool):
    from .pipeline import StableDiffusionPipeline
    from .session import SessionSettings

    pipe = StableDiffusionPipeline.load(
        folder, provider=_provider(provider), settings=SessionSettings(intra_op_threads=threads), verify=not no_verify
    )
    for name, used in pipe.component_providers.items():
        click.echo(f"{name}: {used}", err=True)
    return pipe


common = [
    click.option("--provider", default="cpu", show_default=True, help="cpu | cuda | tensorrt | comma-separated ORT providers"),
    click.option("--threads", default=0, type=int, help="Intra-op threads (0: ORT's default)."),
    click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the model files."),
    click.option("--steps", "num_inference_steps", default=25, show_default=True, type=int),
    click.option("--guidance", "guidance_scale", default=7.5, show_default=True, type=float),
    click.option("--scheduler", default=None, help="pndm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras, lms, lcm"),
    click.option("--height", type=int),
    click.option("--width", type=int),
    click.option("--negative-prompt", default=None),
]


def with_common(f):
    for option in reversed(common):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Stable Diffusion exports with ONNX Runtime and NumPy."""


@cli.command()
@click.argument("folder")
@click.argument("prompt")
@with_common
@click.option("--seed", type=int, multiple=True, help="One seed, or one per image (repeat the option).")
@click.option("-n", "--num-images", default=1, show_default=True, type=int)
@click.option("--eta", default=0.0, type=float, help="DDIM's eta.")
@click.option("--image", "init_image", default=None, help="Init image for image-to-image.")
@click.option("--strength", default=0.8, show_default=True, type=float)
@click.option("--clip-skip", type=int, default=None, help="Use the text encoder's hidden state this many layers before the last.")
@click.option("--timestep-spacing", type=click.Choice(["leading", "linspace", "trailing"]), default=None,
              help="Override the scheduler's timestep spacing (default: the export's, else the scheduler's own).")
@click.option("-o", "--output", default="image.png", show_default=True, help="PNG path; several images get -0, -1, ...")
def generate(folder, prompt, provider, threads, no_verify, seed, num_images, output, init_image, **kwargs):
    """Draw PROMPT with the export in FOLDER."""
    pipe = _load(folder, provider, threads, no_verify)
    seeds = list(seed)
    result = pipe(
        prompt, seed=seeds[0] if len(seeds) == 1 else (seeds or None), num_images=num_images,
        image=init_image, progress=True, **kwargs,
    )
    for path in result.save(output):
        click.echo(path)


@cli.command()
@click.argument("folder")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Two prompts (pairwise) or four (--grid).")
@click.option("--frames", default=5, show_default=True, type=int, help="Frames from the first prompt to the second.")
@click.option("--grid", default=0, type=int, help="Bilinear N x N grid between four corner prompts.")
@click.option("--seed", default=0, show_default=True, type=int)
@with_common
@click.option("-o", "--output", default="interpolation", show_default=True, help="Folder for the frames and the sheet.")
def interpolate(folder, prompts, frames, grid, seed, provider, threads, no_verify, output, **kwargs):
    """Interpolate between prompts: slerp of the starting noise, lerp of the text embeddings."""
    from . import interpolate as walk
    from .image import contact_sheet

    if grid and len(prompts) != 4:
        raise click.UsageError(f"--grid needs four --prompt corners, got {len(prompts)}")
    if not grid and len(prompts) != 2:
        raise click.UsageError(f"pairwise interpolation needs two --prompt, got {len(prompts)} (or use --grid with four)")
    if (grid or frames) < 2:
        raise click.UsageError("--frames and --grid need at least 2")
    pipe = _load(folder, provider, threads, no_verify)
    if grid:
        images, columns = walk.bilinear(pipe, list(prompts), grid, seed=seed, **kwargs), grid
    else:
        images, columns = walk.pairwise(pipe, prompts[0], prompts[1], frames, seed=seed, **kwargs), frames
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"frame-{i:03d}.png")
    contact_sheet(images, columns).save(out / "sheet.png")
    click.echo(out / "sheet.png")


def main(argv: list[str] | None = None, prog_name: str = "sdruntime") -> int:
    """Entry point: bad input prints one line and exits 2."""
    from .pipeline import GenerationError

    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (ExportError, ProviderError, GenerationError, ValueError) as e:
        click.echo(f"{prog_name}: error: {e}", err=True)
        return 2
    except click.exceptions.UsageError as e:
        click.echo(f"{prog_name}: error: {e.format_message()} (see --help)", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
