"""GPU check: correctness against the CPU reference and SD 1.5 512x512 50-step timings on CUDA / TensorRT.

    bash scripts/gpu_check.sh [CACHE_DIR]          (needs onnxruntime-gpu; TensorRT EP optional)

Uses the `sd15-random` preset (SD 1.5's architecture, random weights: no model hub), so the
pictures are noise; speed does not depend on the weights. Exports are cached in CACHE_DIR.
Prints one table: correctness (CUDA fp16 U-Net vs the fp32 graph on the CPU EP, relative L2),
then seconds per image and per U-Net step for CUDA EP without and with a CUDA graph, and TensorRT EP fp16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SIZE, STEPS = 512, 50
PROMPT = "a red panda"


def export_once(cache: Path, name: str, **options) -> Path:
    import sdexport

    out = cache / name
    if not (out / "sdexport.json").is_file():
        started = time.perf_counter()
        sdexport.convert("sd15-random", out, check=False, log=lambda s: None, **options)
        print(f"exported {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def unet_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((2, 4, SIZE // 8, SIZE // 8), dtype=np.float32),
        "timestep": np.full(2, 501.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
    }


def unet_output(folder: Path, provider: str) -> np.ndarray:
    from sdruntime.manifest import read_manifest
    from sdruntime.session import Component, SessionSettings, resolve_providers

    manifest = read_manifest(folder)
    unet = Component(manifest, "unet", resolve_providers(provider, manifest.target), SessionSettings(cuda_graph=False))
    return unet(**unet_inputs())["out_sample"]


def time_pipeline(folder: Path, provider: str, runs: int, **settings) -> tuple[float, float]:
    from sdruntime import SessionSettings, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.load(folder, provider=provider, settings=SessionSettings(**settings))
    pipe(PROMPT, num_inference_steps=STEPS, seed=0, scheduler="euler")  # warm-up: engines, CUDA graph capture
    image_s, step_s = [], []
    for i in range(runs):
        result = pipe(PROMPT, num_inference_steps=STEPS, seed=i, scheduler="euler")
        image_s.append(result.timings["total"])
        step_s.append(result.timings["unet"] / result.timings["steps"])
    return statistics.median(image_s), statistics.median(step_s)


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", nargs="?", type=Path, default=Path("/tmp/sdexport-gpu"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        sys.exit(f"CUDAExecutionProvider is not available ({', '.join(available)}): install onnxruntime-gpu")
    static = {"static": True, "batch_size": 1, "height": SIZE, "width": SIZE}
    reference = export_once(args.cache, "generic-fp32-unet", components=["unet"])
    cuda = export_once(args.cache, "cuda-fp16-static", target="cuda", dtype="fp16", keep_fp32=["vae_decoder"], **static)
    rows = []
    expected = unet_output(reference, "cpu")
    got = unet_output(cuda, "cuda")
    rel = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    rows.append(("U-Net CUDA fp16 vs CPU fp32", f"relative L2 {rel:.2e}", "ok" if rel <= 1e-2 else "FAIL"))
    for label, settings in (("CUDA EP", {"cuda_graph": False}), ("CUDA EP + CUDA graph", {"cuda_graph": True})):
        image, step = time_pipeline(cuda, "cuda", args.runs, **settings)
        rows.append((label, f"{image:.3f} s/image", f"{step * 1000:.2f} ms/step"))
    if "TensorrtExecutionProvider" in available:
        trt = export_once(args.cache, "tensorrt-static", target="tensorrt", **static)
        image, step = time_pipeline(trt, "tensorrt", args.runs, trt_fp16=True)
        rows.append(("TensorRT EP fp16", f"{image:.3f} s/image", f"{step * 1000:.2f} ms/step"))
    else:
        rows.append(("TensorRT EP", "not installed", "-"))
    print(f"\nSD 1.5-sized U-Net, {SIZE}x{SIZE}, {STEPS} steps, euler, guidance 7.5, onnxruntime {ort.__version__}")
    for row in rows:
        print(f"{row[0]:<30} {row[1]:>22} {row[2]:>14}")


if __name__ == "__main__":
    main()
