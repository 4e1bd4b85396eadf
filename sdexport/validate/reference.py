"""The PyTorch reference: SOURCE loaded as the export was made from it, refused when it is another model, with
the ControlNets `--controlnet` names attached as convert attaches them."""

from __future__ import annotations

from collections.abc import Sequence

from sdruntime.manifest import DYNAMIC_AXES, TRANSFORMER_FAMILIES, Manifest, component_io

from ..controlnet import ControlNetSource, attach_controlnets
from ..errors import SdexportError
from ..families import pipeline_family
from ..load import Source, attach_tiny_vae, load_source, replace_vae
from ..lora import check_loras, fuse_loras
from ..specs import controlnet_models, model_dims, set_attention
from .options import ValidateOptions


def check_matches(manifest: Manifest, pipe, source_name: str) -> None:
    """Refuse an export of another model: a U-Net export against a transformer pipeline or the other way
    round, or config-fixed axes in its manifest that are not the source's."""
    ours, theirs = manifest.pipeline.family, pipeline_family(pipe)
    if ours != theirs and {ours, theirs} & set(TRANSFORMER_FAMILIES):
        raise SdexportError(
            f"{manifest.folder} was not exported from {source_name}: its family is {ours}, the source's {theirs}; "
            "pass the SOURCE it was exported from"
        )
    dims = model_dims(pipe)
    for component, entry in manifest.components.items():
        io = component_io(component, family=manifest.pipeline.family)
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
    if manifest.source.tiny_vae:
        attach_tiny_vae(src, manifest.source.tiny_vae)
    return src


def with_controlnets(pipe, sources: Sequence[ControlNetSource], log) -> None:
    """Attach the ControlNets `sources` name, beside those a Source from convert already carries."""
    if not sources:
        return
    carried = controlnet_models(pipe)
    attach_controlnets(pipe, sources, log)
    pipe.sdexport_controlnets = {**carried, **pipe.sdexport_controlnets}


def reference_for(
    source: str | Source, manifest: Manifest, opts: ValidateOptions, controlnets: Sequence[ControlNetSource] = ()
) -> Source:
    """SOURCE (a name, or a `Source` already loaded) checked against the export, with the export's attention
    form and the ControlNets given."""
    src = source if isinstance(source, Source) else load_reference(source, manifest, opts)
    check_matches(manifest, src.pipe, src.name)
    with_controlnets(src.pipe, controlnets, opts.log)
    set_attention(src.pipe, next(iter(manifest.components.values())).attention)
    return src
