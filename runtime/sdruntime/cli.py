"""The `sdruntime` command line: draw pictures from an exported folder without PyTorch."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import click

from . import __version__
from .adapters import LoraSpec
from .decoders import DECODERS, decoder_component
from .errors import UserError
from .image import IMAGE_FORMATS, contact_sheet, open_image, save_image
from .manifest import read_manifest
from .memory import parse_memory_size
from .plan import FAMILY_DEFAULTS, SD_DEFAULTS, batch_seeds
from .prompt_syntax import SYNTAXES
from .prompt_weighting import DOWNWEIGHT_MODES
from .request import GenerationRequest
from .schedulers import FLOW_SCHEDULERS, SCHEDULERS, TIMESTEP_SPACINGS
from .textual_inversion import EmbeddingSpec
from .transformer_plan import TRANSFORMER_DEFAULTS

SDXL_DEFAULTS = FAMILY_DEFAULTS["sdxl"]
SD3_DEFAULTS, FLUX_DEFAULTS = TRANSFORMER_DEFAULTS["sd3"], TRANSFORMER_DEFAULTS["flux"]


def _provider(value: str):
    """ "cpu", "cuda", "tensorrt", "openvino[:DEVICE]", or a comma-separated fallback list of ORT provider names."""
    return [p.strip() for p in value.split(",")] if "," in value else value


def _load(
    folder: str,
    provider: str,
    threads: int,
    no_verify: bool,
    verbose: bool,
    img2img: bool = False,
    max_memory: int | None = None,
):
    # lazy: ONNX Runtime takes most of a second to import, which `--help` and argument errors need not wait for
    from .pipeline import StableDiffusionPipeline
    from .session import SessionSettings

    pipe = StableDiffusionPipeline.load(
        folder,
        provider=_provider(provider),
        settings=SessionSettings(intra_op_threads=threads),
        verify=not no_verify,
        max_memory=max_memory,
    )
    if img2img:
        pipe.component("vae_encoder")  # now, so that an export without one is named before anything runs
    if verbose:
        used = ", ".join(f"{name} {ep}" for name, ep in pipe.component_providers.items())
        click.echo(f"providers: {used}", err=True)
    return pipe


max_memory_option = click.option(
    "--max-memory",
    metavar="SIZE",
    default=None,
    callback=lambda ctx, param, value: None if value is None else parse_memory_size(value),
    help="Most memory to use while drawing, e.g. 2GiB (default: what the machine has free); a batch past it is "
    "drawn in pieces, an image past it is refused.",
)


def check_output_file(output: str) -> None:
    """Refuse an image path that cannot be written before any model runs."""
    path = Path(output)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise click.UsageError(f"-o {output}: end the name with {', '.join(IMAGE_FORMATS)} (it picks the format)")
    _check_folder(output, path.parent)
    if path.is_dir():
        raise click.UsageError(f"-o {output} is a folder: name an image file in it")
    existed = path.exists()
    if existed and not os.access(path, os.W_OK):
        raise click.UsageError(f"-o {output} exists and is not writable: choose another name")
    try:  # os.access says yes to root everywhere, and /proc refuses new files: only a write tells
        with open(path, "ab" if existed else "xb"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise click.UsageError(f"-o {output} cannot be written ({e.strerror or e}): choose another path") from None


def _check_folder(output: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise click.UsageError(f"-o {output}: {folder} is not a folder")
    if not folder.is_dir():
        raise click.UsageError(f"-o {output}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.UsageError(f"-o {output}: the folder {folder} is not writable; choose another")


def check_output_folder(output: str) -> None:
    """Refuse a frames' folder that cannot be made, before any model runs and without making it: it is made
    when the frames are saved, so that a refused request leaves nothing behind."""
    folder = Path(output).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise click.UsageError(f"-o {output}: cannot create the folder ({existing} is a file); choose another")
    _check_folder(output, existing)
    try:  # as in check_output_file: only a write tells
        os.rmdir(tempfile.mkdtemp(prefix=".sdruntime-probe-", dir=existing))
    except OSError as e:
        raise click.UsageError(f"-o {output}: cannot create the folder ({e.strerror or e}); choose another") from None


def image_input(path: str | None, what: str) -> str | None:
    """An image option's path, read once here so that a missing or unreadable file is one line before any model
    loads; the runtime reads the path itself and records the file's sha256 in the parameters."""
    if path is not None:
        open_image(path, what).close()
    return path


