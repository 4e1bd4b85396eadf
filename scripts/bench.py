"""End-to-end benchmark: diffusers (PyTorch) vs optimum's ORT pipeline vs sdruntime, same model and settings.

    python scripts/bench.py                                   # tiny-sd and sd15-random at 256x256, 5 steps
    python scripts/bench.py --models sd15-random --rounds 3 --json bench.json
    python scripts/bench.py --models sd15-random --size 512 --steps 4 --scheduler lcm --guidance 0   # few steps

--scheduler NAME swaps every arm's scheduler for one of SCHEDULERS (our runtime's name; diffusers' class with the
same config overrides in the diffusers-based arms), and --guidance sets the guidance scale (1 or less: no
classifier-free guidance, one U-Net row per image); without them each arm runs the pipeline's own scheduler at
guidance 7.5. --save-images DIR keeps each arm's first image and reports its PSNR against diffusers', which
shows the arms draw the same picture.

Every arm runs in its own process, so cold start (process start to first image, imports
included) and peak RSS are the arm's own. The models are saved and exported once into --cache
and reused by later runs. Each round runs every arm once (a cold start and --images images);
ratios are medians over rounds of the per-round ratios of median seconds per image (paired runs).
Arms: diffusers, optimum (when optimum-onnx is installed, on our generic export) and ours on each
target whose graphs run here (generic and cpu on a CPU-only machine). Two more run in their own venvs,
found under build/ or named by --python-openvino / --python-optimum-intel, and are skipped without them:
  ours-openvino   our generic export on ONNX Runtime's OpenVINO provider (onnxruntime-openvino, which
                  replaces onnxruntime's module, so it cannot share this venv)
  optimum-intel   optimum-intel's OVStableDiffusionPipeline on its own OpenVINO export of the same saved
                  diffusers folder (fp32 weights, INFERENCE_PRECISION_HINT f32), reshaped to static shapes
                  (--optimum-intel-shapes static, the default) or left dynamic. Static was the faster once:
                  sd15-random, 256x256, 5 steps, 3 images, 47-61 s/image against 66-70 s dynamic (one
                  child run each, load average 7-11 from other jobs on 2 cores)
Set those venvs up with:
  python3.11 -m venv build/venv-openvino && build/venv-openvino/bin/pip install -c .ci/constraints.txt \
      -c .ci/constraints-openvino.txt -e "runtime[openvino]" && build/venv-openvino/bin/pip install \
      -c .ci/constraints-openvino.txt --force-reinstall --no-deps onnxruntime-openvino
  python3.11 -m venv build/venv-optimum-intel && build/venv-optimum-intel/bin/pip install torch==2.13.0 && \
      build/venv-optimum-intel/bin/pip install -c .ci/constraints.txt -c .ci/constraints-openvino.txt \
      "optimum-intel[openvino]" diffusers accelerate && build/venv-optimum-intel/bin/pip uninstall -y torchvision
  (PyPI's torchvision 0.28.0, which optimum-intel pulls in, fails against the local CPU torch 2.13.0 wheel,
  "operator torchvision::nms does not exist", and breaks transformers' imports; nothing here needs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red circle on a blue background, top left"
REPO = Path(__file__).resolve().parents[1]
# the arms that run in another venv's python: arm name -> (option holding the python, default venv under build/)
OTHER_VENVS = {
    "ours-openvino": ("python_openvino", "venv-openvino"),
    "optimum-intel": ("python_optimum_intel", "venv-optimum-intel"),
}
# --scheduler: our runtime's name -> (diffusers' class, config overrides every arm applies), so all draw one schedule
SCHEDULERS = {
    "lcm": ("LCMScheduler", {}),
    # SDXL-Turbo's own: trailing spacing puts a single step at t = 999 (SD 1.5's leading spacing, at t = 1)
    "euler-a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


# -- the arms, each run in a child process ------------------------------------------------------


def use_scheduler(pipe, args) -> None:
    """Give a diffusers-based pipeline --scheduler's scheduler, as users swap one: `Cls.from_config(config, **overrides)`."""
    if args.scheduler:
        import diffusers

        class_name, overrides = SCHEDULERS[args.scheduler]
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)


def draw_loop(pipe, unet, method: str, args) -> tuple[list[float], list[float], list[float]]:
    """A diffusers-style pipeline (diffusers, optimum, optimum-intel) drawing the bench's images, with its U-Net's
    `method` timed: --scheduler's scheduler, the guidance, size and steps, seed i for image i."""
    import torch

    use_scheduler(pipe, args)
    unet_time = timed_method(unet, method)
    return generate_loop(
        lambda i: pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator("cpu").manual_seed(i),
        ),
        unet_time,
        args,
    )


def arm_diffusers(folder: Path, args) -> tuple[list[float], list[float], list[float]]:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return draw_loop(pipe, pipe.unet, "forward", args)


