"""How close an export's graphs run to this CPU's fp32 peak, and what that peak allows against PyTorch.

    python scripts/cpu_roofline.py ~/.cache/sdexport-bench/sd15-random/export-cpu \\
        --torch ~/.cache/sdexport-bench/sd15-random/diffusers --bench bench.json

1. Peak: the best of a large fp32 MatMul (2048^3, weights prepacked) and a 3x3 convolution in ORT's
   NCHWc layout, on the same threads as the graphs.
2. The U-Net at batch 2 (guidance) and the VAE decoder, at --latent: their multiply-adds per op
   type, counted from the shapes in ORT's profile, the seconds each op type took and its rate.
3. With --torch, diffusers' U-Net on the same inputs.

No runtime does the floating-point work faster than the peak rate: the work of one image
(--unet-calls U-Net calls and one VAE decode) at that rate is a lower bound on seconds per image.
With --bench (a scripts/bench.py JSON of the same model and settings), that bound is set against
the diffusers arm's seconds per image: the best ratio any fp32 CPU runtime can reach on this machine.
Run it on a quiet machine: other processes slow both sides unevenly.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sdruntime.manifest import read_manifest
from sdruntime.ort_options import LEVELS
from sdruntime.session import default_level
from sdruntime.targets import CPU

MULTIPLY_ADD_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")


def session(model_or_path, threads: int, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, profile: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def best_rate(run, flops: float, repeats: int) -> float:
    run()
    return max(flops / timed(run) for _ in range(repeats)) / 1e9


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def peak_gflops(threads: int, repeats: int = 8) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n = 2048
    weight = rng.standard_normal((n, n), dtype=np.float32)
    matmul = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "peak",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(weight, "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    a = rng.standard_normal((n, n), dtype=np.float32)
    s = session(matmul, threads)
    rates = {"matmul": best_rate(lambda: s.run(None, {"a": a}), 2.0 * n**3, repeats)}
    c, hw = 256, 64
    conv = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            "peak",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])],
            [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3), dtype=np.float32), "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = rng.standard_normal((1, c, hw, hw), dtype=np.float32)
    s = session(conv, threads)
    rates["conv3x3_nchwc"] = best_rate(lambda: s.run(None, {"x": x}), 2.0 * c * c * 9 * hw * hw, repeats)
    return rates


def feeds_for(component: str, latent: int, hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if component == "vae_decoder":
        return {"latent_sample": rng.standard_normal((1, 4, latent, latent), dtype=np.float32)}
    return {
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
        "timestep": np.array([500.0, 500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),
    }


def profile(model: Path, level: str, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict:
    """Time a graph at an ORT level ("basic", "all", ...) and count its multiply-adds from ORT's profile."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(str(model), threads, LEVELS[level], profile=f"{tmp}/p")
        s.run(None, feeds)  # warm-up, not counted
        seconds = [timed(lambda: s.run(None, feeds)) for _ in range(runs)]
        events = json.loads(Path(s.end_profiling()).read_text())
    macs, op_seconds = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op, args = e["args"]["op_name"], e["args"]
        inputs = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
        outputs = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
        op_seconds[op] += e["dur"] / 1e6 / (runs + 1)
        if op in ("Conv", "FusedConv"):
            macs[op] += np.prod(outputs[0]) * np.prod(inputs[1][1:]) / (runs + 1)
        elif op in ("MatMul", "FusedMatMul", "Gemm"):
            macs[op] += np.prod(outputs[0]) * inputs[0][-1] / (runs + 1)
    return {"seconds": statistics.median(seconds), "macs": dict(macs), "op_seconds": dict(op_seconds)}


def report(name: str, result: dict, peak: float) -> float:
    flops = 2 * sum(result["macs"].values())
    bound = flops / (peak * 1e9)
    print(
        f"{name}: {result['seconds']:.3f} s ({flops / 1e9:.0f} GFLOP in Conv/MatMul/Gemm, "
        f"{flops / result['seconds'] / 1e9:.0f} GFLOP/s); at peak {bound:.3f} s"
    )
    for op, s in sorted(result["op_seconds"].items(), key=lambda kv: -kv[1])[:6]:
        rate = f", {2 * result['macs'][op] / s / 1e9:.0f} GFLOP/s" if op in result["macs"] else ""
        print(f"  {op:22s} {s:.3f} s{rate}")
    return bound


def torch_step(folder: Path, feeds: dict[str, np.ndarray], runs: int) -> float:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    inputs = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad():
        unet(*inputs)
        return statistics.median(timed(lambda: unet(*inputs)) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a folder written by `sdexport convert` (fp32)")
    parser.add_argument("--torch", type=Path, help="the diffusers folder whose U-Net to time on the same inputs")
    parser.add_argument("--bench", type=Path, help="scripts/bench.py's JSON for the same model and settings")
    parser.add_argument("--latent", type=int, default=32, help="latent side (256x256 images: 32)")
    parser.add_argument("--unet-calls", type=int, default=6, help="U-Net calls per image (PNDM, 5 steps: 6)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="0: ORT's default (all cores)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    hidden = json.loads((args.export / "unet" / "config.json").read_text())["cross_attention_dim"]
    peaks = peak_gflops(args.threads)
    peak = max(peaks.values())
    print(f"peak fp32: {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())} GFLOP/s")
    result: dict = {"peak_gflops": peaks}
    bounds = {}
    manifest = read_manifest(args.export)
    for component in ("unet", "vae_decoder"):
        # the level the runtime creates the session at (cpu exports were optimized when written)
        level = default_level(manifest.target, [CPU], component, laid_out=manifest.cpu_layout_probe is not None)
        result[component] = profile(
            manifest.model_path(component), level, feeds_for(component, args.latent, hidden), args.threads, args.runs
        )
        bounds[component] = report(component, result[component], peak)
    image_bound = args.unet_calls * bounds["unet"] + bounds["vae_decoder"]
    ours = args.unet_calls * result["unet"]["seconds"] + result["vae_decoder"]["seconds"]
    result.update(lower_bounds=bounds, image_lower_bound_s=image_bound, image_ours_s=ours)
    print(f"one image ({args.unet_calls} U-Net calls, one decode): {ours:.2f} s here, at peak {image_bound:.2f} s")
    if args.torch:
        step = torch_step(args.torch, feeds_for("unet", args.latent, hidden), args.runs)
        result["torch_unet_s"] = step
        print(
            f"PyTorch U-Net: {step:.3f} s; ours / PyTorch {result['unet']['seconds'] / step:.2f}x, "
            f"at peak / PyTorch {bounds['unet'] / step:.2f}x"
        )
    if args.bench:
        arms = next(iter(json.loads(args.bench.read_text())["models"].values()))["arms"]
        theirs = arms["diffusers"]["image_s"]
        result["diffusers_image_s"] = theirs
        print(
            f"diffusers per image ({args.bench}): {theirs:.2f} s; the lower bound is {image_bound / theirs:.2f}x of it"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
