"""The one boundary for other libraries' noise: what sdexport quiets, and only while it runs.

Nothing here changes the process for good: every filter is added on entry and removed on exit, so a
program that imports sdexport keeps its own warning and logging set-up.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# warnings raised from these packages' own code (deprecations, tracer notes) say nothing a user can act on
THIRD_PARTY_MODULES = r"(torch|diffusers|transformers|huggingface_hub|onnx|onnxruntime|optimum|peft|safetensors)(\.|$)"
# diffusers logs at import that two distributions (optimum-onnx among them) provide `optimum`
DIFFUSERS_IMPORT_LOGGER = "diffusers.utils.import_utils"
OPTIMUM_NOTICE = "Multiple distributions found for package optimum"


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: third-party warnings ignored, diffusers' import notice about optimum dropped."""
    logger = logging.getLogger(DIFFUSERS_IMPORT_LOGGER)

    def not_optimum_notice(record: logging.LogRecord) -> bool:  # one per block: nested blocks nest
        return OPTIMUM_NOTICE not in record.getMessage()

    logger.addFilter(not_optimum_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
            yield
    finally:
        logger.removeFilter(not_optimum_notice)