def arm_optimum(export: Path, args) -> tuple[list[float], list[float], list[float]]:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(str(export))
    pipe.set_progress_bar_config(disable=True)
    return draw_loop(pipe, pipe.unet.session, "run", args)


def arm_optimum_intel(export: Path, args) -> tuple[list[float], list[float], list[float]]:
    from optimum.intel import OVStableDiffusionPipeline

    config = {"INFERENCE_PRECISION_HINT": "f32"}  # fp32 like every other arm (OpenVINO's CPU default may be bf16)
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = str(args.threads)
    pipe = OVStableDiffusionPipeline.from_pretrained(str(export), compile=False, ov_config=config)
    if args.optimum_intel_shapes == "static":
        pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
        if args.guidance <= 1:  # reshape assumes classifier-free guidance: a U-Net batch of 2, negative and positive
            unet_batch_of_one(pipe.unet.model)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return draw_loop(pipe, pipe.unet, "forward", args)


def unet_batch_of_one(model) -> None:
    """Reshape a statically shaped OpenVINO U-Net to one row per call (no guidance); timestep's shape stays."""
    shapes = {}
    for tensor in model.inputs:
        shapes[tensor] = tensor.get_partial_shape()
        if tensor.get_any_name() != "timestep":
            shapes[tensor][0] = 1
    model.reshape(shapes)


def export_optimum_intel(source: Path, out: Path) -> None:
    """optimum-intel's own OpenVINO export of a saved diffusers folder, fp32 weights (no 8-bit compression)."""
    import shutil

    from optimum.intel import OVStableDiffusionPipeline

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    OVStableDiffusionPipeline.from_pretrained(
        str(source), export=True, compile=False, load_in_8bit=False
    ).save_pretrained(partial)
    partial.rename(out)


def arm_ours(export: Path, args) -> tuple[list[float], list[float], list[float]]:
    from sdruntime import SessionSettings, StableDiffusionPipeline

    settings = SessionSettings(intra_op_threads=args.threads)
    pipe = StableDiffusionPipeline.load(export, provider=args.provider, settings=settings)
    unet = pipe.component("unet")
    before = [0.0]

    def unet_seconds() -> float:
        spent, before[0] = unet.run_seconds - before[0], unet.run_seconds
        return spent

    return generate_loop(
        lambda i: pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            scheduler_options=SCHEDULERS[args.scheduler][1] if args.scheduler else None,
            height=args.size,
            width=args.size,
            seed=i,
        ),
        unet_seconds,
        args,
        denoise_of=lambda r: r.timings["denoise"],
    )


def timed_method(obj, name: str):
    """Wrap obj.name to accumulate its wall time; returns a function giving the time since last asked."""
    original, total, taken = getattr(obj, name), [0.0], [0.0]

    def wrapper(*a, **k):
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            total[0] += time.perf_counter() - started

    setattr(obj, name, wrapper)

    def spent() -> float:
        value, taken[0] = total[0] - taken[0], total[0]
        return value

    return spent


def generate_loop(generate, unet_seconds, args, denoise_of=None):
    image_s, unet_step_s, overhead = [], [], []
    for i in range(args.images):
        started = time.perf_counter()
        result = generate(i)
        image_s.append(time.perf_counter() - started)
        unet = unet_seconds()
        unet_step_s.append(unet / args_steps_run(args))
        if denoise_of is not None:
            overhead.append((denoise_of(result) - unet) / unet)
        if i == 0:
            print(f"FIRST_IMAGE {time.time():.6f}", flush=True)
            if args.first_image:
                result.images[0].save(args.first_image)
    return image_s, unet_step_s, overhead


def args_steps_run(args) -> int:
    # PNDM (the SD 1.x default) runs one more U-Net call than steps (its PLMS warm-up repeats a step)
    return args.unet_calls or args.steps


def child(args) -> None:
    if args.arm == "export-optimum-intel":
        export_optimum_intel(Path(args.path), Path(args.out))
        return
    arms = {"diffusers": arm_diffusers, "optimum": arm_optimum, "optimum-intel": arm_optimum_intel, "ours": arm_ours}
    image_s, unet_step_s, overhead = arms[args.arm](Path(args.path), args)
    print(
        "RESULT "
        + json.dumps(
            {
                "image_s": image_s,
                "unet_step_s": unet_step_s,
                "overhead": overhead,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            }
        ),
        flush=True,
    )


# -- the parent: prepare once, then paired rounds ----------------------------------------------------


