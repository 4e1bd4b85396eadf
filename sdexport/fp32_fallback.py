"""`convert --validate` and `--auto-fp32-fallback`: validate the staged export and, for fp16 components
the report blames, export them again with more of them kept in fp32.

Validate only checks and reports; this module reads its typed report and re-exports through the same
one-component export path convert uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sdruntime.manifest import TensorEntry, read_manifest, write_manifest

from .artifacts import with_cpu_layout_probe
from .component_export import checkable, export_component
from .errors import SdexportError
from .targets import EXPORT_TARGETS
from .validate import REPORT_NAME, ValidationReport, check_report, format_table, validate, write_report

FALLBACK_ROUNDS = 3  # rounds of keeping the blamed nodes before keeping the whole component in fp32
WHOLE_COMPONENT_NOTE = (
    "--auto-fp32-fallback kept the whole component in fp32: keeping nodes did not bring it within tolerance"
)


def _as_fp32(tensor: TensorEntry) -> TensorEntry:
    return replace(tensor, dtype="float32") if tensor.dtype == "float16" else tensor


def rebuild_component(component: str, pipe, folder: Path, fp32_nodes: list[str] | None, note: str) -> None:
    """Re-export one component with these nodes kept in fp32 (None: all of it) and update the manifest."""
    manifest = read_manifest(folder)
    entry, target = manifest.components[component], manifest.target
    written = export_component(
        component,
        pipe,
        folder,
        manifest.pipeline,
        manifest.static,
        int(manifest.opset),
        target,
        fp16=fp32_nodes is not None,
        extra_fp32_nodes=fp32_nodes or (),
    )
    if written.laid_out:  # an fp16 cpu export's component now in fp32 and laid out
        manifest = with_cpu_layout_probe(folder, manifest)
    check = written.compared
    others = tuple(f for f in entry.files if not f.path.startswith(f"{component}/model.onnx"))
    entry = replace(
        entry,
        files=written.files + others,
        fp32_nodes=written.fp32_nodes if fp32_nodes is not None else (),
        export_max_abs_diff=check["max_abs_diff"] if check else None,
        export_relative_l2=check["relative_l2"] if check else None,
        notes=(*entry.notes, note),
        weights=written.weights,
    )
    if fp32_nodes is None:
        entry = replace(
            entry, dtype="fp32", inputs=tuple(map(_as_fp32, entry.inputs)), outputs=tuple(map(_as_fp32, entry.outputs))
        )
    write_manifest(folder, replace(manifest, components={**manifest.components, component: entry}))


def failing_fp16(report: ValidationReport) -> list[str]:
    """The fp16 components the report finds a problem with."""
    failed = {problem.part for problem in report.problems}
    return [name for name, entry in report.components.items() if name in failed and entry.dtype == "fp16"]


def fixable(report: ValidationReport) -> dict[str, list[str]]:
    """Failing fp16 components and the fp32 nodes the report suggests for each."""
    fixes = {}
    for component in failing_fp16(report):
        blame = report.components[component].first_bad_node
        if blame is not None and blame.suggested_fp32_nodes:
            fixes[component] = list(blame.suggested_fp32_nodes)
    return fixes


def apply_fp32_fallback(
    src, folder: Path, report: ValidationReport, provider: str, log: Callable[[str], None]
) -> ValidationReport:
    """Keep the suggested nodes in fp32 and re-check, a few rounds; then keep what still fails wholly in fp32."""
    actions: dict[str, list[str]] = {}

    def rebuild(component: str, nodes: list[str] | None, note: str) -> None:
        log(f"{component}: {note}")
        rebuild_component(component, src.pipe, folder, nodes, note)
        actions.setdefault(component, []).append(note)

    for _ in range(FALLBACK_ROUNDS):
        fixes = fixable(report)
        if not fixes:
            break
        for component, nodes in fixes.items():
            kept = list(dict.fromkeys([*read_manifest(folder).components[component].fp32_nodes, *nodes]))
            rebuild(component, kept, f"--auto-fp32-fallback kept {len(nodes)} more node(s) in fp32: {', '.join(nodes)}")
        report = validate(src, folder, provider=provider, end_to_end=False, log=log)
    for component in failing_fp16(report):
        # to_fp16 still casts tensors between two kept nodes to fp16, so an out-of-range one stays inf
        rebuild(component, None, WHOLE_COMPONENT_NOTE)
    if actions:
        report = validate(src, folder, provider=provider, log=log)
    return replace(report, fp32_fallback={c: tuple(notes) for c, notes in actions.items()})


def check_convert_options(dtype: str, target: str, auto_fp32_fallback: bool) -> None:
    """`convert --validate/--auto-fp32-fallback`: refuse what cannot work before anything is exported."""
    if auto_fp32_fallback and dtype != "fp16":
        raise SdexportError("--auto-fp32-fallback applies to fp16 exports: add --dtype fp16 or drop it")
    if not checkable(target):
        raise SdexportError(
            f"--validate runs the '{target}' export on {EXPORT_TARGETS[target].check_provider}, which this onnxruntime lacks: "
            "drop --validate, or install onnxruntime-gpu"
        )


def validate_conversion(
    src, folder: Path, out: Path, target: str, auto_fp32_fallback: bool, log: Callable[[str], None]
) -> None:
    """`convert --validate`: write the report into the export; raise ValidationFailed naming where it was kept."""
    provider = EXPORT_TARGETS[target].check_provider
    report = validate(src, folder, provider=provider, log=log)
    if auto_fp32_fallback:
        report = apply_fp32_fallback(src, folder, report, provider, log)
    write_report(report, folder / REPORT_NAME)
    log(format_table(report))
    check_report(report, f"; the export is kept in {folder} with {REPORT_NAME} (not moved to {out})")
