"""Switching LoRAs at run time against re-exporting with them: the numbers in README's "LoRA at run time".

    sdexport convert sd15-random -o /tmp/sd15 --no-check          # once: the base export (fp32, generic)
    python scripts/lora_switch.py /tmp/sd15 --reexport sd15-random  # switch A -> B -> A, then re-export with A

Two random LoRAs shaped like the export's U-Net (rank 16 by default, on every attention projection, to_q, to_k,
to_v, to_out.0, and both feed-forward layers) are written in kohya-ss format with NumPy, their shapes read from the
export's weight map and graph, no torch. The switch runs in this process on the torch-free runtime: the base
pipeline is loaded, then `pipe.adapters.get` makes (or takes from its cache) the sessions for A, for B and for A
again, each timed; the re-export runs `sdexport convert SOURCE --lora A --no-check` in a child process, timed by
wall clock, with its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sdruntime import StableDiffusionPipeline
from sdruntime.adapters import AdapterSet
from sdruntime.manifest import read_manifest
from sdruntime.onnx_proto import initializer_table

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
TARGETS += ("attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def torch_shapes(export: Path) -> dict[str, tuple[int, ...]]:
    """The PyTorch shape of each U-Net weight LoRA targets here: its initializer's dims, its transpose undone."""
    manifest = read_manifest(export)
    weights = manifest.components["unet"].weights
    table = initializer_table(manifest.model_path("unet"))
    shapes = {}
    for name, entry in weights.items():
        if not name.removesuffix(".weight").endswith(TARGETS) or entry.get("initializer") is None:
            continue
        dims = tuple(table[entry["initializer"]].dims)
        steps = entry.get("steps") or []
        if entry.get("view") or any(op != "transpose" for op, _ in steps):
            raise SystemExit(f"{name} is packed or laid out in {export}: use a generic export")
        for _, axes in reversed(steps):
            dims = tuple(dims[axes.index(i)] for i in range(len(axes)))
        shapes[name.removesuffix(".weight")] = dims
    return shapes


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The .safetensors format: an 8-byte header length, the JSON header, the tensors' bytes (F32)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def random_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out, inner) in shapes.items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((rank, inner), np.float32) / np.sqrt(inner)
        tensors[f"{key}.lora_up.weight"] = rng.standard_normal((out, rank), np.float32) * 0.01
        tensors[f"{key}.alpha"] = np.array(rank, np.float32)
    write_safetensors(path, tensors)
    return path


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def switches(export: Path, a: Path, b: Path, cache: int) -> list[tuple[str, float, int]]:
    """(what, seconds, sessions made) for loading the base and switching to A, B and A again."""
    from sdruntime.session import SessionSettings

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.load(export, settings=SessionSettings(adapter_sets=cache), verify=False)
    rows = [("load the base export", time.perf_counter() - started, 0)]
    for label, lora in (("switch to LoRA A", a), ("switch to LoRA B", b), ("switch back to LoRA A (cached)", a)):
        made = pipe.adapters.sessions_created
        started = time.perf_counter()
        pipe.adapters.get(AdapterSet.of([(lora, 1.0)]))
        rows.append((label, time.perf_counter() - started, pipe.adapters.sessions_created - made))
    return rows


def reexport(source: str, lora: Path) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of `sdexport convert SOURCE --lora LORA --no-check` into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["sdexport", "convert", source, "-o", f"{tmp}/out", "--lora", str(lora), "--no-check"]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a generic export of a U-Net family (sdexport convert ...)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache", type=int, default=2, help="adapter sets kept (SessionSettings.adapter_sets)")
    parser.add_argument("--reexport", metavar="SOURCE", help="also time `sdexport convert SOURCE --lora A`")
    parser.add_argument("--loras", type=Path, default=None, help="folder for the two LoRA files (default: a temp)")
    args = parser.parse_args()
    folder = args.loras or Path(tempfile.mkdtemp(prefix="lora-switch-"))
    folder.mkdir(parents=True, exist_ok=True)
    shapes = torch_shapes(args.export)
    a = random_lora(folder / "a.safetensors", shapes, args.rank, seed=1)
    b = random_lora(folder / "b.safetensors", shapes, args.rank, seed=2)
    print(f"{len(shapes)} U-Net layers, rank {args.rank}: {a.stat().st_size / 2**20:.0f} MiB per LoRA", file=sys.stderr)
    rows = switches(args.export, a, b, args.cache)
    print("| step | seconds | sessions made |\n|---|---|---|")
    for label, seconds, made in rows:
        print(f"| {label} | {seconds:.2f} | {made} |")
    print(f"(this process's peak RSS: {peak_rss_gib():.1f} GiB)")
    if args.reexport:
        seconds, peak = reexport(args.reexport, a)
        print(f"| re-export with LoRA A (`sdexport convert {args.reexport} --lora A --no-check`) | {seconds:.1f} | |")
        print(f"(the re-export's peak RSS: {peak:.1f} GiB)")


if __name__ == "__main__":
    main()
