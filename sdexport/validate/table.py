"""The human summary of a report: one row per component case and per end-to-end case, then what failed."""

from __future__ import annotations

from .metrics import FP16_MAX, NO_NUMBERS
from .report import ROWLESS_KINDS, Blame, GenerationResult, ValidationReport


def _fmt(value: float | None, spec: str = ".1e") -> str:
    return "nan" if value is None else format(value, spec)


def column_widths(report: ValidationReport) -> tuple[int, int]:
    """The first two columns' widths: 14 and 20, or the longest part name and case label."""
    names = [*report.components, *report.end_to_end]
    labels = [case.label for entry in report.components.values() for case in entry.cases]
    return max([14, *map(len, names)]), max([20, *map(len, labels)])


def component_rows(report: ValidationReport) -> list[str]:
    part, label = column_widths(report)
    lines = [
        f"{'component':<{part}} {'case':<{label}} {'max abs':>8} {'mean abs':>8} {'rel L2':>8}  {'limit':<26} result"
    ]
    for component, entry in report.components.items():
        limit = entry.limits.describe()
        if entry.skipped:
            lines.append(f"{component:<{part}} {'-':<{label}} {entry.skipped}")
        elif not entry.cases:
            lines.append(f"{component:<{part}} {'-':<{label}} {'':>8} {'':>8} {'':>8}  {limit:<26} FAIL")
        for case in entry.cases:
            status = "ok" if case.ok else "FAIL" + ("" if case.metrics.finite else " (NaN/Inf)")
            numbers = case.metrics
            lines.append(
                f"{component:<{part}} {case.label:<{label}} {_fmt(numbers.max_abs):>8} {_fmt(numbers.mean_abs):>8} "
                f"{_fmt(numbers.relative_l2):>8}  {limit:<26} {status}"
            )
    return lines


def what_it_drew(name: str, entry: GenerationResult) -> str:
    """What a case drew, where its name does not say it: " (text2img, ControlNet edges)"."""
    said = [entry.mode] if entry.mode != name else []
    said += [f"ControlNet {entry.controlnet}"] if entry.controlnet else []
    return f" ({', '.join(said)})" if said else ""


def generation_rows(report: ValidationReport) -> list[str]:
    part, label = column_widths(report)
    run = f"{report.settings.scheduler} {report.settings.steps} steps"
    lines = []
    for name, entry in report.end_to_end.items():
        drew = what_it_drew(name, entry)
        if entry.skipped:
            lines.append(f"{name:<{part}} {run:<{label}} skipped: {entry.skipped}")
            continue
        lines.append(
            f"{name:<{part}} {run:<{label}} PSNR {_fmt(entry.psnr_db, '.1f')} dB, latents max abs "
            f"{_fmt(entry.latent_max_abs)}  (PSNR >= {entry.min_psnr_db:g} dB) {'ok' if entry.ok else 'FAIL'}{drew}"
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
    """The human summary: one row per component and case, one per end-to-end case, then what failed."""
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
