"""The numbers validate compares and the limits it holds them to (docs/validate-report.md, Tolerances)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FP32_MAX_ABS = {"small": 1e-4, "full": 1e-3}
FP16_RELATIVE_L2 = 1e-2
MIN_PSNR = {"fp32": 45.0, "fp16": 30.0}
FULL_SIZE_UNET_PARAMETERS = 100_000_000  # a U-Net past this holds the fp32 limit "full"
PSNR_CAP = 100.0
FP16_MAX = 65504.0


def json_number(value: float) -> float | None:
    """JSON has no NaN or Inf: those become null (the `finite` flag says why)."""
    return float(value) if np.isfinite(value) else None


@dataclass(frozen=True)
class Metrics:
    """How far an output is from PyTorch's; None where the error is NaN/Inf or not computable."""

    max_abs: float | None
    mean_abs: float | None
    relative_l2: float | None
    finite: bool
    shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (PyTorch's, ours)

    def to_json(self) -> dict[str, Any]:
        out = {"max_abs": self.max_abs, "mean_abs": self.mean_abs, "relative_l2": self.relative_l2}
        out["finite"] = self.finite
        if self.shape_mismatch is not None:
            out["shape_mismatch"] = [list(shape) for shape in self.shape_mismatch]
        return out


NO_NUMBERS = Metrics(None, None, None, finite=False)  # nothing ran


def error_metrics(expected: np.ndarray, got: np.ndarray) -> Metrics:
    """max abs, mean abs and relative L2 error of `got` against `expected`, and whether `got` is finite."""
    if expected.shape != got.shape:
        return Metrics(None, None, None, finite=True, shape_mismatch=(expected.shape, got.shape))
    expected = expected.astype(np.float64)
    diff = np.abs(expected - got.astype(np.float64))
    norm = max(float(np.linalg.norm(expected)), 1e-12)
    return Metrics(
        max_abs=json_number(diff.max()),
        mean_abs=json_number(diff.mean()),
        relative_l2=json_number(np.linalg.norm(diff) / norm),
        finite=bool(np.isfinite(got).all()),
    )


def worst(metrics: Sequence[Metrics]) -> Metrics:
    """The largest of each error over several outputs or cases (None, i.e. non-finite, wins)."""

    def largest(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else max(values, default=0.0)

    return Metrics(
        max_abs=largest([m.max_abs for m in metrics]),
        mean_abs=largest([m.mean_abs for m in metrics]),
        relative_l2=largest([m.relative_l2 for m in metrics]),
        finite=all(m.finite for m in metrics),
    )


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR of two uint8 images in dB, capped at PSNR_CAP (identical images)."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else float(min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse)))


@dataclass(frozen=True)
class Limits:
    """A component's bounds; None means not bounded."""

    max_abs: float | None
    relative_l2: float | None

    def to_json(self) -> dict[str, float | None]:
        return {"max_abs": self.max_abs, "relative_l2": self.relative_l2}

    def exceeded(self, metrics: Metrics) -> list[str]:
        """Each bound `metrics` exceed, as a phrase ("max abs 2.1e-04 > 1e-04"); empty when within."""
        phrases = []
        for name, limit, value in (
            ("max abs", self.max_abs, metrics.max_abs),
            ("relative L2", self.relative_l2, metrics.relative_l2),
        ):
            if limit is not None and (value is None or value > limit):
                shown = "n/a" if value is None else f"{value:.2e}"  # None: not computable (shapes differ)
                phrases.append(f"{name} {shown} > {limit:.0e}")
        return phrases

    def describe(self) -> str:
        parts = [f"max abs <= {self.max_abs:.0e}"] if self.max_abs is not None else []
        parts += [f"rel L2 <= {self.relative_l2:.0e}"] if self.relative_l2 is not None else []
        return ", ".join(parts) or "finite"


def component_limits(dtype: str, full_size: bool, atol: float | None, rtol: float | None) -> Limits:
    """fp32: max abs; fp16: relative L2 (max abs reported). `atol`/`rtol`, when given, bound every component."""
    max_abs = FP32_MAX_ABS["full" if full_size else "small"] if dtype == "fp32" else None
    relative = FP16_RELATIVE_L2 if dtype == "fp16" else None
    return Limits(max_abs=atol if atol is not None else max_abs, relative_l2=rtol if rtol is not None else relative)


def min_psnr(any_fp16: bool, override: float | None) -> float:
    """The end-to-end bound: `override` (--min-psnr), else by the export's lowest precision."""
    return override if override is not None else MIN_PSNR["fp16" if any_fp16 else "fp32"]
