"""`sdexport convert`: SOURCE -> an exported folder, written into a staged folder and put in place
when complete (staging.py), optionally validated against PyTorch before that (validate.py)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from sdruntime.manifest import config_file_entries, write_manifest

from .conversion import ConvertOptions, check_options, check_output, export_all, write_configs
from .errors import ValidationFailed
from .load import load_source, replace_vae
from .lora import check_loras, fuse_loras
from .staging import staged_folder
from .validate import check_convert_options, validate_conversion


def convert(source: str, out: str | os.PathLike, **options) -> Path:
    """Export SOURCE to OUT; see `sdexport convert --help` for the options."""
    opts = ConvertOptions(**options)
    check_options(opts)
    validating = opts.validate or opts.auto_fp32_fallback
    if validating:
        check_convert_options(opts.dtype, opts.target, opts.auto_fp32_fallback)
    loras = check_loras(opts.loras)
    out = Path(out)
    check_output(out, opts.overwrite)
    log = opts.log
    started = time.perf_counter()
    # a failed validation's export stays in its temporary folder, with the report, for inspection
    with staged_folder(out, log, keep=(ValidationFailed,)) as tmp:
        src = load_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
        log(f"loaded {src.kind} '{src.name}' in {time.perf_counter() - started:.1f} s")
        if opts.vae:
            replace_vae(src, opts.vae)
            log(f"replaced the pipeline's VAE with {src.vae}")
        if loras:
            src.loras = fuse_loras(src.pipe, loras, log)
        manifest = export_all(src, tmp, opts)
        write_configs(src.pipe, src, tmp, list(manifest.components))
        write_manifest(tmp, replace(manifest, config_files=config_file_entries(tmp)))
        if validating:
            validate_conversion(src, tmp, out, opts.target, opts.auto_fp32_fallback, log)
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out
