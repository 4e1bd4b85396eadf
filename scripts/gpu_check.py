"""GPU check: our CUDA/TensorRT paths against diffusers on the same GPU, in one run.

    python scripts/gpu_check.py [--out DIR] [--json FILE] [--runs 3]          (a GPU with onnxruntime-gpu)
    python scripts/gpu_check.py --device cpu --preset tiny-sd --size 64 --steps 3    (a dry run on the CPU)

Exports with `sdexport convert` (each in its own process, side by side): the preset in generic fp16
and in cuda fp16 static at SIZE x SIZE (batch 1), the `shapes` model in generic fp32 and cuda fp16,
and a tensorrt static export when the TensorRT EP is installed. The VAE decoder stays fp32 in ours
(SD 1.5's VAE overflows in fp16), so our per-image times carry an fp32 decode.

Then, on the same GPU, PNDM, guidance 7.5, batch 1, the preset's random weights (speed does not
depend on them): seconds per image and per U-Net call (batch 2) for diffusers fp16 (SDPA, eager),
ours on the CUDA EP without and with a CUDA graph, ours on the TensorRT EP; the share of each image
spent outside `session.run`; the U-Net's fp16 graphs against PyTorch fp32 (relative L2, NaN); and
the shapes model's CUDA fp16 picture against its CPU fp32 picture (PSNR). Prints one table and
writes JSON. On `--device cpu` the CUDA rows say why they were skipped and diffusers runs fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
SHAPES_PROMPT = "a red circle on a blue background, center"
GUIDANCE = 7.5
SCHEDULER = "pndm"  # the presets' own scheduler class, which diffusers' pipeline runs as is


def convert_in_subprocess(source: str, out: Path, *options: str) -> dict:
    """`sdexport convert` in its own process (exports run side by side); reuses a finished export."""
    if (out / "sdexport.json").is_file():
        return {"name": out.name, "seconds": 0.0, "cached": True}
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "sdexport.cli",
        "convert",
        source,
        "-o",
        str(out),
        "--overwrite",
        "--no-check",
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"export {out.name} failed ({' '.join(command[2:])}):\n{done.stderr[-2000:]}")
    return {"name": out.name, "seconds": round(time.perf_counter() - started, 1), "cached": False}


def export_everything(args, have_trt: bool) -> dict[str, Path]:
    static = ["--static", "--batch-size", "1", "--height", str(args.size), "--width", str(args.size)]
    jobs = {
        "generic-fp16": (
            args.preset,
            ["--dtype", "fp16", "--keep-fp32", "vae_decoder", "--components", "text_encoder,unet,vae_decoder"],
        ),
        "cuda-fp16-static": (
            args.preset,
            [
                "--target",
                "cuda",
                "--dtype",
                "fp16",
                "--keep-fp32",
                "vae_decoder",
                "--components",
                "text_encoder,unet,vae_decoder",
                *static,
            ],
        ),
        "shapes-fp32": ("shapes", ["--components", "text_encoder,unet,vae_decoder"]),
        "shapes-cuda-fp16": (
            "shapes",
            ["--target", "cuda", "--dtype", "fp16", "--components", "text_encoder,unet,vae_decoder"],
        ),
    }
    if have_trt:
        jobs["tensorrt-static"] = (
            args.preset,
            ["--target", "tensorrt", "--components", "text_encoder,unet,vae_decoder", *static],
        )
    with ThreadPoolExecutor(max_workers=args.parallel_exports) as pool:
        done = list(
            pool.map(lambda item: convert_in_subprocess(item[1][0], args.out / item[0], *item[1][1]), jobs.items())
        )
    for d in done:
        print(f"export {d['name']}: {'cached' if d['cached'] else str(d['seconds']) + ' s'}", flush=True)
    return {name: args.out / name for name in jobs}


# -- diffusers on the same device ------------------------------------------------------------------


def diffusers_pipeline(preset: str, device: str):
    import torch

    from sdexport.presets import build_from_recipe, resolve_preset

    pipe = build_from_recipe(resolve_preset(preset))
    dtype = torch.float16 if device == "cuda" else torch.float32
    return pipe.to(device, dtype), dtype


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_diffusers(pipe, device: str, size: int, steps: int, runs: int, unet_calls: int) -> dict:
    import torch

    def image(seed: int) -> float:
        generator = torch.Generator("cpu").manual_seed(seed)
        synchronize(device)
        started = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, generator=generator)
        synchronize(device)
        return time.perf_counter() - started

    pipe.set_progress_bar_config(disable=True)
    image(0)  # warm-up: kernels, cuDNN's algorithm search
    per_image = statistics.median(image(i + 1) for i in range(runs))
    latents, embeddings = unet_inputs(pipe.unet.config, size, pipe.text_encoder.config.hidden_size)
    args = [torch.from_numpy(a).to(device, pipe.unet.dtype) for a in (latents, embeddings)]
    timestep = torch.full((2,), 501.0, device=device)
    with torch.no_grad():
        pipe.unet(args[0], timestep, args[1])
        synchronize(device)
        started = time.perf_counter()
        for _ in range(unet_calls):
            pipe.unet(args[0], timestep, args[1])
        synchronize(device)
    return {"s_per_image": per_image, "ms_per_unet_call": (time.perf_counter() - started) / unet_calls * 1000}


def unet_inputs(unet_config, size: int, hidden: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A guidance batch (2) of latents and text embeddings, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    side = size // 8
    latents = rng.standard_normal((2, unet_config.in_channels, side, side), dtype=np.float32)
    return latents, rng.standard_normal((2, 77, hidden), dtype=np.float32)


def torch_fp32_unet(pipe, device: str, size: int) -> tuple[np.ndarray, tuple]:
    """PyTorch fp32's U-Net output on the check inputs (the reference for every fp16 graph)."""
    import torch

    unet = pipe.unet.to(device, torch.float32)
    latents, embeddings = unet_inputs(unet.config, size, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        out = unet(
            torch.from_numpy(latents).to(device),
            torch.full((2,), 501.0, device=device),
            torch.from_numpy(embeddings).to(device),
        ).sample
    return out.float().cpu().numpy(), (latents, embeddings)


# -- ours ------------------------------------------------------------------------------------------


def onnx_unet(folder: Path, provider: str, latents: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    from sdruntime.manifest import read_manifest
    from sdruntime.session import Component, SessionSettings, resolve_providers

    manifest = read_manifest(folder)
    unet = Component(manifest, "unet", resolve_providers(provider, manifest.target), SessionSettings(cuda_graph=False))
    return unet(sample=latents, timestep=np.full(2, 501.0, np.float32), encoder_hidden_states=embeddings)["out_sample"]


def time_ours(folder: Path, provider: str, size: int, steps: int, runs: int, **settings) -> dict:
    from sdruntime import SessionSettings, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder, provider=provider, settings=SessionSettings(**settings))
    pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=0, scheduler=SCHEDULER, height=size, width=size
    )  # warm-up: engines, CUDA graph capture
    components = [pipe.component(name) for name in ("text_encoder", "unet", "vae_decoder")]
    image_s, call_ms, outside = [], [], []
    for i in range(runs):
        before = sum(c.run_seconds for c in components)
        result = pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            seed=i + 1,
            scheduler=SCHEDULER,
            height=size,
            width=size,
        )
        inside = sum(c.run_seconds for c in components) - before
        image_s.append(result.timings["total"])
        call_ms.append(result.timings["unet"] / result.timings["steps"] * 1000)
        outside.append(1 - inside / result.timings["total"])
    return {
        "s_per_image": statistics.median(image_s),
        "ms_per_unet_call": statistics.median(call_ms),
        "outside_session_run": statistics.median(outside),
        "unet_calls": int(result.timings["steps"]),
        "providers": sorted(set(pipe.component_providers.values())),
    }


