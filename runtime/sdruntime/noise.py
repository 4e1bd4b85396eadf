"""Torch-compatible Gaussian noise in pure NumPy.

`TorchGenerator(seed).randn(shape)` reproduces
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)``,
and successive calls on one generator advance its state exactly as successive
``torch.randn`` calls on one torch generator do, so a pipeline that draws the
initial latents and then per-step noise gets torch's numbers. `randn_tensor`
mirrors ``diffusers.utils.torch_utils.randn_tensor`` on the CPU.

How torch does it (aten/src/ATen/native/cpu/DistributionTemplates.h,
core/DistributionsHelper.h, CPUGeneratorImpl.cpp), reproduced here:

* The CPU generator is the 32-bit Mersenne Twister seeded with init_genrand,
  i.e. NumPy's ``MT19937`` with legacy seeding.
* 16 or more elements (``normal_fill``): one float32 uniform ``(x & 0xFFFFFF) * 2**-24``
  per element; each block of 16 is Box-Muller'd as pairs (1 - u[j], u[j + 8]).
  If the count is not a multiple of 16, 16 fresh uniforms are drawn and the last
  16 outputs are recomputed from them.
* Fewer than 16 elements: ``normal_distribution<double>`` per element, each double
  uniform built from two 32-bit outputs (53 bits); every second normal is the
  sine sample cached in the generator, and that cache survives across calls.

Accuracy: torch uses vectorized float32 log/sin/cos; here the float32 roundings of
its inputs are mirrored and the transcendentals are evaluated in float64, so
results agree to about 1 float32 ulp (max abs diff ~5e-7), not bit for bit. The
< 16 element path is computed in double like torch and matches exactly.

Limits:
* Seeds must satisfy 0 <= seed < 2**32. torch silently keeps only the low 32 bits
  of larger (or negative) seeds; pass ``seed % 2**32`` to get that behaviour.
* Only float32 draws match torch. ``randn_tensor(..., dtype=other)`` casts the
  float32 draw, whereas torch would draw half/bfloat16/double tensors differently.
* Only the CPU generator is reproduced (not CUDA/MPS generators), and only randn
  (no other torch random functions share this generator's state here).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument

_TWO_PI_F32 = np.float32(2.0 * np.pi)  # torch: _mm256_set1_ps(2.0f * pi)


def _mt19937_key(seed: int) -> np.ndarray:
    """Mersenne Twister init_genrand(seed): the 624-word state torch's mt19937 starts from."""
    key = [seed]
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


class TorchGenerator:
    """Reproduces torch.Generator('cpu').manual_seed(seed) for torch.randn in float32.

    ``seed`` must be an integer with 0 <= seed < 2**32 (ValueError otherwise).
    """

    def __init__(self, seed: int):
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
        if not 0 <= seed < 2**32:
            raise InvalidArgument(
                f"seed must satisfy 0 <= seed < 2**32, got {seed}; torch keeps only the "
                f"low 32 bits of such seeds, so pass seed % 2**32 (= {seed % 2**32}) "
                "to reproduce what torch does"
            )
        self.seed: int = seed
        self._bitgen = np.random.MT19937()
        # pos=624: the first draw regenerates the whole block, as torch's mt19937 does.
        self._bitgen.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_key(seed), "pos": 624},
        }
        self._next_double_normal: float | None = None  # torch's next_double_normal_sample_

    def __repr__(self) -> str:
        return f"TorchGenerator(seed={self.seed})"

    def _raw32(self, n: int) -> np.ndarray:
        """The next n 32-bit Mersenne Twister outputs."""
        return self._bitgen.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        """torch uniform_real_distribution<float>(0, 1): 24 low bits of one output, exact in float32."""
        return (self._raw32(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)

    def _normal_double(self) -> float:
        """torch normal_distribution<double>(0, 1), including the cached second sample."""
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value
        r = self._raw32(4).astype(np.uint64)
        # random64() = (first << 32) | second; uniform_real<double> keeps the low 53 bits.
        u1, u2 = (((r[0::2] << np.uint64(32)) | r[1::2]) & np.uint64(2**53 - 1)) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._next_double_normal = float(radius * np.sin(theta))
        return float(radius * np.cos(theta))

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 array of ``shape``; advances the state like torch.randn."""
        shape = tuple(int(d) for d in shape)
        n = int(np.prod(shape, dtype=np.int64))
        if n < 16:  # torch's element-wise double path (also for n == 0: draws nothing)
            values = [self._normal_double() for _ in range(n)]
            return np.array(values, dtype=np.float64).astype(np.float32).reshape(shape)
        out = _box_muller_16(self._uniform_f32(n)[: n - n % 16])  # all n uniforms are consumed
        if n % 16:
            # torch then draws 16 fresh uniforms and recomputes the last 16 outputs from them.
            out = np.concatenate([out[: n - 16], _box_muller_16(self._uniform_f32(16))])
        return out.reshape(shape)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """torch normal_fill_16 on consecutive blocks of 16 float32 uniforms.

    Rounds to float32 where torch does; log/sin/cos run in float64 (torch: float32 SIMD).
    """
    blocks = u.reshape(-1, 16)
    u1 = np.float32(1) - blocks[:, :8]  # [0, 1) -> (0, 1] for log
    radius = np.sqrt(np.float32(-2) * np.log(u1.astype(np.float64)).astype(np.float32))
    theta = (_TWO_PI_F32 * blocks[:, 8:]).astype(np.float64)
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    return np.concatenate([radius * cos, radius * sin], axis=1).reshape(-1)


def randn_tensor(
    shape: Sequence[int],
    generator: TorchGenerator | list[TorchGenerator] | None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Mirror diffusers.utils.torch_utils.randn_tensor on the CPU.

    A TorchGenerator draws the whole ``shape``; a list of them (one per batch entry,
    len == shape[0]) draws ``(1, *shape[1:])`` from each and concatenates on axis 0;
    a one-element list is treated as its single generator, as in diffusers; None gives
    fresh nondeterministic noise. Noise is drawn in float32 and cast to ``dtype``.
    """
    shape = tuple(int(d) for d in shape)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InvalidArgument(
                f"got a list of {len(generator)} generators for batch size {shape[0]}; "
                "pass one generator per batch entry"
            )
        latents = np.concatenate([g.randn((1, *shape[1:])) for g in generator], axis=0)
    elif generator is None:
        latents = np.random.default_rng().standard_normal(shape, dtype=np.float32)
    else:
        latents = generator.randn(shape)
    return latents.astype(dtype, copy=False)


def make_generator(seed: int | Sequence[int] | None) -> TorchGenerator | list[TorchGenerator] | None:
    """int -> TorchGenerator(seed); list/tuple of ints -> list of TorchGenerators; None -> None."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        return [TorchGenerator(s) for s in seed]
    return TorchGenerator(seed)