def parse_control(text: str) -> tuple[str | None, str, float | None]:
    """`--control [NAME=]IMAGE[:SCALE]` -> (NAME or None, IMAGE, SCALE or None). NAME is what comes before the first
    '=' unless that holds a '/' (then it is all the path); SCALE only when what follows the last ':' is a number."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name or os.sep in name:
        name, rest = None, text
    path, sep, tail = rest.rpartition(":")
    scale = _finite_number(tail) if sep and path else None
    if scale is None:
        path = rest
    if not path:
        raise click.UsageError(f"--control {text}: name a control image, as [NAME=]IMAGE[:SCALE]")
    return name, path, scale


def _finite_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def control_request(
    controls: tuple[str, ...], guess_mode: bool, start: float | None, end: float | None
) -> dict[str, object]:
    """--control, --guess-mode, --control-start and --control-end as the request's ControlNet fields, each control
    image read once here (as image_input); the export's ControlNets and the values are checked by the plan."""
    if not controls:
        if guess_mode or start is not None or end is not None:
            raise click.UsageError("--guess-mode, --control-start and --control-end need --control [NAME=]IMAGE")
        return {}
    units = [parse_control(text) for text in controls]
    if len(units) > 1 and any(name is None for name, _, _ in units):
        bare = next(text for text, (name, _, _) in zip(controls, units) if name is None)
        raise click.UsageError(f"--control {bare}: with several control images, name each one's ControlNet: NAME=IMAGE")
    scales = [scale for _, _, scale in units]
    return {
        "control_image": [image_input(path, "control image") for _, path, _ in units],
        "controlnet": None if units[0][0] is None else [name for name, _, _ in units],
        "controlnet_conditioning_scale": None if all(s is None for s in scales) else scales,
        "guess_mode": guess_mode,
        "control_guidance_start": 0.0 if start is None else start,
        "control_guidance_end": 1.0 if end is None else end,
    }


def lora_specs(loras: tuple[str, ...]) -> list | None:
    """--lora FILE[:SCALE] values, each file checked here, so that a missing one is one line before any model loads
    (the runtime reads and matches the files when it applies them)."""
    return [LoraSpec.of(text) for text in loras] or None


def make_output_folder(output: str) -> Path:
    """Create the frames' folder; one line if it cannot be."""
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.UsageError(f"-o {output}: cannot create the folder ({e.strerror or e})") from None
    _check_folder(output, folder)
    return folder


common = [
    click.option(
        "--provider",
        default="cpu",
        show_default=True,
        help="cpu | cuda | tensorrt | openvino[:GPU|NPU] | comma-separated ORT providers",
    ),
    click.option("--threads", default=0, type=int, help="Intra-op threads (0: ORT's default)."),
    click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the model files."),
    click.option(
        "--steps",
        "num_inference_steps",
        type=int,
        help="Denoising steps.  "
        f"[default: {SD_DEFAULTS.steps}, SDXL {SDXL_DEFAULTS.steps}, SD3 {SD3_DEFAULTS.steps}, Flux {FLUX_DEFAULTS.steps}]",
    ),
    click.option(
        "--guidance",
        "guidance_scale",
        type=float,
        help="Classifier-free guidance scale; 1 or less turns it off. Flux dev embeds it in the transformer instead "
        "(no unconditional batch: --true-cfg guides with the negative prompt); Flux schnell ignores it.  "
        f"[default: {SD_DEFAULTS.guidance_scale}, SDXL {SDXL_DEFAULTS.guidance_scale}, "
        f"SD3 {SD3_DEFAULTS.guidance_scale}, Flux {FLUX_DEFAULTS.guidance_scale} "
        f"({FLUX_DEFAULTS.image_guidance_scale} from an init image)]",
    ),
    click.option(
        "--scheduler",
        default=None,
        help=f"{', '.join(SCHEDULERS)}; SD3 and Flux: {', '.join(FLOW_SCHEDULERS)}  [default: the export's]",
    ),
    click.option("--height", type=int),
    click.option("--width", type=int),
    click.option("--negative-prompt", default=None),
    click.option(
        "--timestep-spacing",
        type=click.Choice(TIMESTEP_SPACINGS),
        default=None,
        help="Override the scheduler's timestep spacing (default: the export's, else the scheduler's own).",
    ),
    click.option(
        "--scheduler-option",
        "scheduler_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=lambda ctx, param, value: parse_scheduler_options(value),
        help="Override a scheduler_config.json setting, e.g. clip_sample=false (repeatable; VALUE as JSON: "
        "true, false, numbers, else a string).",
    ),
    click.option("-v", "--verbose", is_flag=True, help="Print which execution provider runs each component."),
]