def shapes_image(folder: Path, provider: str) -> np.ndarray:
    from sdruntime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder, provider=provider)
    result = pipe(SHAPES_PROMPT, num_inference_steps=25, seed=0)
    return np.asarray(result.images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def relative_l2(expected: np.ndarray, got: np.ndarray) -> float:
    got = got.astype(np.float32)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# -- the run ---------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdexport-gpu"), help="exports (reused when present)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3, help="timed images per arm (after one warm-up)")
    parser.add_argument("--unet-calls", type=int, default=20, help="timed U-Net calls for diffusers' per-call time")
    parser.add_argument("--parallel-exports", type=int, default=4)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    available = ort.get_available_providers()
    on_gpu = args.device == "cuda"
    if on_gpu and "CUDAExecutionProvider" not in available:
        raise SystemExit(f"CUDAExecutionProvider is not available ({', '.join(available)}): install onnxruntime-gpu")
    have_trt = on_gpu and "TensorrtExecutionProvider" in available
    args.out.mkdir(parents=True, exist_ok=True)
    folders = export_everything(args, have_trt)
    export_s = time.perf_counter() - started
    results: dict = {
        "device": device_name(args.device),
        "onnxruntime": ort.__version__,
        "providers": available,
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "scheduler": SCHEDULER,
        "guidance": GUIDANCE,
        "runs": args.runs,
        "export_s": round(export_s, 1),
        "arms": {},
        "accuracy": {},
    }
    import torch

    results["torch"] = torch.__version__
    pipe, _ = diffusers_pipeline(args.preset, args.device)
    arm = time_diffusers(pipe, args.device, args.size, args.steps, args.runs, args.unet_calls)
    results["arms"]["diffusers " + ("fp16" if on_gpu else "fp32") + " (SDPA, eager)"] = arm
    expected, (latents, embeddings) = torch_fp32_unet(pipe, args.device, args.size)
    del pipe
    if on_gpu:
        torch.cuda.empty_cache()
    provider = "cuda" if on_gpu else "cpu"
    for name in ("generic-fp16", "cuda-fp16-static"):
        if name == "cuda-fp16-static" and not on_gpu:
            results["accuracy"][f"U-Net {name} vs torch fp32"] = {"skipped": "needs the CUDA EP"}
            continue
        got = onnx_unet(folders[name], provider, latents, embeddings)
        results["accuracy"][f"U-Net {name} vs torch fp32"] = {
            "relative_l2": relative_l2(expected, got),
            "nan": bool(np.isnan(got).any()),
            "limit": 1e-2,
        }
    arms = [("ours generic fp16, " + provider.upper() + " EP", "generic-fp16", provider, {"cuda_graph": False})]
    if on_gpu:
        arms += [
            ("ours cuda fp16, CUDA EP", "cuda-fp16-static", "cuda", {"cuda_graph": False}),
            ("ours cuda fp16, CUDA EP + CUDA graph", "cuda-fp16-static", "cuda", {"cuda_graph": True}),
        ]
        if have_trt:
            arms.append(("ours TensorRT EP fp16", "tensorrt-static", "tensorrt", {"trt_fp16": True}))
    for label, name, arm_provider, settings in arms:
        results["arms"][label] = time_ours(folders[name], arm_provider, args.size, args.steps, args.runs, **settings)
    if not have_trt:
        results["arms"]["ours TensorRT EP fp16"] = {"skipped": "TensorRT EP not installed" if on_gpu else "needs a GPU"}
    if not on_gpu:
        results["arms"]["ours cuda fp16, CUDA EP (+ CUDA graph)"] = {"skipped": "needs the CUDA EP"}
    reference = shapes_image(folders["shapes-fp32"], "cpu")
    shapes = folders["shapes-cuda-fp16"] if on_gpu else folders["shapes-fp32"]
    results["accuracy"]["shapes CUDA fp16 vs CPU fp32 picture" if on_gpu else "shapes CPU fp32 twice"] = {
        "psnr_db": psnr(reference, shapes_image(shapes, provider)),
        "limit_db": 35.0,
    }
    baseline = next(iter(results["arms"].values()))
    for arm in results["arms"].values():
        if "s_per_image" in arm:
            arm["x_diffusers_image"] = arm["s_per_image"] / baseline["s_per_image"]
            arm["x_diffusers_unet_call"] = arm["ms_per_unet_call"] / baseline["ms_per_unet_call"]
    results["total_s"] = round(time.perf_counter() - started, 1)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{results['device']}, onnxruntime {results['onnxruntime']}, torch {results['torch']}: {results['preset']}, "
        f"{results['size']}x{results['size']}, {results['steps']} {results['scheduler']} steps, guidance "
        f"{results['guidance']}, batch 1, median of {results['runs']} images"
    )
    print(
        f"{'arm':<40} {'s/image':>9} {'x diffusers':>11} {'ms/U-Net call':>14} {'x diffusers':>11} {'outside run':>11}"
    )
    for label, arm in results["arms"].items():
        if "skipped" in arm:
            print(f"{label:<40} {arm['skipped']}")
            continue
        outside = f"{arm['outside_session_run'] * 100:.2f}%" if "outside_session_run" in arm else "-"
        print(
            f"{label:<40} {arm['s_per_image']:>9.3f} {arm['x_diffusers_image']:>10.2f}x "
            f"{arm['ms_per_unet_call']:>14.2f} {arm['x_diffusers_unet_call']:>10.2f}x {outside:>11}"
        )
    for label, check in results["accuracy"].items():
        if "skipped" in check:
            print(f"{label:<40} {check['skipped']}")
        elif "relative_l2" in check:
            verdict = "ok" if check["relative_l2"] <= check["limit"] and not check["nan"] else "FAIL"
            print(f"{label:<40} relative L2 {check['relative_l2']:.2e}, NaN {check['nan']}: {verdict}")
        else:
            verdict = "ok" if check["psnr_db"] >= check["limit_db"] else "FAIL"
            print(f"{label:<40} PSNR {check['psnr_db']:.1f} dB: {verdict}")
    print(f"exports {results['export_s']} s, whole check {results['total_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