def prepare(model: str, cache: Path, targets: list[str]) -> dict[str, Path]:
    """The diffusers folder and one export per target, made once and reused."""
    import warnings

    warnings.filterwarnings("ignore")
    root = cache / model
    paths = {"diffusers": root / "diffusers"}
    if not (paths["diffusers"] / "model_index.json").is_file():
        from sdexport.presets import build_from_recipe, resolve_preset

        print(f"[{model}] saving the diffusers pipeline once", flush=True)
        build_from_recipe(resolve_preset(model)).save_pretrained(paths["diffusers"])
    import sdexport

    for target in targets:
        paths[target] = root / f"export-{target}"
        if not (paths[target] / "sdexport.json").is_file():
            print(f"[{model}] exporting for target {target} once", flush=True)
            started = time.perf_counter()
            sdexport.convert(str(paths["diffusers"]), paths[target], target=target, check=False, log=lambda s: None)
            print(f"[{model}]   {time.perf_counter() - started:.0f} s", flush=True)
    if "cuda" not in targets:  # the ours-int8 arm: `sdexport convert --quantize int8` makes graphs for the CPU EP
        paths["int8"] = root / "export-int8"
        if not (paths["int8"] / "sdexport.json").is_file():
            print(f"[{model}] exporting int8 (--quantize int8) once", flush=True)
            started = time.perf_counter()
            sdexport.convert(str(paths["diffusers"]), paths["int8"], quantize="int8", check=False, log=lambda s: None)
            print(f"[{model}]   {time.perf_counter() - started:.0f} s", flush=True)
    return paths


def other_python(arm: str, args) -> str | None:
    """The python that runs an arm needing another venv (OTHER_VENVS), or None when there is none."""
    option, venv = OTHER_VENVS[arm]
    python = getattr(args, option) or REPO / "build" / venv / "bin" / "python"
    return str(python) if Path(python).is_file() else None


