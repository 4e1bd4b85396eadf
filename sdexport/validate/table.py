"""The human summary of a report: one row per component case and per end-to-end run, then what failed."""

from __future__ import annotations

from .metrics import FP16_MAX, NO_NUMBERS
from .report import ROWLESS_KINDS, Blame, ValidationReport


def _fmt(value: float | None, spec: str = ".1e") -> str:
    return "nan" if value is None else format(value, spec)


def component_rows(report: ValidationReport) -> list[str]:
    lines = [f"{'component':<14} {'case':<20} {'max abs':>8} {'mean abs':>8} {'rel L2':>8}  {'limit':<26} result"]
    for component, entry in report.components.items():
        limit = entry.limits.describe()
        if not entry.cases:
            lines.append(f"{component:<14} {'-':<20} {'':>8} {'':>8} {'':>8}  {limit:<26} FAIL")
        for case in entry.cases:
            status = "ok" if case.ok else "FAIL" + ("" if case.metrics.finite else " (NaN/Inf)")
            numbers = case.metrics
            lines.append(
                f"{component:<14} {case.label:<20} {_fmt(numbers.max_abs):>8} {_fmt(numbers.mean_abs):>8} "
                f"{_fmt(numbers.relative_l2):>8}  {limit:<26} {status}"
            )
    return lines


def generation_rows(report: ValidationReport) -> list[str]:
    run = f"{report.settings.scheduler} {report.settings.steps} steps"
    lines = []
    for mode, entry in report.end_to_end.items():
        if entry.skipped:
            lines.append(f"{mode:<14} {run:<20} skipped: {entry.skipped}")
            continue
        lines.append(
            f"{mode:<14} {run:<20} PSNR {_fmt(entry.psnr_db, '.1f')} dB, latents max abs "
            f"{_fmt(entry.latent_max_abs)}  (PSNR >= {entry.min_psnr_db:g} dB) {'ok' if entry.ok else 'FAIL'}"
        )
    return lines


def blame_lines(component: str, blame: Blame) -> list[str]:
    if not blame.node:
        return [f"{component}: no intermediate tensor of the fp16 graph leaves tolerance on {blame.case}"]
    metrics = blame.metrics or NO_NUMBERS  # always set where a node is
    why = "NaN/Inf" if not metrics.finite else f"relative L2 {_fmt(metrics.relative_l2)}"
    if blame.out_of_fp16_range:
        why += f"; its fp32 value reaches {blame.fp32_max_value:.3g}, beyond fp16's {FP16_MAX:g}"
    lines = [f"{component}: first fp16 node out of tolerance: {blame.node} ({blame.op_type}, {why})"]
    if blame.suggested_fp32_nodes:
        lines.append(
            f"{component}: keep in fp32 (fp32_nodes): {', '.join(blame.suggested_fp32_nodes)}"
            " -- `sdexport convert --dtype fp16 --auto-fp32-fallback` applies it"
        )
    return lines


def format_table(report: ValidationReport) -> str:
    """The human summary: one row per component and case, one per end-to-end run, then what failed."""
    lines = [
        f"validate {report.export} ({report.dtype}, {report.target}) against {report.source} on {report.provider}",
        *component_rows(report),
        *generation_rows(report),
    ]
    for component, entry in report.components.items():
        lines += blame_lines(component, entry.first_bad_node) if entry.first_bad_node else []
    lines += [f"fallback: {c}: {note}" for c, notes in report.fp32_fallback.items() for note in notes]
    lines += [f"FAIL {problem}" for problem in report.problems if problem.kind in ROWLESS_KINDS]
    lines.append("result: ok" if report.ok else f"result: FAILED ({', '.join(report.failed_parts())})")
    return "\n".join(lines)
