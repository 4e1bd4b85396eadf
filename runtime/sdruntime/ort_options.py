"""The one place that builds ONNX Runtime's `SessionOptions`, for the runtime and the exporter alike.

Every session this project creates (a component's session, a graph check, a comparison with
PyTorch, an offline optimization, the layout probe) asks for its options here by level name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
WARNINGS = 2  # ORT's default log severity
QUIET = 3  # errors only: keeps ORT's warnings out of the user's terminal


def ort_session_options(
    level: str = "basic",
    *,
    log_severity: int = QUIET,
    prepacking: bool = True,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    cpu_mem_arena: bool = True,
    save_optimized_to: Path | None = None,
    external_data_name: str | None = None,
    config: Mapping[str, str] | None = None,
) -> ort.SessionOptions:
    """SessionOptions at an optimization level ("disable", "basic", "extended" or "all").

    `prepacking` False skips the CPU kernels' packed copies of the weights, for sessions that run
    once or never (they would double the MatMul weights in memory). `save_optimized_to` makes the
    session write its optimized graph there, with the weights over 1 KB in `external_data_name`
    beside it. `config` adds ORT's session config entries.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = log_severity
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.enable_cpu_mem_arena = cpu_mem_arena
    entries = dict(config or {})
    if not prepacking:
        entries["session.disable_prepacking"] = "1"
    if save_optimized_to is not None:
        options.optimized_model_filepath = str(save_optimized_to)
    if external_data_name is not None:
        entries["session.optimized_model_external_initializers_file_name"] = external_data_name
        entries["session.optimized_model_external_initializers_min_size_in_bytes"] = "1024"
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return options