def prepare_optimum_intel(paths: dict[str, Path], args) -> None:
    """optimum-intel's own export of the saved diffusers folder, made once by its venv's python."""
    python = other_python("optimum-intel", args)
    paths["optimum-intel"] = paths["diffusers"].parent / "export-optimum-intel"
    if python is None or (paths["optimum-intel"] / "model_index.json").is_file():
        return
    print(f"[{paths['diffusers'].parent.name}] exporting for optimum-intel once", flush=True)
    command = [python, __file__, "--arm", "export-optimum-intel", "--path", str(paths["diffusers"].resolve())]
    subprocess.run(
        [*command, "--out", str(paths["optimum-intel"])], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def run_arm(name: str, path: Path, args, first_image: Path | None = None) -> dict:
    """Run one arm in a child process: the arm's kind (diffusers, optimum, optimum-intel, ours) from its name;
    it saves its first image to `first_image` when given."""
    arm = name if name in ("diffusers", "optimum", "optimum-intel") else "ours"
    cmd = [
        other_python(name, args) if name in OTHER_VENVS else sys.executable,
        __file__,
        "--arm",
        arm,
        "--provider",
        "openvino" if name == "ours-openvino" else "cpu",
        "--optimum-intel-shapes",
        args.optimum_intel_shapes,
        "--path",
        str(path),
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--images",
        str(args.images),
        "--threads",
        str(args.threads),
        "--unet-calls",
        str(args.unet_calls),
        "--guidance",
        str(args.guidance),
        *(["--scheduler", args.scheduler] if args.scheduler else []),
        *(["--first-image", str(first_image)] if first_image else []),
    ]
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    first = float(next(line for line in lines if line.startswith("FIRST_IMAGE "))[12:])
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    result["cold_start_s"] = first - launched
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def steady(values: list[float]) -> list[float]:
    """Per-image values after the first image (whose warm-up the cold start already counts)."""
    return values[1:] if len(values) > 1 else values


def psnr(path: Path, reference: Path) -> float | None:
    """PSNR in dB of one 8-bit image against another, None where they are identical."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (path, reference))
    mse = float(np.mean((a - b) ** 2))
    return None if mse == 0 else 10 * float(np.log10(255**2 / mse))


def local_targets() -> list[str]:
    """The targets whose graphs run on this machine's providers."""
    import onnxruntime as ort

    return ["generic", "cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["generic", "cpu"]


def bench_model(model: str, args) -> dict:
    targets = local_targets()
    paths = prepare(model, args.cache, targets)
    arms = [("diffusers", paths["diffusers"])]
    try:
        import optimum.onnxruntime  # noqa: F401

        arms.append(("optimum", paths["generic"]))
    except ImportError:
        print("optimum-onnx is not installed: skipping its arm", flush=True)
    arms += [(f"ours-{t}", paths[t]) for t in targets]
    if "int8" in paths:
        arms.append(("ours-int8", paths["int8"]))
    prepare_optimum_intel(paths, args)
    for name, path in (("ours-openvino", paths["generic"]), ("optimum-intel", paths["optimum-intel"])):
        if other_python(name, args) is None:
            print(f"no venv for the {name} arm (see this script's docstring): skipping it", flush=True)
        else:
            arms.append((name, path))
    config = json.loads((paths["diffusers"] / "scheduler" / "scheduler_config.json").read_text())
    pndm = config["_class_name"] == "PNDMScheduler" and not args.scheduler
    args.unet_calls = args.steps + (1 if pndm else 0)
    images = {name: args.save_images / f"{model}-{name}.png" for name, _ in arms} if args.save_images else {}
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        this = {}
        for name, path in arms:
            print(f"[{model}] round {r + 1}/{args.rounds}: {name}", flush=True)
            this[name] = run_arm(name, path, args, images.get(name))
        rounds.append(this)
    summary = {}
    for name, _ in arms:
        runs = [rd[name] for rd in rounds]
        summary[name] = {
            "image_s": median([median(steady(x["image_s"])) for x in runs]),
            "unet_step_s": median([median(steady(x["unet_step_s"])) for x in runs]),
            "overhead_pct": 100 * median([median(steady(x["overhead"])) for x in runs])
            if runs[0]["overhead"]
            else None,
            "cold_start_s": median([x["cold_start_s"] for x in runs]),
            "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
            "rounds": runs,
        }
        if images and name != "diffusers":  # the last round's first image against diffusers' (None: identical)
            summary[name]["psnr_vs_diffusers_db"] = psnr(images[name], images["diffusers"])
    ratios = {}
    for name, _ in arms:
        if not name.startswith("ours"):
            continue
        for peer in ("diffusers", "optimum", "optimum-intel"):
            if peer in summary:
                ratios[f"{name}/{peer}"] = {
                    "image": median(
                        [median(steady(rd[name]["image_s"])) / median(steady(rd[peer]["image_s"])) for rd in rounds]
                    ),
                    "cold_start": median([rd[name]["cold_start_s"] / rd[peer]["cold_start_s"] for rd in rounds]),
                }
    return {"arms": summary, "ratios": ratios}


def print_table(model: str, result: dict, args) -> None:
    scheduler = args.scheduler or "the pipeline's scheduler"
    print(
        f"\n{model}: {args.size}x{args.size}, {args.steps} steps ({args.unet_calls} U-Net calls), {scheduler}, "
        f"guidance {args.guidance:g}, {args.images} images x {args.rounds} rounds"
    )
    print(
        f"{'arm':<14} {'s/image':>8} {'s/U-Net step':>13} {'loop overhead':>14} {'cold start s':>13} {'peak RSS GB':>12}"
        + (f" {'PSNR dB':>8}" if args.save_images else "")
    )
    for name, a in result["arms"].items():
        overhead = f"{a['overhead_pct']:.2f}%" if a["overhead_pct"] is not None else "-"
        db = a.get("psnr_vs_diffusers_db", "-")  # "-": diffusers itself, the reference
        db = "same" if db is None else db if isinstance(db, str) else f"{db:.1f}"
        print(
            f"{name:<14} {a['image_s']:>8.2f} {a['unet_step_s']:>13.3f} {overhead:>14} {a['cold_start_s']:>13.1f} {a['peak_rss_gb']:>12.2f}"
            + (f" {db:>8}" if args.save_images else "")
        )
    for key, ratio in result["ratios"].items():
        print(f"{key:<28} time per image {ratio['image']:.2f}x, cold start {ratio['cold_start']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-sd,sd15-random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="images per arm process (the first includes warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: each library's default")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdexport-bench"
    )
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help="every arm's scheduler (default: the pipeline's own)"
    )
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale; 1 or less: no guidance")
    parser.add_argument(
        "--save-images", type=Path, help="folder for each arm's first image; the table adds its PSNR against diffusers'"
    )
    parser.add_argument("--prepare-only", action="store_true", help="save and export the models, time nothing")
    parser.add_argument(
        "--python-openvino", type=Path, help="python of a venv with onnxruntime-openvino and the runtime"
    )
    parser.add_argument("--python-optimum-intel", type=Path, help="python of a venv with optimum-intel and diffusers")
    parser.add_argument(
        "--optimum-intel-shapes",
        choices=("static", "dynamic"),
        default="static",
        help="optimum-intel's models reshaped to the bench's size (static) or left dynamic",
    )
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--provider", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--unet-calls", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args)
        return
    if args.prepare_only:
        for model in args.models.split(","):
            prepare_optimum_intel(prepare(model, args.cache, local_targets()), args)
        return
    started = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        # torch's OpenMP threads slow down many times over when other processes hold the cores
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes will skew the timings",
            flush=True,
        )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("arm", "path", "first_image")},
        "models": {},
    }
    for model in args.models.split(","):
        report["models"][model] = bench_model(model, args)
        print_table(model, report["models"][model], args)
    report["wall_s"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()[0]
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
