"""Decode time of the VAE's decoder against the tiny decoder (TAESD's family) of one export, at one size.

    sdexport convert sd15-random -o OUT --components vae_decoder --tiny-vae taesd-random --no-check
    python scripts/bench_decoders.py OUT [--size 512] [--batch 1] [--rounds 7] [--provider cpu] [--json FILE]

OUT holds vae_decoder and vae_decoder_tiny (`sdexport convert ... --tiny-vae FOLDER|PRESET`). Both sessions are
made once, as the runtime makes them (sdruntime.session.Component), and each decodes the same seeded latents
(divided by its own scaling factor, as decoders.decode does) once to warm up, then once per round, the two
interleaved round by round so that other load on the machine falls on both alike. Seconds are medians over the
rounds (with the fastest round, the least disturbed); the ratio full / tiny is the median of the rounds' own
ratios (paired, so that load varying from round to round cancels). With random weights the pictures are noise,
which changes no operation's cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from sdruntime.decoders import FULL_DECODER, decode, scaling_factor
from sdruntime.manifest import TINY_DECODER, read_manifest
from sdruntime.session import Component, SessionSettings, resolve_providers


def cpu_model() -> str:
    """The CPU's model name, as lscpu gives it (platform's answer where lscpu is missing)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def run(folder: Path, size: int, batch: int, rounds: int, provider: str, threads: int) -> dict:
    """Seconds per decode of each decoder (medians over `rounds`), with the settings that produced them."""
    manifest = read_manifest(folder)
    missing = [name for name in (FULL_DECODER, TINY_DECODER) if not manifest.has(name)]
    if missing:
        raise SystemExit(f"{folder} has no {missing[0]}: export it with `sdexport convert ... --tiny-vae FOLDER`")
    providers = resolve_providers(provider, manifest.target)
    settings = SessionSettings(intra_op_threads=threads)
    decoders = {name: Component(manifest, name, providers, settings) for name in (FULL_DECODER, TINY_DECODER)}
    facts = manifest.pipeline
    side = size // int(facts.vae_scale_factor)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, int(facts.latent_channels), side, side)).astype(np.float32)
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, component in decoders.items():
            started = time.perf_counter()
            decode(component, latents, scaling_factor(name, facts))
            if round_:
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratios = [full / tiny for full, tiny in zip(seconds[FULL_DECODER], seconds[TINY_DECODER])]
    return {
        "export": str(folder),
        "size": size,
        "batch": batch,
        "rounds": rounds,
        "provider": decoders[FULL_DECODER].provider,
        "threads": threads or None,
        "dtype": manifest.dtype,
        "cpu": cpu_model(),
        "seconds": seconds,
        "median_seconds": medians,
        "fastest_seconds": {name: min(values) for name, values in seconds.items()},
        "full_over_tiny": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="images per decode")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    result = run(args.export, args.size, args.batch, args.rounds, args.provider, args.threads)
    print(f"{result['cpu']}, {result['provider']}, {result['dtype']}, {args.size}x{args.size}, batch {args.batch}")
    for name, median in result["median_seconds"].items():
        spread = f"{min(result['seconds'][name]):.3f}-{max(result['seconds'][name]):.3f}"
        print(f"{name:<18} {median:8.3f} s  (median of {args.rounds}; {spread})")
    print(f"full / tiny        {result['full_over_tiny']:8.1f}x  (median of the rounds' ratios)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