def parse_scheduler_options(items: tuple[str, ...]) -> dict[str, object] | None:
    """["clip_sample=false", "steps_offset=1"] -> {"clip_sample": False, "steps_offset": 1}; the scheduler
    refuses keys its diffusers class does not have."""
    options: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--scheduler-option {item!r}: write KEY=VALUE, e.g. clip_sample=false")
        try:
            value = json.loads(text)
        except ValueError:
            value = text  # a bare word: a string, as "trailing" in timestep_spacing=trailing
        if isinstance(value, (list, dict)):
            raise click.UsageError(f"--scheduler-option {item!r}: VALUE must be true, false, a number or a string")
        options[key.strip()] = value
    return options or None


def one_line_warnings(command):
    """Run a command with each distinct warning printed once, as one line on stderr (`sdexport` too)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        prog_name = click.get_current_context().find_root().info_name or "sdruntime"
        seen: set[str] = set()

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if str(message) not in seen:
                seen.add(str(message))
                click.echo(f"{prog_name}: warning: {message}", err=True)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            return command(*args, **kwargs)

    return run


def with_common(f):
    for option in reversed(common):
        f = option(f)
    return f


# SD3's and Flux's own request fields (transformer_plan.py); an export of another family refuses each in one line
transformer_options = [
    click.option("--prompt-2", default=None, help="SD3: CLIP-G's prompt; Flux: T5's.  [default: PROMPT]"),
    click.option("--prompt-3", default=None, help="SD3: T5's prompt.  [default: PROMPT]"),
    click.option(
        "--negative-prompt-2",
        default=None,
        help="SD3: CLIP-G's negative prompt; Flux: T5's.  [default: --negative-prompt]",
    ),
    click.option("--negative-prompt-3", default=None, help="SD3: T5's negative prompt.  [default: --negative-prompt]"),
    click.option(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3 and Flux: T5's tokens, up to 512.  [default: the export's, from diffusers: SD3 256, Flux 512]",
    ),
    click.option(
        "--true-cfg",
        "true_cfg_scale",
        type=float,
        default=None,
        help='Flux: true classifier-free guidance scale; above 1, with --negative-prompt (even ""), it runs a '
        "negative batch.  [default: 1, off]",
    ),
    click.option(
        "--sigma",
        "sigmas",
        type=float,
        multiple=True,
        metavar="SIGMA",
        callback=lambda ctx, param, value: list(value) or None,
        help="SD3 and Flux: a custom sigma schedule, one per step, from the first (repeat: --sigma 1 --sigma 0.5); "
        "it sets the steps.",
    ),
]


def with_transformer_options(f):
    for option in reversed(transformer_options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", message="%(prog)s %(version)s")
def cli() -> None:
    """Run Stable Diffusion exports with ONNX Runtime and NumPy."""


@cli.command()
@click.argument("folder")
@click.argument("prompt")
@with_common
@click.option("--seed", type=int, multiple=True, help="One seed, or one per image (repeat the option).")
@click.option("-n", "--num-images", default=1, show_default=True, type=int)
@click.option("--eta", default=0.0, type=float, help="DDIM's eta.")
@click.option("--image", "init_image", default=None, help="Init image for image-to-image, or the image to inpaint.")
@click.option("--mask", "mask_image", default=None, help="Inpaint --image: white is repainted, black kept.")
@click.option(
    "--strength",
    type=float,
    help=f"How far to noise the init image (0-1].  [default: {SD_DEFAULTS.strength}, SDXL {SDXL_DEFAULTS.strength}; "
    f"inpainting {SD_DEFAULTS.inpaint_strength:g}, SDXL {SDXL_DEFAULTS.inpaint_strength:g}; "
    f"SD3 and Flux {SD3_DEFAULTS.strength:g}]",
)
@click.option(
    "--clip-skip", type=int, default=None, help="Use the text encoder's hidden state this many layers before the last."
)
@click.option(
    "--prompt-syntax",
    type=click.Choice(SYNTAXES),
    default=None,
    help="Read the prompt and negative prompt as weighted prompts of any length, with compel's math: compel's "
    "syntax (a (red)1.3 cat++, .blend(), .and()) or A1111's ((red:1.3), [cat], BREAK).  [default: as diffusers, "
    "truncated at 77 tokens]",
)
@click.option(
    "--downweight",
    type=click.Choice(DOWNWEIGHT_MODES),
    default=None,
    help="With --prompt-syntax, how weights below 1 work: mask the fragment out with the text encoder's attention "
    "mask (compel's default) or remove it from the text.  [default: mask]",
)
@click.option(
    "--control",
    "controls",
    multiple=True,
    metavar="[NAME=]IMAGE[:SCALE]",
    help="Run the exported ControlNet NAME on the control IMAGE at SCALE (default: diffusers' for the mode, 1.0; "
    "image-to-image 0.8; SD inpainting 0.5); repeatable, one per ControlNet; NAME may be left out when the export "
    "has one.",
)
@click.option("--guess-mode", is_flag=True, help="The ControlNets see the prompt's half of the batch only.")
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default="full",
    show_default=True,
    help="tiny: decode with the tiny decoder (TAESD) the export carries (`sdexport convert --tiny-vae FOLDER`).",
)
@click.option(
    "--control-start", type=float, help="Fraction of the steps before which the ControlNets are off.  [default: 0]"
)
@click.option(
    "--control-end", type=float, help="Fraction of the steps after which the ControlNets are off.  [default: 1]"
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="Apply a LoRA (.safetensors, diffusers or kohya-ss format) to the U-Net and text encoders at SCALE "
    "(default 1.0), without re-exporting; repeatable.",
)
@click.option(
    "--embedding",
    "embeddings",
    multiple=True,
    metavar="[TOKEN=]FILE",
    help="Load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds, SDXL clip_l/clip_g) "
    "as diffusers' load_textual_inversion does: TOKEN in the prompt (default: the file's own) reads its vectors; "
    "repeatable.",
)
@with_transformer_options
@click.option(
    "-o",
    "--output",
    default="image.png",
    show_default=True,
    help="Image path (.png, .jpg, .jpeg or .webp); several images get -0, -1, ...",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar over the denoising steps on stderr (default: when stderr is a terminal).",
)
@max_memory_option
@one_line_warnings
def generate(
    folder,
    prompt,
    provider,
    threads,
    no_verify,
    verbose,
    seed,
    num_images,
    output,
    init_image,
    mask_image,
    max_memory,
    controls,
    guess_mode,
    control_start,
    control_end,
    loras,
    embeddings,
    progress,
    **kwargs,
):
    """Draw PROMPT with the export in FOLDER."""
    check_output_file(output)
    if kwargs["decoder"] != "full":  # refused before any model loads
        decoder_component(kwargs["decoder"], read_manifest(folder).pipeline)
    sigmas, steps = kwargs["sigmas"], kwargs["num_inference_steps"]
    if sigmas and steps is not None and steps != len(sigmas):
        raise click.UsageError(
            f"--steps {steps} with {len(sigmas)} --sigma: the sigmas set the steps, leave --steps out"
        )
    seeds = list(seed)
    if len(seeds) == 1 and num_images > 1:
        seeds = batch_seeds(num_images, seeds[0])  # so that each image's recorded seed draws it again alone
    request = GenerationRequest(
        prompt,
        seed=seeds[0] if len(seeds) == 1 else (seeds or None),
        num_images=num_images,
        image=image_input(init_image, "init image"),
        mask_image=image_input(mask_image, "mask image"),
        **control_request(controls, guess_mode, control_start, control_end),
        loras=lora_specs(loras),
        embeddings=[EmbeddingSpec.existing(text) for text in embeddings] or None,
        **kwargs,
    )
    pipe = _load(folder, provider, threads, no_verify, verbose, init_image is not None, max_memory)
    # the bar only where someone watches: piped or logged stderr gets no carriage-return lines
    result = pipe.generate(request, progress=sys.stderr.isatty() if progress is None else progress)
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
@one_line_warnings
def interpolate(folder, prompts, frames, grid, seed, provider, threads, no_verify, verbose, output, **kwargs):
    """Interpolate between prompts: slerp of the starting noise, lerp of the text embeddings."""
    from . import interpolate as walk  # lazy, as in _load: it imports ONNX Runtime

    if grid and len(prompts) != 4:
        raise click.UsageError(f"--grid needs four --prompt corners, got {len(prompts)}")
    if not grid and len(prompts) != 2:
        raise click.UsageError(
            f"pairwise interpolation needs two --prompt, got {len(prompts)} (or use --grid with four)"
        )
    if (grid or frames) < 2:
        raise click.UsageError("--frames and --grid need at least 2")
    check_output_folder(output)
    walk.check_walkable(read_manifest(folder).pipeline.family)  # before the models load
    pipe = _load(folder, provider, threads, no_verify, verbose)
    if grid:
        images, columns = walk.bilinear(pipe, list(prompts), grid, seed=seed, **kwargs), grid
    else:
        images, columns = walk.pairwise(pipe, prompts[0], prompts[1], frames, seed=seed, **kwargs), frames
    out = make_output_folder(output)
    for i, image in enumerate(images):
        save_image(image, out / f"frame-{i:03d}.png", image.info["parameters"])
    contact_sheet(images, columns).save(out / "sheet.png")
    click.echo(out / "sheet.png")


@cli.command("serve")
@click.argument("folder")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Copies of the model.")
@click.option(
    "--max-batch", default=4, show_default=True, type=click.IntRange(1), help="Most images in one denoiser batch."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option(
    "--provider",
    default="cpu",
    show_default=True,
    help="cpu | cuda | tensorrt | openvino[:GPU|NPU] | comma-separated ORT providers",
)
@click.option(
    "--threads", default=0, type=int, help="Intra-op threads per replica (0: the cores / replicas on a local Ray)."
)
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    help="A Ray cluster (ray://HOST:10001 or HOST:6379; default $RAY_ADDRESS); none starts Ray here.",
)
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Requests that may wait.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=1), help="Seconds per request.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the model files.")
@max_memory_option
@click.option(
    "--lora-dir",
    default=None,
    metavar="FOLDER",
    help="Requests may name the .safetensors LoRAs in FOLDER in their `loras` field (nothing else is readable "
    "through it); without it, the field is refused.",
)
@click.option(
    "--embedding-dir",
    default=None,
    metavar="FOLDER",
    help="Requests may name the textual-inversion embeddings (.pt, .bin, .safetensors) in FOLDER in their `embeddings` "
    "field (nothing else is readable through it); without it, the field is refused.",
)
def serve_command(
    folder,
    replicas,
    max_batch,
    port,
    host,
    provider,
    threads,
    address,
    max_queue,
    timeout,
    no_verify,
    max_memory,
    lora_dir,
    embedding_dir,
):
    """Serve FOLDER over HTTP on Ray Serve, as OpenAI's Images API: POST /v1/images/generations and /v1/images/edits,
    GET /v1/models; GET /health."""
    try:
        from . import serve  # lazy: it imports Ray, an optional extra
    except ImportError as e:
        if (e.name or "").split(".")[0] in ("ray", "fastapi", "starlette"):
            raise UserError(
                f'serving needs Ray Serve ({e.name} is missing): pip install "sdexport-runtime[serve]"'
            ) from None
        raise
    serve.serve_forever(
        folder,
        replicas=replicas,
        max_batch=max_batch,
        host=host,
        port=port,
        provider=_provider(provider),
        threads=threads,
        verify=not no_verify,
        address=address,
        max_queue=max_queue,
        timeout_s=timeout,
        max_memory=max_memory,
        lora_dir=lora_dir,
        embedding_dir=embedding_dir,
        echo=lambda line: click.echo(line, err=True),
    )


def main(argv: list[str] | None = None, prog_name: str = "sdruntime") -> int:
    """Entry point: a user's mistake prints one line and exits 2; anything else keeps its traceback."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except UserError as e:
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
