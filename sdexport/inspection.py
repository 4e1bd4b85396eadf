"""`sdexport inspect`: what an exported folder holds, per component."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from sdruntime.manifest import ExportError, read_manifest

from .fusion_limits import unfused_record

STANDARD_DOMAINS = ("", "ai.onnx")


def op_counts(model_path: Path) -> tuple[Counter, list[str], list[dict] | None]:
    """Op type counts, each non-standard (contrib or fused) op type with its count, and the fused
    nodes the cuda target put back into standard ops because their CUDA kernel refuses them
    (None for a graph without that record: every other target)."""

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends on a damaged file
        raise ExportError(f"{model_path} is not a readable ONNX model ({e}): run `sdexport convert` again") from e
    counts = Counter(node.op_type for node in model.graph.node)
    fused = Counter(f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS)
    return counts, [f"{op}:{n}" for op, n in sorted(fused.items())], unfused_record(model)


def inspect_export(folder: str | Path) -> dict:
    manifest = read_manifest(folder)
    report = {
        "folder": str(Path(folder).resolve()),
        "dtype": manifest.dtype,
        "target": manifest.target,
        "opset": manifest.opset,
        "source": manifest.source.to_json(),
        "size_multiple": manifest.size_multiple,
        "static": manifest.static.to_json() if manifest.static else None,
        "pipeline": manifest.pipeline.to_json(),
        "components": {},
    }
    for name, entry in manifest.components.items():
        counts, contrib, unfused = op_counts(manifest.model_path(name))
        report["components"][name] = {
            "path": entry.path,
            "bytes": sum(f.bytes for f in entry.files),
            "dtype": entry.dtype,
            "attention": entry.attention,
            "inputs": [t.to_json() for t in entry.inputs],
            "outputs": [t.to_json() for t in entry.outputs],
            "nodes": sum(counts.values()),
            "op_counts": dict(counts.most_common()),
            "contrib_ops": contrib,
            "fp32_nodes": len(entry.fp32_nodes),
            "unfused": unfused,  # [{node, op, reason}] for the cuda target, else None
        }
    return report


def _shape(tensor: dict) -> str:
    return f"{tensor['name']} {tensor['dtype']}[{', '.join(str(d) for d in tensor['shape'])}]"


def format_report(report: dict) -> str:
    lines = [
        (
            f"{report['folder']}: {report['dtype']}, target {report['target']}, opset {report['opset']}, "
            f"source {report['source']['kind']} '{report['source']['name']}'"
        ),
        f"size multiple {report['size_multiple']}"
        + (f", static {report['static']}" if report["static"] else ", dynamic shapes"),
        "pipeline: " + ", ".join(f"{k}={v}" for k, v in report["pipeline"].items()),
        "",
        f"{'component':<13} {'file':<24} {'MB':>8} {'dtype':<5} {'attn':<5} {'nodes':>6}  top ops",
    ]
    for name, c in report["components"].items():
        top = ", ".join(f"{op}:{n}" for op, n in list(c["op_counts"].items())[:5])
        lines.append(
            f"{name:<13} {c['path']:<24} {c['bytes'] / 1e6:>8.1f} {c['dtype']:<5} {c['attention']:<5} {c['nodes']:>6}  {top}"
        )
        lines.append(f"{'':<13} in:  " + "; ".join(_shape(t) for t in c["inputs"]))
        lines.append(f"{'':<13} out: " + "; ".join(_shape(t) for t in c["outputs"]))
        extra = f"contrib/fused ops: {', '.join(c['contrib_ops']) or 'none'}"
        if c["fp32_nodes"]:
            extra += f"; {c['fp32_nodes']} nodes kept in fp32"
        lines.append(f"{'':<13} {extra}")
        lines.extend(_unfused_lines(c.get("unfused")))
    return "\n".join(lines)


def _unfused_lines(unfused: list[dict] | None) -> list[str]:
    """The nodes left unfused for the CUDA kernels' limits, one line each (nothing without a record)."""
    if unfused is None:
        return []
    if not unfused:
        return [f"{'':<13} left unfused for CUDA kernel limits: none"]
    lines = [f"{'':<13} left unfused for CUDA kernel limits: {len(unfused)}"]
    lines += [f"{'':<15} {u['op']} {u['node']}: {u['reason']}" for u in unfused]
    return lines
