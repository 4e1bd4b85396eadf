"""The PyTorch reference: SOURCE loaded as the export was made from it, refused when it is another model."""

from __future__ import annotations

from sdruntime.manifest import COMPONENT_IO, DYNAMIC_AXES, Manifest

from ..errors import SdexportError
from ..load import Source, load_source, replace_vae
from ..lora import check_loras, fuse_loras
from ..specs import model_dims, set_attention
from .options import ValidateOptions


def check_matches(manifest: Manifest, pipe, source_name: str) -> None:
    """Refuse an export of another model: the config-fixed axes in its manifest must be the source's."""
    dims = model_dims(pipe)
    for component, entry in manifest.components.items():
        io = COMPONENT_IO[component]
        recorded = {t.name: t.shape for t in entry.inputs + entry.outputs}
        for spec in io.inputs + io.outputs:
            for axis, size in zip(spec.shape, recorded.get(spec.name, ())):
                if axis not in DYNAMIC_AXES and size != dims[axis]:
                    raise SdexportError(
                        f"{manifest.folder} was not exported from {source_name}: its {component} {spec.name} has "
                        f"{axis} {size}, the source's has {dims[axis]}; pass the SOURCE it was exported from"
                    )


def load_reference(source: str, manifest: Manifest, opts: ValidateOptions) -> Source:
    """Load SOURCE as the export was made from it: the same single-file options and the LoRAs
    the manifest records, fused at their scales."""
    loras = check_loras(f"{lora.path}:{lora.scale}" for lora in manifest.source.loras)
    src = load_source(source, opts.config, opts.prediction_type, opts.allow_pickle)
    if loras:
        src.loras = fuse_loras(src.pipe, loras, opts.log)
    if manifest.source.vae not in (None, "pipeline"):
        replace_vae(src, manifest.source.vae)
    return src


def reference_for(source: str | Source, manifest: Manifest, opts: ValidateOptions) -> Source:
    """SOURCE (a name, or a `Source` already loaded) checked against the export, with the export's attention form."""
    src = source if isinstance(source, Source) else load_reference(source, manifest, opts)
    check_matches(manifest, src.pipe, src.name)
    set_attention(src.pipe, next(iter(manifest.components.values())).attention)
    return src
