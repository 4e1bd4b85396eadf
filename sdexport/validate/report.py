"""The typed report: what each check found, as `Problem`s, and the JSON it writes (`to_json`).

The JSON is a contract: docs/validate-report.md describes it and `validate_report.schema.json` (beside this
package) checks it. Verdicts, failures and blame are computed from the typed fields, never from the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import SdexportError, ValidationFailed
from .metrics import Limits, Metrics

REPORT_VERSION = 1
SCHEMA_PATH = Path(__file__).parent.with_name("validate_report.schema.json")

# files: missing or changed since export; load: a session or the runtime cannot load it; run: ONNX Runtime
# raised on a case; tolerance: an error or PSNR out of its limit; non_finite: NaN/Inf in our output;
# reference: NaN/Inf in PyTorch's own output; shape: an output's shape differs from PyTorch's
ProblemKind = Literal["files", "load", "run", "tolerance", "non_finite", "reference", "shape"]
ROWLESS_KINDS = ("files", "load", "run")  # what no row of the table shows


@dataclass(frozen=True)
class Problem:
    """Why one part (a component or an end-to-end case) fails, on one case where `case` says so."""

    part: str
    kind: ProblemKind
    message: str
    case: str | None = None

    def line(self) -> str:
        """As the part's `problems` list it: `<case>: <why>`, or `<why>`."""
        return f"{self.case}: {self.message}" if self.case else self.message

    def __str__(self) -> str:
        return f"{self.part}: {self.line()}"


@dataclass(frozen=True)
class CaseResult:
    """One component case: its inputs' shapes, each output's error and the worst of them."""

    label: str
    batch: int
    height: int | None
    width: int | None
    timestep: float | None
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, Metrics]
    metrics: Metrics
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "timestep": self.timestep,
            "inputs": {name: list(shape) for name, shape in self.inputs.items()},
            "outputs": {name: metrics.to_json() for name, metrics in self.outputs.items()},
            **self.metrics.to_json(),
            "ok": self.ok,
            "problems": [p.message for p in self.problems],
        }


@dataclass(frozen=True)
class Blame:
    """The first fp16 node of a failing component to leave tolerance, and what to keep in fp32."""

    case: str
    node: str | None = None  # its name in the fp32 export, what `fp32_nodes` takes
    fp16_node: str | None = None  # its name in the fp16 file
    op_type: str | None = None
    tensor: str | None = None
    metrics: Metrics | None = None
    fp32_max_value: float | None = None
    out_of_fp16_range: bool = False
    suggested_fp32_nodes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "node": self.node,
            "fp16_node": self.fp16_node,
            "op_type": self.op_type,
            "tensor": self.tensor,
            "metrics": None if self.metrics is None else self.metrics.to_json(),
            "fp32_max_value": self.fp32_max_value,
            "out_of_fp16_range": self.out_of_fp16_range,
            "suggested_fp32_nodes": list(self.suggested_fp32_nodes),
        }


@dataclass(frozen=True)
class ComponentResult:
    """One component against PyTorch: every case, the worst numbers, every problem (its cases' included)."""

    dtype: str
    provider: str | None  # None: ONNX Runtime could not load it
    limits: Limits
    sha256_ok: bool
    cases: tuple[CaseResult, ...]
    metrics: Metrics
    problems: tuple[Problem, ...]
    first_bad_node: Blame | None = None
    skipped: str | None = None  # why it was not checked (a ControlNet without its PyTorch model)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "provider": self.provider,
            "limits": self.limits.to_json(),
            "sha256_ok": self.sha256_ok,
            "cases": [case.to_json() for case in self.cases],
            **self.metrics.to_json(),
            "ok": self.ok,
            "problems": [p.line() for p in self.problems],
            "first_bad_node": None if self.first_bad_node is None else self.first_bad_node.to_json(),
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class GenerationResult:
    """One end-to-end case, diffusers against the runtime: its name in the report, what it drew (text2img,
    img2img or inpaint) and the ControlNet it drew with."""

    name: str
    mode: str
    min_psnr_db: float
    psnr_db: float | None = None
    latent_max_abs: float | None = None
    finite: bool = True
    skipped: str | None = None  # why it did not run
    image: str | None = None  # the --save-images comparison
    problems: tuple[Problem, ...] = ()
    controlnet: str | None = None  # its NAME

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "controlnet": self.controlnet,
            "psnr_db": self.psnr_db,
            "latent_max_abs": self.latent_max_abs,
            "finite": self.finite,
            "min_psnr_db": self.min_psnr_db,
            "ok": self.ok,
            "skipped": self.skipped,
            "image": self.image,
            "problems": [p.message for p in self.problems],
        }


@dataclass(frozen=True)
class Settings:
    """The end-to-end runs' settings and the timesteps given to the U-Net and ControlNet cases."""

    scheduler: str
    steps: int
    seed: int
    guidance_scale: float
    strength: float
    prompt: str
    negative_prompt: str
    height: int
    width: int
    timesteps: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"timesteps": list(self.timesteps)}


@dataclass(frozen=True)
class ValidationReport:
    """Everything one validation found. `report[key]` reads its JSON, as callers of `validate()` always have."""

    source: str
    export: str
    dtype: str
    target: str
    provider: str
    versions: dict[str, str | None]
    export_created_by: dict[str, str | None]
    settings: Settings
    unet_parameters: int
    full_size: bool
    components: dict[str, ComponentResult]
    end_to_end: dict[str, GenerationResult]
    seconds: float
    fp32_fallback: dict[str, tuple[str, ...]] = field(default_factory=dict)  # what convert's fallback did

    @property
    def problems(self) -> list[Problem]:
        parts = [*self.components.values(), *self.end_to_end.values()]
        return [problem for part in parts for problem in part.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def failed_parts(self) -> list[str]:
        return list(dict.fromkeys(problem.part for problem in self.problems))

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "ok": self.ok,
            "source": self.source,
            "export": self.export,
            "dtype": self.dtype,
            "target": self.target,
            "provider": self.provider,
            "versions": dict(self.versions),
            "export_created_by": dict(self.export_created_by),
            "settings": self.settings.to_json(),
            "unet_parameters": self.unet_parameters,
            "full_size": self.full_size,
            "components": {name: entry.to_json() for name, entry in self.components.items()},
            "end_to_end": {name: entry.to_json() for name, entry in self.end_to_end.items()},
            "fp32_fallback": {name: list(notes) for name, notes in self.fp32_fallback.items()},
            "failures": [str(problem) for problem in self.problems],
            "seconds": self.seconds,
        }

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]


def write_report(report: ValidationReport, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise SdexportError(f"cannot write the report to {path} ({e.strerror}): choose another --json") from e
    return path


def load_report_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def check_report(report: ValidationReport, where: str = "") -> None:
    """Raise ValidationFailed (exit 1) naming each failed part and its first problem, in one line."""
    if report.ok:
        return
    first: dict[str, Problem] = {}
    for problem in report.problems:
        first.setdefault(problem.part, problem)
    detail = "; ".join(f"{part} ({problem.line()})" for part, problem in first.items())
    raise ValidationFailed(f"validation failed: {detail}{where}")
