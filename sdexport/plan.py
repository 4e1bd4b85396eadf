"""A convert request (ConvertOptions, checked in convert_options.py) turned into an ExportPlan, once:
which components, at which dtype and why, which attention form, which static sizes. Every later stage
reads the plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sdruntime.manifest import COMPONENTS, TINY_DECODER, TRANSFORMER_FAMILIES, PipelineFacts, StaticShapes

from .convert_options import ConvertOptions
from .errors import SdexportError
from .families import FAMILY_NAMES, pipeline_family
from .specs import (
    controlnet_models,
    first_tokenizer,
    is_tiny_vae,
    num_hidden_states,
    num_time_ids,
    patch_size,
    pipeline_components,
    residual_layout,
    size_multiple,
    spec_of,
    t5_tokenizer,
    tiny_vae,
    vae_scale_factor,
)
from .streaming import STREAM_BYTES, is_streamed
from .targets import EXPORT_TARGETS


def pipeline_facts(pipe, family: str) -> PipelineFacts:
    if family in TRANSFORMER_FAMILIES:
        return transformer_facts(pipe, family)
    factor = vae_scale_factor(pipe)
    tokenizer = first_tokenizer(pipe)
    unet = pipe.unet.config
    sdxl = sdxl_facts(pipe) if family == "sdxl" else {}
    time_cond = unet.get("time_cond_proj_dim")
    return PipelineFacts(
        family=family,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=factor,
        latent_channels=int(pipe.vae.config.latent_channels),
        unet_in_channels=int(unet.in_channels),
        default_height=int(pipe.unet.config.sample_size) * factor,
        default_width=int(pipe.unet.config.sample_size) * factor,
        tokenizer_max_length=int(tokenizer.model_max_length),
        pad_token_id=int(tokenizer.pad_token_id),
        scheduler_class=pipe.scheduler.__class__.__name__,
        upcast_attention=bool(pipe.unet.config.get("upcast_attention", False)),
        num_hidden_states=num_hidden_states(pipe) or None,
        time_cond_proj_dim=int(time_cond) if time_cond is not None else None,
        vae_force_upcast=bool(pipe.vae.config.get("force_upcast", True)) if family == "sdxl" else None,
        unet_residual_scales=residual_layout(unet)[0],
        unet_residual_channels=residual_layout(unet)[1],
        text_encoder_attention_mask=True,
        **tiny_vae_facts(pipe),
        **sdxl,
    )


def tiny_vae_facts(pipe) -> dict:
    """Whether the VAE is an AutoencoderTiny (`--vae`), and the scaling factor of the one `--tiny-vae` attached."""
    tiny = tiny_vae(pipe)
    return {
        "vae_tiny": True if is_tiny_vae(pipe.vae) else None,
        "tiny_vae_scaling_factor": float(tiny.config.scaling_factor) if tiny is not None else None,
    }


# diffusers' default max_sequence_length in StableDiffusion3Pipeline and FluxPipeline's __call__
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


def transformer_facts(pipe, family: str) -> PipelineFacts:
    """The facts of an SD3 or Flux pipeline: the 16-channel VAE's scaling and shift, the transformer's
    patches and widths, the tokenizers (T5's may be absent in SD3, as diffusers allows)."""
    factor = vae_scale_factor(pipe)
    config = pipe.transformer.config
    # SD3's default size is the transformer's sample_size; FluxPipeline's default_sample_size is 128
    sample = int(config.sample_size) if family == "sd3" else 128
    t5 = t5_tokenizer(pipe)
    sd3 = {}
    if family == "sd3":
        encoder = pipe.text_encoder_2.config
        sd3 = {
            "num_hidden_states_2": num_hidden_states(pipe, "text_encoder_2"),
            "text_encoder_2_hidden_size": int(encoder.hidden_size),
            "text_encoder_2_projection_dim": int(encoder.projection_dim),
            "tokenizer_2_max_length": int(pipe.tokenizer_2.model_max_length),
            "tokenizer_2_pad_token_id": int(pipe.tokenizer_2.pad_token_id),
        }
    return PipelineFacts(
        family=family,
        prediction_type="flow",
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=factor,
        latent_channels=int(pipe.vae.config.latent_channels),
        default_height=sample * factor,
        default_width=sample * factor,
        tokenizer_max_length=int(pipe.tokenizer.model_max_length),
        pad_token_id=int(pipe.tokenizer.pad_token_id),
        scheduler_class=pipe.scheduler.__class__.__name__,
        num_hidden_states=num_hidden_states(pipe),
        vae_shift_factor=float(pipe.vae.config.shift_factor or 0.0),
        patch_size=patch_size(pipe),
        joint_attention_dim=int(config.joint_attention_dim),
        pooled_projection_dim=int(config.pooled_projection_dim),
        max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH[family],
        t5_max_length=int(t5.model_max_length) if t5 is not None else None,
        t5_pad_token_id=int(t5.pad_token_id) if t5 is not None else None,
        guidance_embeds=bool(config.guidance_embeds) if family == "flux" else None,
        **sd3,
    )


def sdxl_facts(pipe) -> dict:
    """The SDXL pipeline facts: the second text encoder and tokenizer, the U-Net's added
    conditioning and the pipeline's config flags (refused when the widths do not add up)."""

    unet = pipe.unet.config
    encoder = pipe.text_encoder_2.config
    passed = unet.addition_time_embed_dim * num_time_ids(pipe) + encoder.projection_dim
    if passed != unet.projection_class_embeddings_input_dim:
        raise SdexportError(
            f"the U-Net's projection_class_embeddings_input_dim is {unet.projection_class_embeddings_input_dim}, but "
            f"{num_time_ids(pipe)} time ids x addition_time_embed_dim {unet.addition_time_embed_dim} + text_encoder_2's "
            f"projection_dim {encoder.projection_dim} make {passed}: check requires_aesthetics_score in model_index.json"
        )
    return {
        "num_hidden_states_2": num_hidden_states(pipe, "text_encoder_2"),
        "text_encoder_2_hidden_size": int(encoder.hidden_size),
        "text_encoder_2_projection_dim": int(encoder.projection_dim),
        "tokenizer_2_max_length": int(pipe.tokenizer_2.model_max_length),
        "tokenizer_2_pad_token_id": int(pipe.tokenizer_2.pad_token_id),
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(pipe.config.get("requires_aesthetics_score", False)),
        "addition_time_embed_dim": int(unet.addition_time_embed_dim),
        "projection_class_embeddings_input_dim": int(unet.projection_class_embeddings_input_dim),
    }


def static_shapes(opts: ConvertOptions, facts: PipelineFacts, multiple: int) -> StaticShapes | None:
    """The manifest's `static` entry of a static export (sizes checked against the size multiple)."""
    if not opts.static:
        return None
    if facts.transformer_family:
        name = FAMILY_NAMES[facts.family]
        raise SdexportError(f"--static is not supported for {name} exports yet: export without --static")
    height = opts.height or facts.default_height
    width = opts.width or facts.default_width
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise SdexportError(f"--{name} {value} is not a multiple of {multiple} (this model's size multiple)")
    return StaticShapes(opts.batch_size, height, width)


def export_components(pipe, requested: Sequence[str]) -> list[str]:
    """The requested components this pipeline has, in the IO table's order. The default request
    (every component) means all the pipeline has; a component named on purpose must exist."""

    present = pipeline_components(pipe)
    missing = [c for c in requested if c not in present]
    if missing and tuple(requested) != COMPONENTS:
        raise SdexportError(f"this pipeline has no {missing[0]}: choose --components from {', '.join(present)}")
    # the attached tiny decoder (load.attach_tiny_vae) and ControlNets (controlnet.attach_controlnets), after the
    # IO table's components
    tiny = [TINY_DECODER] if tiny_vae(pipe) is not None else []
    return [c for c in COMPONENTS if c in requested and c in present] + tiny + list(controlnet_models(pipe))


# Why a component of an fp16 export is fp32 (ComponentPlan.reason)
EXPORT_DTYPE = "the export's dtype"
KEEP_FP32 = "--keep-fp32"
FORCE_UPCAST = "force_upcast"


@dataclass(frozen=True)
class ComponentPlan:
    """One component's dtype and the reason for it (EXPORT_DTYPE, KEEP_FP32 or FORCE_UPCAST)."""

    name: str
    dtype: str
    reason: str

    @property
    def fp16(self) -> bool:
        return self.dtype == "fp16"


@dataclass(frozen=True)
class ExportPlan:
    """What a convert does, decided before anything is traced."""

    facts: PipelineFacts
    size_multiple: int
    static: StaticShapes | None
    attention: str  # the attention form traced, from the target table
    components: dict[str, ComponentPlan]  # in the IO table's order
    lean: bool  # free PyTorch's weights as soon as they are traced (no validation follows)
    compare: bool  # compare every written graph with PyTorch (this machine runs the target)

    def trace_order(self) -> list[str]:
        """The order components are traced in: the largest (the U-Net) last."""
        return sorted(self.components, key=lambda name: spec_of(name).traced_last)


def component_plan(component: str, opts: ConvertOptions, facts: PipelineFacts) -> ComponentPlan:
    """fp16 unless the component is kept in fp32: by --keep-fp32, or SDXL's VAE whose config says
    force_upcast (it overflows in fp16, so diffusers decodes in fp32 too)."""
    if opts.dtype != "fp16":
        return ComponentPlan(component, "fp32", EXPORT_DTYPE)
    if component in opts.keep_fp32:
        return ComponentPlan(component, "fp32", KEEP_FP32)
    if spec_of(component).follows_vae_force_upcast and facts.vae_force_upcast:
        return ComponentPlan(component, "fp32", FORCE_UPCAST)
    return ComponentPlan(component, "fp16", EXPORT_DTYPE)


def check_streamed(pipe, components: Sequence[str], target: str) -> None:
    """Streamed modules (streaming.py: T5-XXL) skip ORT's offline passes, which load a whole model: only the
    generic target, whose graphs ORT optimizes when it loads them, exports them yet."""
    for component in components:
        if target != "generic" and is_streamed(spec_of(component).module_of(pipe, component)):
            raise SdexportError(
                f"{component} is streamed (its fp32 weights pass {STREAM_BYTES >> 30} GB), which only the generic "
                f"target exports yet: use --target generic, or leave {component} out with --components"
            )


def plan_export(pipe, opts: ConvertOptions, compare: bool) -> ExportPlan:
    """The plan of one convert of this pipeline; `compare`: this machine runs the target's graphs."""
    facts = pipeline_facts(pipe, pipeline_family(pipe))
    multiple = size_multiple(pipe)
    static = static_shapes(opts, facts, multiple)
    # component_export.add_zero_defaults gives the residual inputs defaults where their batch is not fixed
    if not facts.transformer_family:
        defaults = EXPORT_TARGETS[opts.target].residual_defaults and static is None
        facts = replace(facts, unet_residual_defaults=defaults, text_encoder_mask_defaults=defaults)
    components = export_components(pipe, opts.components)
    check_streamed(pipe, components, opts.target)
    return ExportPlan(
        facts=facts,
        size_multiple=multiple,
        static=static,
        attention=EXPORT_TARGETS[opts.target].attention,
        components={c: component_plan(c, opts, facts) for c in components},
        lean=not (opts.validate or opts.auto_fp32_fallback),  # validation runs the whole pipeline in PyTorch
        compare=opts.check and compare,
    )


def force_upcast_note(plan: ExportPlan) -> str | None:
    """The log line that says which components force_upcast keeps in fp32, if any."""
    kept = [c.name for c in plan.components.values() if c.reason == FORCE_UPCAST]
    if not kept:
        return None
    return (
        f"keeping {' and '.join(kept)} in fp32: the VAE config says force_upcast (SDXL's VAE overflows "
        "in fp16); pass --vae with an fp16-safe VAE (force_upcast false) to export it in fp16"
    )
