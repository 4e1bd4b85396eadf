"""Each exported component against PyTorch: its files, then every case through both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sdruntime.manifest import Manifest, sha256_file
from sdruntime.session import NUMPY_DTYPES, SessionSettings, session_options

from ..compare import torch_outputs
from ..errors import first_line
from .cases import Case
from .metrics import NO_NUMBERS, Limits, error_metrics, worst
from .report import CaseResult, ComponentResult, Problem


def open_session(path: Path, manifest: Manifest, providers: list, component: str = "") -> ort.InferenceSession:
    options = session_options(SessionSettings(), manifest, providers, component)
    return ort.InferenceSession(str(path), options, providers=providers)


def feeds_for(manifest: Manifest, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs cast to the dtypes the manifest records (fp16 for an fp16 component's float inputs)."""
    return {k: v.astype(NUMPY_DTYPES[manifest.input_spec(component, k).dtype]) for k, v in inputs.items()}


def run_torch(component: str, pipe, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return torch_outputs(component, pipe, {k: torch.from_numpy(v) for k, v in inputs.items()})


def file_problems(manifest: Manifest, component: str) -> list[Problem]:
    """Each file of the component that is missing or no longer has its recorded sha256."""
    problems = []
    for entry in manifest.components[component].files:
        path = manifest.folder / entry.path
        if not path.is_file():
            problems.append(Problem(component, "files", f"{entry.path} is missing"))
        elif sha256_file(path) != entry.sha256:
            message = f"{entry.path} does not match its sha256 in sdexport.json (changed since export)"
            problems.append(Problem(component, "files", message))
    return problems


def check_case(
    component: str, case: Case, expected: list[np.ndarray], got: list[np.ndarray], names: list[str], limits: Limits
) -> CaseResult:
    """One case's outputs against PyTorch's, judged by `limits`."""
    outputs = {name: error_metrics(e, g) for name, e, g in zip(names, expected, got)}
    merged = worst(list(outputs.values()))
    if not merged.finite:
        found = [("non_finite", "NaN/Inf in the output")]
    else:
        found = [("tolerance", phrase) for phrase in limits.exceeded(merged)]
    if not all(np.isfinite(e).all() for e in expected):
        found.append(("reference", "PyTorch itself produced NaN/Inf"))
    found += [
        ("shape", f"{name} has shape {list(m.shape_mismatch[1])}, PyTorch {list(m.shape_mismatch[0])}")
        for name, m in outputs.items()
        if m.shape_mismatch is not None
    ]
    return CaseResult(
        label=case.label,
        batch=case.batch,
        height=case.height,
        width=case.width,
        timestep=case.timestep,
        inputs={k: v.shape for k, v in case.inputs.items()},
        outputs=outputs,
        metrics=merged,
        problems=tuple(Problem(component, kind, message, case.label) for kind, message in found),
    )


@dataclass(frozen=True)
class ComponentCheck:
    """A component's result and the cases it failed on (their inputs, to look for the node to blame)."""

    result: ComponentResult
    failing: list[Case]


def check_component(
    component: str, pipe, manifest: Manifest, cases: list[Case], limits: Limits, providers: list
) -> ComponentCheck:
    """Every case through PyTorch and ONNX Runtime; a file or load failure is this component's, not a usage error."""
    entry = manifest.components[component]
    names = [o.name for o in entry.outputs]
    files = file_problems(manifest, component)
    problems, checked, provider = list(files), [], None
    try:
        session = open_session(manifest.model_path(component), manifest, providers, component)
        provider = session.get_providers()[0]
    except Exception as e:  # a corrupted model is this component's failure
        problems.append(Problem(component, "load", f"ONNX Runtime cannot load it: {first_line(e)}"))
    else:
        for case in cases:
            try:
                got = session.run(names, feeds_for(manifest, component, case.inputs))
            except Exception as e:
                problems.append(Problem(component, "run", f"ONNX Runtime failed: {first_line(e)}", case.label))
                continue
            expected = run_torch(component, pipe, case.inputs)
            checked.append((case, check_case(component, case, expected, got, names, limits)))
    results = tuple(outcome for _, outcome in checked)
    result = ComponentResult(
        dtype=entry.dtype,
        provider=provider,
        limits=limits,
        sha256_ok=not files,
        cases=results,
        metrics=worst([c.metrics for c in results]) if results else NO_NUMBERS,
        problems=(*problems, *(p for c in results for p in c.problems)),
    )
    return ComponentCheck(result, [case for case, outcome in checked if not outcome.ok])
